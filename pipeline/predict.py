"""Prediction stage: ``make predict RUN=runs/<exp>/fold0 TTA=d4 SPLIT=test``.

``run(cfg)`` predicts a run's checkpoint with test-time augmentation into a probability
store (:mod:`pipeline.inference.predictor`): ``SPLIT=test`` writes ``<run>/test_<tta>/``,
``SPLIT=val`` the out-of-fold store ``<run>/oof_<tta>/`` and logs its mIoU.  ``png=true`` also
writes viewable masks beside the store (``<run>/test_<tta>_png/``: palette label PNGs, colour
overlays, a legend); ``images=<folder>`` predicts a folder's image files instead of a split and
writes only those PNGs (``<run>/png_<folder>_<tta>/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.core.config import stage_main
from pipeline.inference.predictor import PredictConfig, predict

__all__ = ["PredictConfig", "run", "main"]


def run(cfg: PredictConfig) -> Path:
    """Predict ``cfg.split`` with TTA and write the probability store (with ``png``, PNGs beside it);
    returns the store's folder, or with ``images`` the folder of PNGs."""
    return predict(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PredictConfig, run, argv, "Predict a run's checkpoint with TTA (test images or out-of-fold)")


if __name__ == "__main__":
    raise SystemExit(main())
