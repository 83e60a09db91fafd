"""Ensemble members and their fusion, tuned on out-of-fold predictions.

A member is an experiment folder (all its folds) or a single fold run: its out-of-fold stores
cover the labelled images, its test prediction is the mean of its folds' test stores.
:class:`Fusion` combines members' probabilities (weighted mean of probabilities, or hard
voting), optionally with a per-class bias on log-probabilities; :class:`OofCache` holds every
member's OOF maps in one file so that weights can be tuned with Optuna quickly.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.layout import ENSEMBLE_WEIGHTS, RunFolder, is_store
from pipeline.core.records import EnsembleRecord
from pipeline.core.registry import Registry
from pipeline.data import CocoData, ProbReader, read_image, resize_nearest
from pipeline.evaluation.metrics import confusion_matrix, mean_iou

log = logging.getLogger(__name__)


AUTO_TTA = "auto"  # a stage's tta=auto: the only TTA present in each member
LOG_EPS = 1e-6  # floor of probabilities before the log when a bias is applied
VOTE_TIE = 1e-4  # weight of the mean probability that breaks ties between vote tallies


def biased_probabilities(probs: np.ndarray, bias: np.ndarray | Sequence[float] | None) -> np.ndarray:
    """``probs`` (K x ...) with a per-class bias added to their logarithm, renormalised over K
    (as the fusion decides with a bias); ``probs`` itself without a bias."""
    if bias is None:
        return probs
    shape = (-1,) + (1,) * (probs.ndim - 1)
    logits = np.log(np.maximum(probs, np.float32(LOG_EPS))) + np.asarray(bias, np.float32).reshape(shape)
    out = np.exp(logits - logits.max(0, keepdims=True))
    out /= out.sum(0, keepdims=True)
    return out


class MeanMethod:
    """argmax of the weighted mean of the members' probabilities (+ bias on log-probabilities)."""

    arrays = 2  # work arrays: the weighted sum, a term

    def add(self, fusion: Fusion, work: tuple[np.ndarray, ...], p: np.ndarray, w: float, scale: float) -> None:
        acc, term = work[0], work[1]
        np.multiply(p, np.float32(w * scale), out=term)
        acc += term

    def score(self, fusion: Fusion, work: tuple[np.ndarray, ...]) -> np.ndarray:
        score = work[0]
        if fusion.bias is not None:
            np.maximum(score, np.float32(LOG_EPS), out=score)
            np.log(score, out=score)
            score += fusion.bias_of(score.ndim)
        return score


class VoteMethod(MeanMethod):
    """Weighted hard vote of the members' argmax maps; ties go to the weighted mean probability."""

    arrays = 3  # + the vote tallies

    def add(self, fusion: Fusion, work: tuple[np.ndarray, ...], p: np.ndarray, w: float, scale: float) -> None:
        super().add(fusion, work, p, w, scale)
        term = work[1]
        if fusion.bias is None:
            votes = np.argmax(p, axis=0)
        else:
            np.multiply(p, np.float32(scale), out=term)
            np.maximum(term, np.float32(LOG_EPS), out=term)
            np.log(term, out=term)
            term += fusion.bias_of(term.ndim)
            votes = np.argmax(term, axis=0)
        flat = work[2].reshape(work[2].shape[0], -1)
        flat[votes.reshape(-1), np.arange(flat.shape[1])] += np.float32(w)

    def score(self, fusion: Fusion, work: tuple[np.ndarray, ...]) -> np.ndarray:
        score = work[0]
        score *= np.float32(VOTE_TIE)
        score += work[2]
        return score


METHODS: Registry = Registry("ensemble method")
METHODS.add("mean", MeanMethod, "argmax of the weighted mean of the members' probabilities")
METHODS.add("vote", VoteMethod, "weighted hard vote of the members' argmax maps (ties: weighted mean probability)")


CHUNK_PIXELS = 1 << 18  # pixels per read of the OOF cache (all members, all classes)


WEIGHT_RANGE = (0.01, 1.0)  # raw weights sampled by the tuner, then normalised


WEIGHTS_FILE = ENSEMBLE_WEIGHTS


