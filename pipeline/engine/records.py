"""What a run writes beside its checkpoints: metrics.csv, timing.csv and curves.png."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_open, atomic_write_bytes


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch; no wall times, so two runs with one seed write identical files."""
    import pandas as pd

    with atomic_open(path, "w", newline="") as fh:
        pd.DataFrame(history).to_csv(fh, index=False, float_format="%.10g")


def append_timing(row: dict[str, Any], path: Path) -> None:
    """Wall-clock times per epoch; rows of later epochs (from before a resume) are replaced."""
    import pandas as pd

    rows = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(rows):
        rows = rows[rows["epoch"] < row["epoch"]]
    with atomic_open(path, "w", newline="") as fh:
        pd.concat([rows, pd.DataFrame([row])], ignore_index=True).to_csv(fh, index=False)


def plot_curves(history: list[dict[str, Any]], class_names: Sequence[str], path: Path) -> None:
    """Training loss and val mIoU / per-class IoU per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    val = [h for h in history if not math.isnan(h.get("val_miou", float("nan")))]
    if val:
        axes[1].plot([h["epoch"] for h in val], [h["val_miou"] for h in val], marker="o", color="C1", label="val mIoU")
        for c in class_names[1:]:
            key = f"iou_{c}"
            axes[1].plot([h["epoch"] for h in val], [h.get(key, float("nan")) for h in val], alpha=0.35, lw=1, label=c)
        axes[1].legend(fontsize=6, ncol=2)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("IoU")
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    fig.suptitle(str(path.parent))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
