"""Post-processors of fused predictions, by name.

A post-processor takes the fused class probabilities ``K x H x W`` (float32) of one image
and its class-index map ``H x W`` and returns the final class-index map; parameters come from
the caller.  Submit applies the one named by ``postprocess=`` and records it in its manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.core.registry import Registry

PostProcessor = Callable[..., np.ndarray]

POSTPROCESSORS: Registry = Registry("post-processor")


@POSTPROCESSORS.register("none", "the fused argmax as it is")
def _identity(labels: np.ndarray, probs: np.ndarray | None = None, **params: Any) -> np.ndarray:
    return labels


def postprocess(name: str, labels: np.ndarray, probs: np.ndarray | None = None, **params: Any) -> np.ndarray:
    """Apply the post-processor ``name`` (unknown names list the known ones)."""
    return POSTPROCESSORS.get(name)(labels, probs, **params)
