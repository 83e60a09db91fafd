"""Training stage: ``make train FOLD=k MODEL=<family>``.

``run(cfg)`` trains one model on the images outside fold ``k`` of ``folds.csv`` and
validates on fold ``k`` with the one metric module, through the training engine
(:mod:`pipeline.engine`).  The run folder ``runs/<experiment>/fold<k>/`` receives
``config.yaml``, ``metrics.csv`` (one row per epoch), ``timing.csv``, ``last.pt`` and
``best.pt`` (complete checkpoints, written atomically), ``curves.png`` and ``oof/`` (the
best checkpoint's class probabilities for the fold's images).

The config is layered as :func:`pipeline.engine.train_config.train_layers` says: defaults <
``configs/base.yaml`` < the family overlay of the model trained < ``--config`` < ``key=value``
(``--only-config``: defaults < ``--config`` < ``key=value``, what ``make all`` runs with its recipe).

A run whose ``last.pt`` exists continues from it when its stored config agrees (but for
:data:`pipeline.engine.train_config.RESUMABLE_KEYS`); otherwise it is refused, naming the keys that
differ, and ``resume=false`` moves the old folder aside to start afresh.  Shuffling and
augmentation depend only on (seed, epoch, sample), so a resumed run reproduces an uninterrupted one.  Under
``torchrun`` the same entry point trains with DistributedDataParallel.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.config import stage_main
from pipeline.engine.hooks import Hook
from pipeline.engine.train_config import TrainConfig, train_layers
from pipeline.engine.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "run", "main"]


def run(cfg: TrainConfig, hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train one fold of ``cfg``; ``hooks`` extend the loop (:mod:`pipeline.engine.hooks`)."""
    return train(cfg, hooks)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(
        TrainConfig, run, argv, "Train one model on one fold (runs/<experiment>/fold<k>/)", compose=train_layers
    )


if __name__ == "__main__":
    raise SystemExit(main())
