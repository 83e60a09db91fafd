"""What every model backend gives the registry, and what the registry keeps of each family.

A backend is one model library (smp, torchvision, transformers).  The registry asks it for its
families (``specs``), and each :class:`ModelSpec` names the backend that builds it, so nothing
outside this folder asks which library a family comes from:

* ``resolve_encoder(spec, encoder)``: the library's name of a user's encoder (unknown: the valid ones);
* ``input_divisor(spec, encoder, options)``: what height and width must be multiples of;
* ``build(spec, request)``: the network under the family contract (:mod:`pipeline.models.contract`),
  its encoder at the dotted path ``encoder_path`` (also the prefix of the encoder's state-dict keys);
* ``preprocessing(spec, encoder)``: mean, std and input range from the encoder's pretrained config;
* ``hub_files(spec, encoder)``: where the library downloads the encoder's ImageNet weights from
  (Hugging Face repos and torch hub urls), which :mod:`pipeline.models.pretrained` looks up in the caches;
* ``has_encoder_weights``: False when the library's encoders have no ImageNet weights to resolve.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.torch_files import TRUST_KEY, UnsafeFileError
from pipeline.data.transforms import IMAGENET, Preprocessing

log = logging.getLogger(__name__)

HubFiles = tuple[list[tuple[str, tuple[str, ...], str | None]], list[str]]

OFFLINE_HINT = (
    "Without network access either pass weights=/path/file (a whole-model or encoder-only "
    "state dict saved on disk) or set encoder_weights=null to start from random weights; "
    "files downloaded once are cached under $TORCH_HOME and $HF_HOME."
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model family; ``backend`` builds it."""

    name: str
    backend: Backend
    arch: str  # the library's architecture key, builder or class name
    default_encoder: str
    divisor: int  # input-size divisor with the default encoder and settings
    test_encoder: str  # small encoder for CPU tests
    min_test_size: int = 64
    fixed_encoder: bool = False  # one backbone, fixed by the name
    default_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> str:
        """The library the family comes from (its backend's name)."""
        return self.backend.name


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """What ``build_model`` asks a backend to build (see its docstring for the weights' precedence)."""

    num_classes: int
    encoder: str | None = None
    encoder_weights: str | None = None
    weights: str | Path | None = None  # a local file, loaded by the registry after building
    in_channels: int = 3
    pretrained: str | Path | None = None
    architecture: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Backend:
    """One model library; see the module docstring for what each method answers."""

    name = ""
    has_encoder_weights = True

    def specs(self) -> list[ModelSpec]:
        raise NotImplementedError

    def aliases(self) -> dict[str, str]:
        """Other names of the families (alias -> registry name)."""
        return {}

    def resolve_encoder(self, spec: ModelSpec, encoder: str) -> str:
        """The library's name of ``encoder`` (given, stripped); unknown names list the valid ones."""
        raise NotImplementedError

    def encoder_of(self, spec: ModelSpec, encoder: str | None) -> str:
        """``encoder`` resolved, or the family's default encoder when it is not given."""
        if encoder is None or str(encoder).strip() == "":
            return spec.default_encoder
        return self.resolve_encoder(spec, str(encoder).strip())

    def input_divisor(self, spec: ModelSpec, encoder: str | None, options: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def build(self, spec: ModelSpec, request: BuildRequest) -> nn.Module:
        raise NotImplementedError

    def preprocessing(self, spec: ModelSpec, encoder: str | None) -> Preprocessing:
        return IMAGENET

    def hub_files(self, spec: ModelSpec, encoder: str) -> HubFiles:
        return [], []


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (as huggingface_hub reads it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def hf_cached(repo_id: str, filenames: tuple[str, ...], revision: str | None = None) -> Path | None:
    """The first of ``filenames`` of a hub repo that the local cache holds (nothing downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_cache_dir()), revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # weight files that are pickles


def require_safetensors(folder: Path, setting: str) -> None:
    """A whole-model folder loads from ``.safetensors`` only (reading those runs no code): one whose
    weights are all pickled is refused, naming the file and how to convert it."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLED_WEIGHTS)
    if pickled:
        raise UnsafeFileError(
            f"{pickled[0]}: refused: pretrained={setting} is a whole-model folder, and whole models load from "
            f".safetensors only; its weights are pickled ({', '.join(p.name for p in pickled)}), and unpickling "
            f"can run code stored in the file. Convert them once to model.safetensors: make weights FROM={folder} "
            f"(it reads them as data, or in full for a file you name with {TRUST_KEY}=<file>)"
        )


def reject_extra_outputs(options: Mapping[str, Any]) -> None:
    """Registry models return one logits tensor: no auxiliary heads, no activation."""
    for key in ("aux_params", "activation"):
        if options.get(key) is not None:
            raise PipelineError(
                f"{key}={options[key]!r} is not supported: registry models return one logits tensor "
                f"(apply softmax outside the model)"
            )


def local_weights_first(weights: str | Path | None, encoder_weights: str | None) -> str | None:
    """``encoder_weights`` unless a local ``weights`` file is given (then nothing is downloaded)."""
    if weights is None:
        return encoder_weights
    weights = Path(weights)
    if not weights.is_file():
        raise PipelineError(f"{weights}: weights file not found")
    if encoder_weights is not None:
        log.info("weights=%s given: not downloading encoder weights %r", weights, encoder_weights)
    return None


class SegmentationNet(nn.Module):
    """A registry model: forward returns logits ``N x K x H x W`` at the input size.

    The wrapped network is ``self.net``; ``self.encoder`` is its encoder or backbone, the
    submodule at ``encoder_path`` (which its backend names).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        family: str,
        encoder_name: str,
        num_classes: int,
        in_channels: int,
        input_divisor: int,
        encoder_path: str,
    ) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.family = family
        self.encoder_name = encoder_name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_divisor = input_divisor
        self.encoder_path = encoder_path
        self.architecture: dict[str, Any] | None = None  # set when built from a whole pretrained model

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.encoder_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, Mapping):
            out = out["out"]
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch}, encoder={self.encoder_name}, num_classes={self.num_classes}, "
            f"in_channels={self.in_channels}, input_divisor={self.input_divisor}"
        )