def split_paths(items: Iterable[str]) -> list[str]:
    """``["a b", "c,d"]`` -> ``["a", "b", "c", "d"]`` (Makefile variables hold space-separated lists)."""
    return [p for item in items for p in str(item).replace(",", " ").split()]


@dataclass
class Member:
    """One ensemble member: its OOF stores (union) and test stores (averaged)."""

    name: str
    path: str
    tta: str | None
    oof_stores: list[str]
    test_stores: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "tta": self.tta,
            "oof_stores": list(self.oof_stores),
            "test_stores": list(self.test_stores),
        }


def _tta_names(folds: Sequence[Path], split: str) -> set[str]:
    return {tta for f in folds for tta in RunFolder(f).stores(split)}


def find_member(
    path: str,
    tta: str | None = None,
    name: str | None = None,
    need_oof: bool = True,
    folds: Sequence[Path] | None = None,
) -> Member:
    """Resolve an experiment (or fold) folder into a :class:`Member`; errors name the folder.

    ``tta``: which ``oof_<tta>``/``test_<tta>`` stores (``none``: those without TTA); None or
    ``auto``: the only TTA present.  ``need_oof=False`` (submitting a plain average) accepts a
    member without OOF stores.  ``folds``: the fold folders of the experiment ``path`` to use
    (default: one fold folder itself, or every ``fold*/`` of an experiment folder).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise PipelineError(
            f"{folder}: ensemble member folder not found (expected runs/<experiment> or runs/<experiment>/fold<k>)"
        )
    if folds:
        folds = sorted(Path(f) for f in folds)
    elif RunFolder(folder).is_run():
        folds = [folder]
    else:
        folds = sorted(d for d in folder.glob("fold*") if d.is_dir())
        if not folds:
            raise PipelineError(
                f"{folder}: no fold*/ folders (expected runs/<experiment>/fold<k>/ with oof/ and test_<tta>/)"
            )
    if tta in (None, AUTO_TTA):
        names = _tta_names(folds, "test") or _tta_names(folds, "val")
        if len(names) > 1:
            raise PipelineError(
                f"{folder}: several TTA stores ({', '.join(sorted(names))}); choose one with tta=<name>"
            )
        tta = next(iter(names), None)
    oof, test = [], []
    for fold in map(RunFolder, folds):
        tta_oof = fold.store("val", tta) if tta is not None else None
        if tta_oof is not None and is_store(tta_oof):
            oof.append(str(tta_oof))
        elif is_store(fold.oof):
            oof.append(str(fold.oof))
        if tta is not None and is_store(fold.store("test", tta)):
            test.append(str(fold.store("test", tta)))
    if not oof and need_oof:
        raise PipelineError(
            f"{folder}: no out-of-fold store in {', '.join(str(f) for f in folds)} "
            f"(expected oof/ or oof_{tta or '<tta>'}/ written by make train / make predict SPLIT=val)"
        )
    if not test and need_oof:
        log.warning(
            "%s: no test_%s/ stores: the ensemble can be tuned but not submitted until make predict SPLIT=test is run",
            folder,
            tta or "<tta>",
        )
    label = name or (
        f"{folder.parent.name}/{folder.name}" if folds == [folder] and folder.name.startswith("fold") else folder.name
    )
    return Member(label, str(path), tta, oof, test)


def group_member_paths(paths: Sequence[str]) -> list[tuple[str, list[Path] | None]]:
    """``paths`` as members, in order: fold folders of one experiment (``runs/a/fold0 runs/a/fold1``)
    become one member ``(runs/a, [its folds])`` whose OOF covers every fold given; an experiment
    folder or any other path stays a member of its own ``(path, None)``."""
    groups: dict[str, tuple[str, list[Path] | None]] = {}
    for p in split_paths(paths):
        folder = Path(p)
        if folder.is_dir() and folder.name.startswith("fold") and RunFolder(folder).is_run():
            key = f"folds of {folder.parent}"
            member = groups.setdefault(key, (str(folder.parent), []))
            if folder not in member[1]:
                member[1].append(folder)
        else:  # every occurrence is a member (the same experiment twice is two members, renamed)
            groups[f"{len(groups)}: {p}"] = (p, None)
    return list(groups.values())


def resolve_members(paths: Sequence[str], tta: str | None = None, need_oof: bool = True) -> list[Member]:
    """Members of ``paths`` (fold folders of one experiment grouped, :func:`group_member_paths`) with
    unique names."""
    members = []
    for path, folds in group_member_paths(paths):
        if folds is not None and len(folds) == 1:  # one fold given: the fold folder is the member
            path, folds = str(folds[0]), None
        members.append(find_member(path, tta, need_oof=need_oof, folds=folds))
    seen: dict[str, int] = {}
    for m in members:
        if m.name in seen:
            seen[m.name] += 1
            m.name = f"{m.name}#{seen[m.name]}"
        else:
            seen[m.name] = 1
    return members


def open_stores(folders: Sequence[str], class_names: Sequence[str]) -> list[ProbReader]:
    """Readers of ``folders``; PipelineError when a store's classes differ from ``class_names``."""
    readers = [ProbReader(f) for f in folders]
    for r in readers:
        if list(r.class_names) != list(class_names):
            raise PipelineError(
                f"{r.folder}: classes {r.class_names} differ from the annotation file's {list(class_names)}"
            )
    return readers


