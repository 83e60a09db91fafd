"""Submission validator: ``make validate SUB=submissions/<name>.csv``.

Checks a submission CSV against ``test.json`` (README, Contracts: submissions) and
lists every problem with the CSV line number (the header is line 1) and the image:

* the file exists, is readable UTF-8 CSV and its header is exactly the format's;
* every test image is present, exactly once per required row (rle: one row per image and
  per category; dense: one row per image), no other images, no duplicate rows;
* rle: class ids are the categories' COCO ids; ``EncodedPixels`` are well-formed
  ``start length`` pairs, sorted, non-overlapping and inside the image
  (:func:`pipeline.submission.rle.rle_problem`), and no pixel is claimed by two classes of the
  same image;
* dense: exactly ``H*W`` integers (``dense_size``), each a class index in ``[0, K)``.

The file is read row by row with the ``csv`` module; only the run lists of the image
whose rows are being read are held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.errors import PipelineError
from pipeline.data import load_coco
from pipeline.submission.formats import (
    check_format_options,
    format_problems,
    read_format,
    validate_submission,
)

log = logging.getLogger(__name__)


@dataclass
class ValidateConfig:
    sub: str = ""
    data_dir: str = "data/demo"
    test_ann: str = "test.json"
    format: str = "auto"  # auto: detected from the header
    order: str = "F"
    dense_size: list[int] = field(default_factory=lambda: [256, 256])
    max_report: int = 20

    def validate(self) -> None:
        if not self.sub:
            raise ConfigError("sub is required (a submission CSV such as submissions/<name>.csv)")
        check_format_options(self.format, self.order, self.dense_size, allow_auto=True)
        if self.max_report < 1:
            raise ConfigError(f"max_report must be at least 1, got {self.max_report}")


def run(cfg: ValidateConfig) -> list[str]:
    """Validate ``cfg.sub``; raises PipelineError listing the problems, returns [] when it is valid."""
    coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
    problems = validate_submission(cfg.sub, coco, cfg.format, cfg.order, cfg.dense_size)
    if problems:
        raise PipelineError(format_problems(cfg.sub, problems, cfg.max_report))
    fmt = read_format(cfg.sub, cfg.format)
    log.info("%s is a valid %s submission for the %d images of %s", cfg.sub, fmt, len(coco.images), coco.path)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(ValidateConfig, run, argv, "Check a submission CSV against test.json")


if __name__ == "__main__":
    raise SystemExit(main())
