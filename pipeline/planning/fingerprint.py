"""The dataset fingerprint the budget planner reads (as nnU-Net plans from one): how many labelled
and test images, their most common size, the classes, how many are rare or never annotated, and how
much repeat-factor sampling lengthens an epoch.  Taken from the annotation files, or read from a
YAML file when only the figures are known (a contest one has not downloaded yet)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import named_file, read_yaml_mapping
from pipeline.core.errors import ConfigError

RARE_SHARE = 0.05  # a class present in fewer than this share of the labelled images is rare
FINGERPRINTS = Path(__file__).resolve().parents[1] / "configs" / "fingerprints"


@dataclass(frozen=True)
class Fingerprint:
    n_labelled: int
    n_test: int
    size: tuple[int, int]  # the most common (H, W)
    num_classes: int  # Background included
    rare_classes: int = 0  # classes in fewer than RARE_SHARE of the labelled images (not absent ones)
    absent_classes: int = 0  # categories with no annotation at all
    epoch_factor: float = 1.0  # images an epoch goes through per training image (repeat-factor sampling)
    source: str = ""

    def n_val(self, k: int) -> int:
        """Validation images of one fold of ``k``."""
        return max(1, round(self.n_labelled / k))

    def n_train(self, k: int) -> int:
        return max(1, self.n_labelled - self.n_val(k))

    def describe(self) -> str:
        h, w = self.size
        return (
            f"{self.n_labelled} labelled + {self.n_test} test images, {h}x{w}, {self.num_classes} classes "
            f"({self.rare_classes} rare, {self.absent_classes} never annotated)"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.size)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "mapping") -> Fingerprint:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = sorted({"n_labelled", "n_test", "size", "num_classes"} - set(data))
        if unknown or missing:
            raise ConfigError(
                f"{source}: a fingerprint needs n_labelled, n_test, size [H, W] and num_classes"
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                + (f"; missing: {', '.join(missing)}" if missing else "")
            )
        size = data["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(int(v) > 0 for v in size)):
            raise ConfigError(f"{source}: size must be [H, W] in pixels, got {size!r}")
        fp = cls(**{**data, "size": (int(size[0]), int(size[1])), "source": str(data.get("source") or source)})
        if fp.n_labelled < 2 or fp.n_test < 0 or fp.num_classes < 2 or not fp.epoch_factor >= 1:
            raise ConfigError(f"{source}: implausible fingerprint {fp.to_dict()}")
        return fp


def read_fingerprint(name_or_path: str | Path) -> Fingerprint:
    """A fingerprint YAML file (n_labelled, n_test, size, num_classes, optional rare_classes,
    absent_classes, epoch_factor): a path, or the name of one in ``configs/fingerprints/``."""
    path = named_file(name_or_path, FINGERPRINTS, "fingerprint")
    return Fingerprint.from_dict(read_yaml_mapping(path), str(path))


def fingerprint_of(coco, test, train_ids: list[int] | None = None, rfs_threshold: float | None = None) -> Fingerprint:
    """The fingerprint of a labelled ``coco`` file and its ``test`` file; ``train_ids`` (fold 0's
    training images) and ``rfs_threshold`` give the epoch length of repeat-factor sampling."""
    from pipeline.data import common_image_size
    from pipeline.data.copypaste import class_image_counts, repeat_factors

    ids = coco.image_ids
    counts = class_image_counts(coco, ids)[1:]  # Background is in every image
    rare = int(((counts > 0) & (counts < RARE_SHARE * len(ids))).sum())
    factor = 1.0
    if rfs_threshold and train_ids:
        factor = float(repeat_factors(coco, train_ids, rfs_threshold).sum()) / len(train_ids)
    return Fingerprint(
        n_labelled=len(ids),
        n_test=len(test.images),
        size=common_image_size(coco),
        num_classes=coco.num_classes,
        rare_classes=rare,
        absent_classes=int((counts == 0).sum()),
        epoch_factor=round(factor, 4),
        source=str(coco.path),
    )
