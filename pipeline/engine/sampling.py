"""Deterministic sampling: the order of an epoch and each sample's augmentation depend only
on (seed, epoch, index), never on history, so a resumed run reproduces an uninterrupted one.

The epoch travels with every sampled index (the sampler yields ``(epoch, index)`` pairs):
loader workers that persist across epochs never see attributes set on the dataset in the
main process, but they do receive the indices.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**31 - 1)


class EpochSeededDataset(Dataset):
    """Wraps a dataset whose items are drawn as ``(epoch, index)``; the augmentation of the
    item is seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, idx = key
        s = sample_seed(self.seed, epoch, idx)
        transform = getattr(self.base, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed(s)
        random.seed(s)
        np.random.seed(s)
        return self.base[idx]


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Shuffles by (seed, epoch), shards by rank and yields ``(epoch, index)`` pairs."""

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        repeats: np.ndarray | None = None,
    ):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.repeats = None if repeats is None else np.asarray(repeats, dtype=np.float64)
        self.epoch = 0
        length = n if self.repeats is None else int(round(float(self.repeats.sum())))
        self.per_rank = length // world if drop_last else math.ceil(length / world)

    def _repeated(self, g: torch.Generator) -> list[int]:
        """Each index floor(r) times, plus distinct extra draws weighted by the fractional parts, so
        every epoch has the same length and index i appears r_i times on average."""
        base = np.floor(self.repeats).astype(np.int64)
        out = np.repeat(np.arange(self.n), base).tolist()
        frac = torch.from_numpy(self.repeats - base)
        extra = int(round(float(self.repeats.sum()))) - len(out)
        if extra > 0 and float(frac.sum()) > 0:
            out += torch.multinomial(frac, min(extra, int((frac > 0).sum())), replacement=False, generator=g).tolist()
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """This rank's indices of the current epoch."""
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        pool = list(range(self.n)) if self.repeats is None else self._repeated(g)
        if self.shuffle:
            order = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        else:
            order = pool
        total = self.per_rank * self.world
        order = (order + order[: max(0, total - len(order))])[:total]
        return order[self.rank : total : self.world]

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order()])

    def __len__(self) -> int:
        return self.per_rank
