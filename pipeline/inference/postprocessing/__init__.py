"""Post-processing of fused predictions, chosen on out-of-fold maps.

Each post-processor is one module of this package that registers one :class:`PostProcessor`
in :data:`POSTPROCESSORS`: its ``tune`` (parameters chosen on OOF), its ``apply`` (one image's map),
and what it needs beyond the fused class map (the fused probabilities, the image).  The package
imports every module in it, so adding a post-processor is adding one module (and its test): the
ensemble stage tunes any registered name (``postprocess=``), keeps it only under the selection
rule, writes the record beside the ensemble (``postprocess.yaml``), and submit applies it.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.inference.postprocessing.base import (
    POSTPROCESS_FILE,
    POSTPROCESSORS,
    OofMaps,
    PostProcessor,
    Tuned,
    apply_postprocess,
    candidates,
    choose,
    needs_image,
    read_postprocess,
    write_postprocess,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "POSTPROCESS_FILE",
    "POSTPROCESSORS",
    "OofMaps",
    "PostProcessor",
    "Tuned",
    "apply_postprocess",
    "candidates",
    "choose",
    "needs_image",
    "read_postprocess",
    "write_postprocess",
]