class Workspace:
    """Float32 work arrays, kept between calls: views of flat buffers that only grow."""

    def __init__(self) -> None:
        self._flat: list[np.ndarray] = []

    def arrays(self, shape: tuple[int, ...], n: int) -> tuple[np.ndarray, ...]:
        """``n`` zeroed arrays of ``shape``."""
        size = int(np.prod(shape))
        if self._flat and self._flat[0].size < size:
            self._flat = []
        while len(self._flat) < n:
            self._flat.append(np.empty(max(size, self._flat[0].size if self._flat else 0), dtype=np.float32))
        views = tuple(f[:size].reshape(shape) for f in self._flat[:n])
        for v in views:
            v.fill(0)
        return views


class Fusion:
    """Combines the members' probabilities into a class-index map (``mean`` or ``vote``).

    ``weights`` are normalised to sum to one; ``bias`` (K values or None) is added to
    log-probabilities.  Members are consumed one at a time and the work arrays are kept
    between calls of the same shape, so memory does not grow with the number of members
    and repeated calls do not churn the allocator.  Not thread-safe.
    """

    def __init__(self, weights: Sequence[float], bias: Sequence[float] | None = None, method: str = "mean"):
        self._method = METHODS.build(method)
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
            raise PipelineError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}")
        self.weights = w / w.sum()
        self.bias = None if bias is None or not np.any(np.asarray(bias)) else np.asarray(bias, dtype=np.float32)
        self.method = METHODS.key(method)
        self._work = Workspace()

    @classmethod
    def singles(cls, n: int, method: str = "mean") -> list[Fusion]:
        """One fusion per member, each that member alone (its own predictions, scored as a fusion)."""
        return [cls(np.eye(n)[i], None, method) for i in range(n)]

    @classmethod
    def of(cls, record: EnsembleRecord) -> Fusion:
        """The fusion an ensemble file records: its members' weights, its bias and method."""
        return cls(record.weights, record.bias, record.method)

    def active(self) -> list[int]:
        """Members whose weight is non-zero (the others need not be loaded)."""
        return [i for i, w in enumerate(self.weights) if w > 0]

    def bias_of(self, ndim: int) -> np.ndarray:
        return self.bias.reshape((-1,) + (1,) * (ndim - 1))

    def __call__(
        self,
        members: Iterable[np.ndarray],
        scale: float = 1.0,
        indices: Sequence[int] | None = None,
        workspace: Workspace | None = None,
    ) -> np.ndarray:
        """Class-index map of K x ... probabilities, one array per member in ``indices`` order.

        ``scale`` converts stored values to probabilities (1/255 for uint8).  ``indices``
        says which members the arrays belong to (default: every member in order).
        ``workspace`` lets several fusions share their work arrays (default: the fusion's own).
        """
        indices = range(len(self.weights)) if indices is None else indices
        workspace = workspace or self._work
        work: tuple[np.ndarray, ...] | None = None
        count = 0
        for i, p in zip(indices, members, strict=False):
            if work is None:
                work = workspace.arrays(tuple(p.shape), self._method.arrays)
            count += 1
            self._method.add(self, work, p, float(self.weights[i]), scale)
        if work is None:
            raise PipelineError("no member probabilities to combine")
        if count != len(indices):
            raise PipelineError(f"expected probabilities of {len(indices)} members, got {count}")
        score = self._method.score(self, work)
        labels = np.argmax(score, axis=0)
        return labels.astype(np.uint8 if score.shape[0] <= 256 else np.int64)


