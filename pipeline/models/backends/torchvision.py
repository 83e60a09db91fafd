"""torchvision's segmentation models: each has one backbone, fixed by its name.

``encoder_weights="imagenet"`` means the backbone's ImageNet weights (the segmentation head stays
random); any input size works (the models resize internally).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError, UnknownNameError
from pipeline.models.backends.base import (
    OFFLINE_HINT,
    Backend,
    BuildRequest,
    HubFiles,
    ModelSpec,
    SegmentationNet,
    local_weights_first,
    reject_extra_outputs,
)

ENCODER_PATH = "net.backbone"

# registry name -> (torchvision builder, backbone, ImageNet weights enum of the backbone)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "tv_fcn_resnet50": ("fcn_resnet50", "resnet50", "ResNet50_Weights"),
    "tv_fcn_resnet101": ("fcn_resnet101", "resnet101", "ResNet101_Weights"),
    "tv_deeplabv3_resnet50": ("deeplabv3_resnet50", "resnet50", "ResNet50_Weights"),
    "tv_deeplabv3_resnet101": ("deeplabv3_resnet101", "resnet101", "ResNet101_Weights"),
    "tv_deeplabv3_mobilenet_v3_large": (
        "deeplabv3_mobilenet_v3_large",
        "mobilenet_v3_large",
        "MobileNet_V3_Large_Weights",
    ),
    "tv_lraspp_mobilenet_v3_large": ("lraspp_mobilenet_v3_large", "mobilenet_v3_large", "MobileNet_V3_Large_Weights"),
}


class TorchvisionBackend(Backend):
    name = "torchvision"

    def specs(self) -> list[ModelSpec]:
        return [
            ModelSpec(
                name=name,
                backend=self,
                arch=builder,
                default_encoder=backbone,
                divisor=1,
                test_encoder=backbone,
                fixed_encoder=True,
            )
            for name, (builder, backbone, _) in FAMILIES.items()
        ]

    def aliases(self) -> dict[str, str]:
        return {builder: name for name, (builder, _, _) in FAMILIES.items()}

    def resolve_encoder(self, spec: ModelSpec, encoder: str) -> str:
        if encoder.lower() != spec.default_encoder:
            raise UnknownNameError(
                f"model {spec.name!r} has a fixed backbone; valid encoder: {spec.default_encoder} "
                f"(or leave encoder unset); pick an smp family for other encoders"
            )
        return spec.default_encoder

    def input_divisor(self, spec: ModelSpec, encoder: str | None, options: Mapping[str, Any]) -> int:
        return 1

    def build(self, spec: ModelSpec, request: BuildRequest) -> nn.Module:
        r = request
        if r.pretrained is not None or r.architecture is not None:
            raise PipelineError(
                f"pretrained= (a whole segmentation-pretrained model) is not available for {spec.name!r}: use "
                f"weights= (a local state dict) or encoder_weights="
            )
        reject_extra_outputs(r.options)
        enc = self.encoder_of(spec, r.encoder)
        encoder_weights = local_weights_first(r.weights, r.encoder_weights)
        net = _create(spec, r.num_classes, encoder_weights, r.in_channels, r.options)
        return SegmentationNet(
            net,
            arch=spec.name,
            family=spec.family,
            encoder_name=enc,
            num_classes=r.num_classes,
            in_channels=r.in_channels,
            input_divisor=1,
            encoder_path=ENCODER_PATH,
        )

    def hub_files(self, spec: ModelSpec, encoder: str) -> HubFiles:
        import torchvision.models as tvm

        return [], [getattr(tvm, FAMILIES[spec.name][2]).IMAGENET1K_V1.url]


def _create(
    spec: ModelSpec,
    num_classes: int,
    encoder_weights: str | None,
    in_channels: int,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    import torchvision.models as tvm
    from torchvision.models import segmentation as tvseg

    _, backbone, weights_enum = FAMILIES[spec.name]
    weights_backbone = None
    if encoder_weights is not None:
        if str(encoder_weights).lower() != "imagenet":
            raise UnknownNameError(
                f"unknown encoder_weights {encoder_weights!r} for {spec.name}; valid: imagenet "
                f"(the {backbone} ImageNet backbone) or null (random init)"
            )
        weights_backbone = getattr(tvm, weights_enum).IMAGENET1K_V1
    options: dict[str, Any] = {"weights": None, "weights_backbone": weights_backbone, "num_classes": num_classes}
    if not spec.arch.startswith("lraspp"):
        options["aux_loss"] = False
    options.update(kwargs)
    try:
        net = getattr(tvseg, spec.arch)(**options)
    except OSError as exc:
        raise PipelineError(
            f"could not download the ImageNet {backbone} backbone for {spec.name}: {exc}. " + OFFLINE_HINT
        ) from exc
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"cannot build model {spec.name!r} with options {options}: {exc}") from exc
    if in_channels != 3:
        set_in_channels(net.backbone, in_channels, pretrained=weights_backbone is not None)
    return net


def set_in_channels(module: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Replace the first convolution so it takes ``in_channels`` channels.

    Pretrained kernels are cycled over the new channels and rescaled, as smp does.
    """
    for qualname, conv in module.named_modules():  # noqa: B007 - the first conv's name is used after the loop
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise PipelineError(f"{type(module).__name__} has no convolution to adapt to in_channels={in_channels}")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            idx = torch.arange(in_channels) % conv.in_channels
            new.weight.copy_(conv.weight[:, idx] * (conv.in_channels / in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    parent_name, _, child = qualname.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


BACKEND = TorchvisionBackend()
