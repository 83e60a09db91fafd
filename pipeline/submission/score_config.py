"""The scoring stage's settings (``make score``): importable without the stage, as the auto-pilot builds them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError
from pipeline.data import MASK_RULES
from pipeline.submission.formats import check_format_options


@dataclass
class ScoreConfig:
    sub: str = ""
    gt: str = ""  # COCO file with annotations, or a folder of label-map PNGs
    data_dir: str = "data/demo"
    test_ann: str = "test.json"
    format: str = "auto"
    order: str = "F"
    dense_size: list[int] = field(default_factory=lambda: [256, 256])
    image_level: bool = False
    mask_rule: str | None = None  # rule of a COCO ground truth; None: the manifest's, else area
    out_json: str | None = None  # also write the result (and per-image confusion matrices, .npz beside it)

    def validate(self) -> None:
        if not self.sub:
            raise ConfigError("sub is required (a submission CSV such as submissions/<name>.csv)")
        if not self.gt:
            raise ConfigError("gt is required (a COCO file with annotations or a folder of label-map PNGs)")
        check_format_options(self.format, self.order, self.dense_size, allow_auto=True)
        if self.mask_rule is not None and self.mask_rule not in MASK_RULES:
            raise ConfigError(f"mask_rule: unknown {self.mask_rule!r}; known: {', '.join(MASK_RULES)}")
