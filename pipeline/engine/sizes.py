"""The size schedule of a training run: progressive resizing trains the first share of a run's epochs
at a smaller size, then the full size; once a run has trained at full size, lengthening it (a time
budget that finds room) does not go back to the small size.  Shared by the trainer (the size of each
epoch's inputs) and the time budget (what an epoch at each size costs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SizeSchedule:
    full: tuple[int, int]  # the full-size training inputs (H, W): the crop when training on windows
    low: tuple[int, int]  # the progressive phase's size (equal to ``full`` without one)
    share: float = 0.0  # share of a run's epochs trained at ``low``
    low_until: int | None = None  # the first epoch trained at full size, once there is one

    @property
    def progressive(self) -> bool:
        return self.low != self.full

    @property
    def low_area_ratio(self) -> float:
        """Pixels of a low-size input per pixel of a full-size one."""
        return self.low[0] * self.low[1] / (self.full[0] * self.full[1])

    def low_epochs(self, end_epoch: int) -> int:
        """How many of the first epochs of a run that ends at ``end_epoch`` train at ``low``."""
        if not self.progressive:
            return 0
        planned = int(self.share * end_epoch)
        return planned if self.low_until is None else min(planned, self.low_until)

    def size(self, epoch: int, end_epoch: int) -> tuple[int, int]:
        """Size of the training inputs of ``epoch`` in a run that ends at ``end_epoch``."""
        return self.low if epoch < self.low_epochs(end_epoch) else self.full

    def start_epoch(self, epoch: int, end_epoch: int) -> None:
        """Note the first epoch at full size: from there on the run stays at full size."""
        if self.low_until is None and self.size(epoch, end_epoch) == self.full:
            self.low_until = epoch
