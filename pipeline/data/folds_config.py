"""The folds stage's settings (``make folds``): importable without the stage, as the auto-pilot builds them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import ConfigError
from pipeline.data.similarity import SimilarityParams


@dataclass
class FoldsConfig:
    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    out_dir: str = "folds"
    k: int = 5
    seed: int = 42
    group_by: str | None = None  # None, "folder" (the batch folder of file_name) or "similar" (look-alike images)
    similarity_threshold: int | None = None  # group_by=similar: max pHash+dHash distance (None: SimilarityParams')
    similarity_max_group: int | None = None  # group_by=similar: largest group from weak links (None: 5% of images)
    groups_csv: str | None = None  # optional CSV with columns file_name,group
    cache_dir: str = ".cache/masks"
    mask_rule: str = "area"  # ground-truth mask rule (pipeline.data.MASK_RULES): area | polygon_length
    pixel_stats: bool = True

    def validate(self) -> None:
        if self.k < 2:
            raise ConfigError(f"k must be at least 2, got {self.k}")
        if self.group_by not in (None, "folder", "similar"):
            raise ConfigError(f"group_by must be null, 'folder' or 'similar', got {self.group_by!r}")
        self.similarity_params()  # raises ConfigError on bad similarity settings

    def similarity_params(self) -> SimilarityParams:
        extra = {} if self.similarity_threshold is None else {"threshold": self.similarity_threshold}
        if self.similarity_threshold is not None and self.similarity_threshold < SimilarityParams.strict:
            extra["strict"] = self.similarity_threshold
        return SimilarityParams(max_group=self.similarity_max_group, **extra)
