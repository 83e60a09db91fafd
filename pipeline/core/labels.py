"""Label-map conventions every floor shares (README, Contracts: metric)."""

from __future__ import annotations

IGNORE_INDEX = 255  # ground-truth pixels of this value are scored by no metric and trained by no loss