class FusedOof:
    """One fusion's out-of-fold predictions as a post-processor is tuned on them
    (:class:`pipeline.inference.postprocessing.OofMaps`): class maps, or probabilities with the images."""

    def __init__(self, cache: OofCache, fusion: Fusion, coco: CocoData):
        self.cache, self.fusion, self.coco = cache, fusion, coco

    def label_maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(labels, gt) for _, labels, gt in self.cache.label_maps(self.fusion)]

    def samples(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        import cv2

        out = []
        for image_id, probs, gt in self.cache.fused_probabilities(self.fusion):
            image = read_image(self.coco.image_path(image_id))
            out.append((probs, cv2.resize(image, gt.shape[::-1], interpolation=cv2.INTER_AREA), gt))
        return out


class OofCache:
    """All members' OOF probabilities at the stored resolution, as uint8, in one file on disk.

    Layout: chunks of consecutive images; a chunk of P pixels is P bytes of ground truth
    followed by an M x K x P uint8 array.  :meth:`confusions` (one matrix per fusion) and
    :meth:`per_image_confusions` (one per image and fusion) stream over the chunks with one
    reusable buffer.
    """

    def __init__(
        self,
        members: Sequence[Member],
        coco: CocoData,
        image_ids: Sequence[int] | None = None,
        folder: str | Path = ".",
        max_images: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        if coco.num_classes > 255:
            raise PipelineError(
                f"{coco.path}: {coco.num_classes} classes; the OOF cache holds class indices as uint8 (at most 255)"
            )
        self.members = list(members)
        self.num_classes = coco.num_classes
        self.class_names = coco.class_names
        owners = [self._owners(m, coco) for m in self.members]
        common = set(coco.image_ids).intersection(*[set(o) for o in owners])
        for m, o in zip(self.members, owners, strict=False):
            unscored = len(set(o) - set(coco.image_ids))
            if unscored:
                log.warning("%s: %d OOF images are not in %s and are left out", m.name, unscored, coco.path.name)
        ids = sorted(common if image_ids is None else common & {int(i) for i in image_ids})
        if not ids:
            raise PipelineError(
                "the members have no out-of-fold image in common with "
                f"{coco.path} "
                f"({', '.join(f'{m.name}: {len(o)}' for m, o in zip(self.members, owners, strict=False))} OOF images)"
            )
        counts = [len(o) for o in owners]
        if len(ids) < max(counts):
            log.info(
                "scoring on the %d images every member has OOF probabilities for (members have %s)",
                len(ids),
                ", ".join(str(c) for c in counts),
            )
        if max_images is not None and len(ids) > max_images:
            rng = np.random.default_rng(seed)
            ids = sorted(int(i) for i in rng.choice(ids, size=max_images, replace=False))
        self.image_ids = ids
        self.sizes = {
            i: max(
                ((int(o[i].row(i).stored_height), int(o[i].row(i).stored_width)) for o in owners),
                key=lambda s: s[0] * s[1],
            )
            for i in ids
        }
        self.n_pixels = sum(h * w for h, w in self.sizes.values())
        self._build(owners, coco, Path(folder), progress)

    @staticmethod
    def _owners(member: Member, coco: CocoData) -> dict[int, ProbReader]:
        owner: dict[int, ProbReader] = {}
        duplicates = 0
        for reader in open_stores(member.oof_stores, coco.class_names):
            for image_id in reader.image_ids:
                if image_id in owner:
                    duplicates += 1
                    continue
                owner[image_id] = reader
        if duplicates:
            log.warning(
                "%s: %d images have OOF probabilities in more than one fold; the first fold's are used",
                member.name,
                duplicates,
            )
        return owner

    def _build(self, owners: list[dict[int, ProbReader]], coco: CocoData, folder: Path, progress: bool) -> None:
        from tqdm import tqdm

        m, k = len(self.members), self.num_classes
        cap = max(CHUNK_PIXELS, max(h * w for h, w in self.sizes.values()))
        self.buffer = np.empty(cap * (1 + m * k), dtype=np.uint8)
        self.workspace = Workspace()
        folder.mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=".oof-cache-", suffix=".u8", dir=folder)
        self.chunks: list[tuple[int, int]] = []  # (byte offset, pixels)
        self.chunk_images: list[list[int]] = []  # the images of each chunk, in order
        offset = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                group: list[int] = []
                pixels = 0
                for image_id in tqdm(
                    self.image_ids, desc="caching OOF probabilities", disable=not progress, leave=False
                ):
                    h, w = self.sizes[image_id]
                    if group and pixels + h * w > cap:
                        offset += self._write_chunk(fh, group, pixels, owners, coco, offset)
                        group, pixels = [], 0
                    group.append(image_id)
                    pixels += h * w
                if group:
                    offset += self._write_chunk(fh, group, pixels, owners, coco, offset)
        except BaseException:
            self.close()
            raise
        log.info(
            "cached OOF probabilities of %d members x %d images (%.1f MiB on disk, %d chunks)",
            m,
            len(self.image_ids),
            offset / 2**20,
            len(self.chunks),
        )

    def _views(self, pixels: int) -> tuple[np.ndarray, np.ndarray]:
        m, k = len(self.members), self.num_classes
        gt = self.buffer[:pixels]
        probs = self.buffer[pixels : pixels * (1 + m * k)].reshape(m, k, pixels)
        return gt, probs

    def _write_chunk(self, fh, group: list[int], pixels: int, owners, coco: CocoData, offset: int) -> int:
        gt, probs = self._views(pixels)
        start = 0
        for image_id in group:
            h, w = self.sizes[image_id]
            gt[start : start + h * w] = resize_nearest(coco.mask(image_id), (h, w)).reshape(-1)
            for j, owner in enumerate(owners):
                probs[j, :, start : start + h * w] = (
                    owner[image_id].load_uint8(image_id, (h, w)).reshape(self.num_classes, -1)
                )
            start += h * w
        size = pixels * (1 + len(self.members) * self.num_classes)
        fh.write(memoryview(self.buffer[:size]))
        self.chunks.append((offset, pixels))
        self.chunk_images.append(list(group))
        return size

    def _stream(self) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """(image ids, ground truth, M x K x P probabilities) of every chunk, read into the one buffer."""
        k = self.num_classes
        with open(self.path, "rb", buffering=0) as fh:
            for (offset, pixels), group in zip(self.chunks, self.chunk_images, strict=True):
                size = pixels * (1 + len(self.members) * k)
                fh.seek(offset)
                view = memoryview(self.buffer)[:size]
                got = 0
                while got < size:
                    n = fh.readinto(view[got:])
                    if not n:
                        raise PipelineError(f"{self.path}: OOF cache file is truncated")
                    got += n
                gt, probs = self._views(pixels)
                yield group, gt, probs

    def _labels(self, fusion: Fusion, probs: np.ndarray) -> np.ndarray:
        active = fusion.active()
        return fusion((probs[i] for i in active), scale=1 / 255, indices=active, workspace=self.workspace)

    def confusions(self, fusions: Sequence[Fusion]) -> list[np.ndarray]:
        """One confusion matrix per fusion, in one streaming pass over the cache."""
        k = self.num_classes
        cms = [np.zeros((k, k), dtype=np.int64) for _ in fusions]
        for _, gt, probs in self._stream():
            for cm, fusion in zip(cms, fusions, strict=False):
                cm += confusion_matrix(self._labels(fusion, probs), gt, k)
        return cms

    def per_image_confusions(self, fusions: Sequence[Fusion]) -> list[np.ndarray]:
        """Per fusion, an ``(n_images, K, K)`` int64 array: one confusion matrix per image, in
        :attr:`image_ids` order (the unit of :mod:`pipeline.evaluation.selection`); one streaming
        pass, and their sum over images is :meth:`confusions`."""
        k = self.num_classes
        index = {image_id: j for j, image_id in enumerate(self.image_ids)}
        cms = [np.zeros((len(self.image_ids), k, k), dtype=np.int64) for _ in fusions]
        for group, gt, probs in self._stream():
            for out, fusion in zip(cms, fusions, strict=False):
                labels = self._labels(fusion, probs)
                start = 0
                for image_id in group:
                    h, w = self.sizes[image_id]
                    end = start + h * w
                    out[index[image_id]] = confusion_matrix(labels[start:end], gt[start:end], k)
                    start = end
        return cms

    def confusion(self, fusion: Fusion) -> np.ndarray:
        return self.confusions([fusion])[0]

    def fused_probabilities(self, fusion: Fusion) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(image id, fused probabilities K x h x w float32, ground truth) per image at the stored
        OOF size: the weighted mean of the members, the bias (if any) applied to log-probabilities."""
        for group, gt, probs in self._stream():
            start = 0
            for image_id in group:
                h, w = self.sizes[image_id]
                end = start + h * w
                fused = np.zeros((self.num_classes, end - start), np.float32)
                for j in fusion.active():
                    fused += np.float32(fusion.weights[j] / 255.0) * probs[j, :, start:end]
                fused = biased_probabilities(fused, fusion.bias)
                yield image_id, fused.reshape(self.num_classes, h, w), gt[start:end].reshape(h, w).copy()
                start = end

    def label_maps(self, fusion: Fusion) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(image id, fused class map, ground truth), both h x w at the stored OOF size, per image."""
        for group, gt, probs in self._stream():
            labels = self._labels(fusion, probs)
            start = 0
            for image_id in group:
                h, w = self.sizes[image_id]
                end = start + h * w
                yield image_id, labels[start:end].reshape(h, w).copy(), gt[start:end].reshape(h, w).copy()
                start = end

    def close(self) -> None:
        path = getattr(self, "path", None)
        if path and os.path.exists(path):
            os.unlink(path)

    def __enter__(self) -> OofCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def greedy_weights(cache: OofCache, method: str, rounds: int) -> tuple[np.ndarray, int]:
    """Ensemble selection with replacement (Caruana et al., 2004): from the empty ensemble, each round
    adds the member (again, if it is the best) whose addition gives the highest OOF mIoU; it stops when no
    addition raises it or after ``rounds`` additions.  Weights are how often each member was added;
    also returns the fusions it scored."""
    m = len(cache.members)
    counts, best, scored = np.zeros(m), -1.0, 0
    for _ in range(max(1, rounds)):
        trials = [Fusion(counts + np.eye(m)[j], None, method) for j in range(m)]
        scores = [mean_iou(cm) for cm in cache.confusions(trials)]  # one pass over the cache a round
        scored += m
        j = int(np.argmax(scores))  # the first of equals
        if scores[j] <= best:
            break
        counts[j] += 1
        best = scores[j]
    return counts / counts.sum(), scored


def tune_weights(cache: OofCache, method: str, n_trials: int, seed: int) -> tuple[np.ndarray, float]:
    """Best normalised weights found by TPE (the plain average is the first trial)."""
    optuna = _quiet_optuna()
    m = len(cache.members)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({f"w{i}": 1.0 for i in range(m)})

    def objective(trial) -> float:
        raw = np.array([trial.suggest_float(f"w{i}", *WEIGHT_RANGE) for i in range(m)])
        return mean_iou(cache.confusion(Fusion(raw, None, method)))

    study.optimize(objective, n_trials=max(n_trials, 1), show_progress_bar=False)
    raw = np.array([study.best_params[f"w{i}"] for i in range(m)])
    return raw / raw.sum(), float(study.best_value)


def load_ensemble(path: str | Path) -> EnsembleRecord:
    """Read and check a ``weights.yaml`` written by :func:`run`; errors name the file."""
    record = EnsembleRecord.read(path)
    if record.method not in METHODS:
        raise PipelineError(f"{path}: unknown method {record.method!r}; known: {', '.join(METHODS.names())}")
    return record
