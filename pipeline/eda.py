"""EDA stage: counts, class balance, object sizes and sample overlays of a COCO file.

``run(EDAConfig(...))`` reads the annotation file (``load_coco``), optionally decodes every
image (``verify_images``), reads the ground-truth maps through the mask cache and writes
into ``out_dir``:

* ``report.md``: counts, tables and links to the plots;
* ``classes.csv``: one row per class (Background first): images, instances, object
  areas split small / medium / large, visible pixels and pixel share;
* ``summary.csv``: dataset-level ``key,value`` rows;
* PNG plots: ``annotations_per_image.png``, ``class_instances.png``,
  ``class_pixel_share.png``, ``object_area.png``, ``cooccurrence.png``,
  ``samples.png``, when the images have more than one size, ``image_sizes.png``, and when
  some images look alike, ``similar_groups.png``.

Instances, images per class, object areas and co-occurrence come from the annotations;
pixel shares come from the rasterized ground-truth maps (the contest's mask rule, so
occluded pixels count for the object on top).  Object areas use the absolute COCO
thresholds (small < 32^2, medium < 96^2, large >= 96^2 pixels).  Near-duplicates and
frames of one sequence are found by ``pipeline.data.similarity_groups``, the function that
``make folds ARGS="group_by=similar"`` keeps together in one fold.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.io import atomic_write_text
from pipeline.core.tables import format_table, markdown_table
from pipeline.data import (
    CocoData,
    MaskCache,
    SimilarityGroups,
    SimilarityParams,
    annotation_area,
    load_coco,
    read_image,
    similarity_groups,
    verify_images,
)
from pipeline.evaluation.visual import AREA_MEDIUM, AREA_SMALL, area_bin, class_palette, figure, overlay, save_png

log = logging.getLogger(__name__)


PLOTS = {
    "annotations_per_image": "annotations_per_image.png",
    "class_instances": "class_instances.png",
    "class_pixel_share": "class_pixel_share.png",
    "object_area": "object_area.png",
    "image_sizes": "image_sizes.png",
    "cooccurrence": "cooccurrence.png",
    "samples": "samples.png",
    "similar_groups": "similar_groups.png",
}


@dataclass
class EDAConfig:
    """Settings of the EDA stage."""

    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    out_dir: str = "reports/eda"
    n_samples: int = 12
    seed: int = 0
    check_images: bool = True
    cache_dir: str = ".cache/masks"
    mask_rule: str = "area"  # ground-truth mask rule (pipeline.data.MASK_RULES): area | polygon_length
    similarity: bool = True  # near-duplicate / sequence groups (reads every image: needs check_images=true)
    similarity_threshold: int | None = None  # max pHash+dHash distance (None: SimilarityParams' default)

    def similarity_params(self) -> SimilarityParams:
        if self.similarity_threshold is None:
            return SimilarityParams()
        return SimilarityParams(
            threshold=self.similarity_threshold, strict=min(SimilarityParams.strict, self.similarity_threshold)
        )

    def validate(self) -> None:
        self.similarity_params()  # raises ConfigError on a bad threshold
        if self.n_samples < 0:
            raise ConfigError(f"n_samples: must be 0 or more, got {self.n_samples}")
        if not str(self.out_dir).strip():
            raise ConfigError("out_dir: must not be empty")


@dataclass
class Stats:
    """Per-class and per-image numbers of one annotation file (class index order, Background first)."""

    class_names: list[str]
    category_ids: list[int | None]
    images: np.ndarray  # (K,) images with an instance of the class (Background: with background pixels)
    instances: np.ndarray  # (K,)
    area_bins: np.ndarray  # (K, 3) small / medium / large instance counts
    area_sum: np.ndarray  # (K,) summed annotation areas
    pixels: np.ndarray  # (K,) visible pixels in the ground-truth maps
    cooccurrence: np.ndarray  # (K, K) images containing both classes
    anns_per_image: np.ndarray  # (N,)
    sizes: Counter = field(default_factory=Counter)  # (height, width) -> images

    @property
    def pixel_share(self) -> np.ndarray:
        total = self.pixels.sum()
        return self.pixels / total if total else np.zeros(len(self.pixels))


def collect_stats(coco: CocoData, cache: MaskCache, progress: bool = True) -> Stats:
    """Count instances, images, areas and co-occurrence from annotations, pixels from the maps."""
    from tqdm import tqdm

    k = coco.num_classes
    index = coco.cat_to_index
    n = len(coco.images)
    presence = np.zeros((n, k), np.int64)
    instances = np.zeros(k, np.int64)
    area_bins = np.zeros((k, 3), np.int64)
    area_sum = np.zeros(k, np.float64)
    pixels = np.zeros(k, np.int64)
    anns_per_image = np.zeros(n, np.int64)
    sizes: Counter = Counter()
    for row, im in enumerate(tqdm(coco.images, desc="EDA masks", unit="img", disable=not progress)):
        image_id = int(im["id"])
        h, w = int(im["height"]), int(im["width"])
        sizes[(h, w)] += 1
        anns = coco.annotations(image_id)
        anns_per_image[row] = len(anns)
        for ann in anns:
            c = index[int(ann["category_id"])]
            area = annotation_area(ann, h, w)
            instances[c] += 1
            presence[row, c] = 1
            area_bins[c, area_bin(area)] += 1
            area_sum[c] += area
        counts = cache.class_pixels(image_id)
        pixels += counts
        presence[row, 0] = int(counts[0] > 0)
    return Stats(
        class_names=coco.class_names,
        category_ids=[None] + [int(c["id"]) for c in coco.categories],
        images=presence.sum(axis=0),
        instances=instances,
        area_bins=area_bins,
        area_sum=area_sum,
        pixels=pixels,
        cooccurrence=presence.T @ presence,
        anns_per_image=anns_per_image,
        sizes=sizes,
    )


def class_rows(stats: Stats) -> list[dict[str, Any]]:
    """One dict per class (Background first), the rows of ``classes.csv``."""
    share = stats.pixel_share
    rows = []
    for c, name in enumerate(stats.class_names):
        n_inst = int(stats.instances[c])
        rows.append(
            {
                "class_index": c,
                "class_name": name,
                "category_id": "" if stats.category_ids[c] is None else stats.category_ids[c],
                "images": int(stats.images[c]),
                "instances": n_inst,
                "small": int(stats.area_bins[c, 0]),
                "medium": int(stats.area_bins[c, 1]),
                "large": int(stats.area_bins[c, 2]),
                "mean_area": float(stats.area_sum[c] / n_inst) if n_inst else 0.0,
                "pixels": int(stats.pixels[c]),
                "pixel_share": float(share[c]),
            }
        )
    return rows


# ----------------------------------------------------------------------------- plots
def _bar_width(n: int) -> float:
    return float(min(max(6.0, 0.45 * n + 2.0), 40.0))


def plot_annotations_per_image(stats: Stats, path: Path) -> Path:
    fig = figure(7, 4)
    ax = fig.subplots()
    counts = stats.anns_per_image
    top = int(counts.max()) if counts.size else 0
    ax.hist(counts, bins=np.arange(-0.5, top + 1.5, 1.0), color="#4c72b0", edgecolor="white")
    ax.set_xlabel("annotations per image")
    ax.set_ylabel("images")
    ax.set_title(f"Annotations per image ({len(counts)} images)")
    return save_png(fig, path)


def plot_class_bars(
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    path: Path,
    colours: np.ndarray,
    log_scale: bool = False,
) -> Path:
    fig = figure(_bar_width(len(labels)), 4.5)
    ax = fig.subplots()
    x = np.arange(len(labels))
    bars = ax.bar(x, values, color=colours / 255.0, edgecolor="#333333", linewidth=0.5)
    if len(labels) <= 30:
        fmt = "{:.2%}" if "share" in ylabel else "{:.0f}"
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7)
    positive = [v for v in values if v > 0]
    if log_scale and positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8 if len(labels) <= 30 else 5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_png(fig, path)


def plot_object_area(stats: Stats, path: Path) -> Path:
    names = stats.class_names[1:]
    bins = stats.area_bins[1:]
    fig = figure(_bar_width(len(names)), 4.5)
    ax = fig.subplots()
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    labels = (f"small (< {AREA_SMALL} px)", f"medium (< {AREA_MEDIUM} px)", f"large (>= {AREA_MEDIUM} px)")
    for b, (label, colour) in enumerate(zip(labels, ("#8fbbd9", "#4c72b0", "#1b3a66"), strict=False)):
        ax.bar(x, bins[:, b], bottom=bottom, label=label, color=colour)
        bottom += bins[:, b]
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8 if len(names) <= 30 else 5)
    ax.set_ylabel("instances")
    ax.set_title("Object area per class (absolute COCO thresholds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_png(fig, path)


def plot_image_sizes(stats: Stats, path: Path) -> Path:
    fig = figure(6, 5)
    ax = fig.subplots()
    items = list(stats.sizes.items())
    hs = [h for (h, _), _ in items]
    ws = [w for (_, w), _ in items]
    counts = np.asarray([c for _, c in items], dtype=np.float64)
    ax.scatter(ws, hs, s=20 + 300 * counts / counts.max(), alpha=0.6, color="#4c72b0", edgecolor="#1b3a66")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Image sizes ({len(stats.sizes)} distinct; marker area ~ images)")
    return save_png(fig, path)


def plot_cooccurrence(stats: Stats, path: Path) -> Path:
    names = stats.class_names[1:]
    mat = stats.cooccurrence[1:, 1:]
    side = float(min(max(5.0, 0.5 * len(names) + 2.5), 40.0))
    fig = figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(mat, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    ticks = np.arange(len(names))
    fs = 8 if len(names) <= 30 else 5
    ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=fs)
    ax.set_yticks(ticks, names, fontsize=fs)
    if len(names) <= 20:
        hi = mat.max() if mat.size else 0
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(
                    j,
                    i,
                    str(int(mat[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if mat[i, j] > hi * 0.6 else "white",
                )
    ax.set_title("Class co-occurrence (images containing both; diagonal: images with the class)")
    return save_png(fig, path)


def plot_samples(coco: CocoData, cache: MaskCache, image_ids: Sequence[int], palette: np.ndarray, path: Path) -> Path:
    from matplotlib.patches import Patch

    n = len(image_ids)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    aspect = float(np.median([coco.image(i)["height"] / coco.image(i)["width"] for i in image_ids]))
    cell = 3.2
    fig = figure(cell * cols, rows * (cell * min(max(aspect, 0.25), 4.0) + 0.3) + 0.9, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    present: set[int] = set()
    for ax, image_id in zip(axes, image_ids, strict=False):
        mask = cache.get(image_id)
        present.update(int(v) for v in np.unique(mask) if v)
        ax.imshow(overlay(read_image(coco.image_path(image_id)), mask, palette), interpolation="nearest")
        ax.set_title(str(coco.image(image_id)["file_name"]), fontsize=7)
    for ax in axes:
        ax.axis("off")
    names = coco.class_names
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="#333333", label=names[c]) for c in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle("Samples with ground-truth masks", fontsize=10)
    return save_png(fig, path)


def _thumbnail(path: Path, side: int = 384) -> np.ndarray:
    import cv2

    img = read_image(path)
    scale = side / max(img.shape[:2])
    if scale < 1:
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


def plot_similar_groups(
    coco: CocoData, groups: Sequence[Sequence[int]], path: Path, max_groups: int = 6, max_per_group: int = 6
) -> Path:
    """One row per group (largest first): its first images side by side, file names above."""
    shown = [list(g) for g in groups[:max_groups]]
    cols = max(len(g[:max_per_group]) for g in shown)
    aspect = float(np.median([coco.image(i)["height"] / coco.image(i)["width"] for g in shown for i in g]))
    cell = 2.4
    row_h = cell * min(max(aspect, 0.25), 2.0) + 0.55
    fig = figure(cell * cols, row_h * len(shown) + 0.5, layout="constrained")
    axes = fig.subplots(len(shown), cols, squeeze=False)
    for r, group in enumerate(shown):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= min(len(group), max_per_group):
                continue
            image_id = group[c]
            ax.imshow(_thumbnail(coco.image_path(image_id)), interpolation="bilinear")
            name = str(coco.image(image_id)["file_name"])
            head = f"group {r + 1}: {len(group)} images" + (
                f" (first {max_per_group})" if len(group) > max_per_group else ""
            )
            ax.set_title((head + "\n" if c == 0 else "\n") + name, fontsize=7, loc="left")
    fig.suptitle(f"Look-alike images ({len(shown)} of {len(groups)} groups, largest first)", fontsize=10)
    return save_png(fig, path)


def similar_images(coco: CocoData, cfg: EDAConfig, out: Path, plots: dict[str, Path]) -> SimilarityGroups | None:
    """Groups of look-alike images (None when skipped) and their panel in ``plots``."""
    found = None
    if cfg.similarity and cfg.check_images:
        found = similarity_groups(coco, cfg.similarity_params(), cache_dir=cfg.cache_dir)
    if found is not None and found.groups:
        plots["similar_groups"] = plot_similar_groups(coco, found.groups, out / PLOTS["similar_groups"])
    else:
        (out / PLOTS["similar_groups"]).unlink(missing_ok=True)
    return found


# ----------------------------------------------------------------------------- outputs
def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def summary_rows(
    coco: CocoData, stats: Stats, checked: int | None, similar: SimilarityGroups | None = None
) -> list[dict[str, Any]]:
    per = stats.anns_per_image
    values = {
        "annotation_file": str(coco.path),
        "annotation_digest": coco.digest,
        "images": len(coco.images),
        "images_without_annotations": int((per == 0).sum()),
        "annotations": int(stats.instances.sum()),
        "classes": coco.num_classes,
        "categories": len(coco.categories),
        "annotations_per_image_mean": float(per.mean()) if per.size else 0.0,
        "annotations_per_image_median": float(np.median(per)) if per.size else 0.0,
        "annotations_per_image_max": int(per.max()) if per.size else 0,
        "distinct_image_sizes": len(stats.sizes),
        "most_common_size_hxw": "{}x{}".format(*stats.sizes.most_common(1)[0][0]) if stats.sizes else "",
        "images_checked": "" if checked is None else checked,
        "background_pixel_share": float(stats.pixel_share[0]),
        "similar_multi_image_groups": "" if similar is None else len(similar.groups),
        "similar_images_grouped": "" if similar is None else similar.grouped_images,
        "similar_largest_group": "" if similar is None else similar.largest,
    }
    for k, v in sorted(coco.repairs.items()):
        values[f"repair: {k}"] = v
    return [{"key": k, "value": v} for k, v in values.items()]


def _report_header(coco: CocoData, stats: Stats, checked: int | None) -> list[str]:
    per = stats.anns_per_image
    n_img = len(coco.images)
    lines = [
        f"# EDA: {coco.path.name}",
        "",
        f"- Annotation file: `{coco.path}` (sha1 `{coco.digest[:12]}`)",
        f"- Images: {n_img} ({int((per == 0).sum())} without annotations)",
        f"- Annotations: {int(stats.instances.sum())}",
        f"- Classes: {coco.num_classes} (Background + {len(coco.categories)} categories, in file order)",
        "- Image check: "
        + (
            f"all {checked} images decoded, sizes match the annotation file"
            if checked is not None
            else "skipped (check_images=false)"
        ),
    ]
    if coco.repairs:
        lines.append("- Repairs while loading: " + ", ".join(f"{v} {k}" for k, v in sorted(coco.repairs.items())))
    return lines


def _report_classes(rows: list[dict[str, Any]], plots: dict[str, Path]) -> list[str]:
    return [
        "",
        "## Classes",
        "",
        "Images and instances count annotations (for Background: images with background pixels); "
        "the pixel share is the share of all pixels of the ground-truth maps (mask rule of "
        "README, Contracts: smaller objects on top), Background included.",
        "",
        markdown_table(
            ["index", "class", "COCO id", "images", "instances", "small", "medium", "large", "pixel share"],
            [
                [
                    r["class_index"],
                    r["class_name"],
                    r["category_id"],
                    r["images"],
                    r["instances"],
                    r["small"],
                    r["medium"],
                    r["large"],
                    f"{r['pixel_share']:.2%}",
                ]
                for r in rows
            ],
        ),
        "",
        f"![Instances per class]({plots['class_instances'].name})",
        "",
        f"![Pixel share per class]({plots['class_pixel_share'].name})",
        "",
    ]


def _report_images(stats: Stats, plots: dict[str, Path]) -> list[str]:
    per = stats.anns_per_image
    lines = [
        "## Annotations per image",
        "",
        f"min {int(per.min()) if per.size else 0}, mean {per.mean() if per.size else 0:.2f}, "
        f"median {np.median(per) if per.size else 0:g}, max {int(per.max()) if per.size else 0}",
        "",
        f"![Annotations per image]({plots['annotations_per_image'].name})",
        "",
        "## Object areas",
        "",
        f"Absolute COCO thresholds, not scaled to the image size: small < 32^2 = {AREA_SMALL} px, "
        f"medium < 96^2 = {AREA_MEDIUM} px, large >= {AREA_MEDIUM} px (the annotation's `area`, "
        "computed from its segmentation when missing).",
        "",
        f"![Object area per class]({plots['object_area'].name})",
        "",
        "## Image sizes",
        "",
        markdown_table(["height", "width", "images"], [[h, w, c] for (h, w), c in stats.sizes.most_common(20)]),
    ]
    if len(stats.sizes) > 20:
        lines += ["", f"({len(stats.sizes) - 20} more sizes not listed)"]
    if "image_sizes" in plots:
        lines += ["", f"![Image sizes]({plots['image_sizes'].name})"]
    return lines


def _report_similar(coco: CocoData, similar: SimilarityGroups | None, plots: dict[str, Path]) -> list[str]:
    lines = ["", "## Near-duplicates and sequences", ""]
    if similar is None:
        return lines + ["Skipped (similarity=false or check_images=false)."]
    p = similar.params
    lines += [
        f"Images that look alike are grouped: pHash + dHash distance <= {p['threshold']} of 128 bits with a "
        f"similar colour layout (<= {p['threshold'] + p['sequence_slack']} for file numbers at most "
        f"{p['sequence_gap']} apart in one folder; near-duplicates <= {p['strict']} always), groups of weak links "
        f"capped at {p['max_group']} images. Split across folds, such images leak and flatter out-of-fold "
        'scores: `make folds ARGS="group_by=similar"` keeps each group in one fold.',
        "",
        f"- Groups with more than one image: {len(similar.groups)} "
        f"({similar.grouped_images} of {len(similar.group_of)} images)",
        f"- Largest group sizes: {', '.join(str(len(g)) for g in similar.groups[:10]) or '-'}",
        f"- Links: {', '.join(f'{k} {v}' for k, v in similar.kinds.items()) or 'none'}; "
        f"merges refused above the cap: {similar.refused}",
    ]
    if not similar.groups:
        return lines
    names = [[str(coco.image(i)["file_name"]) for i in g] for g in similar.groups[:10]]
    table = [[k + 1, len(g), ", ".join(g[:4]) + (" ..." if len(g) > 4 else "")] for k, g in enumerate(names)]
    lines += ["", markdown_table(["group", "images", "files"], table)]
    if "similar_groups" in plots:
        lines += ["", f"![Groups of look-alike images]({plots['similar_groups'].name})"]
    return lines


def render_report(
    coco: CocoData,
    stats: Stats,
    rows: list[dict[str, Any]],
    plots: dict[str, Path],
    checked: int | None,
    sample_ids: Sequence[int],
    similar: SimilarityGroups | None = None,
) -> str:
    lines = _report_header(coco, stats, checked) + _report_classes(rows, plots) + _report_images(stats, plots)
    lines += [
        "",
        "## Class co-occurrence",
        "",
        "Number of images containing both classes; the diagonal is the number of images containing the class.",
        "",
        f"![Class co-occurrence]({plots['cooccurrence'].name})",
    ]
    if "samples" in plots:
        lines += [
            "",
            "## Samples",
            "",
            f"{len(sample_ids)} images drawn at random, ground-truth classes overlaid in a fixed palette.",
            "",
            f"![Samples]({plots['samples'].name})",
        ]
    lines += _report_similar(coco, similar, plots)
    lines += ["", "## Files", ""]
    lines += [f"- [{name}]({name})" for name in ("classes.csv", "summary.csv")]
    return "\n".join(lines) + "\n"


def choose_samples(coco: CocoData, n: int, seed: int) -> list[int]:
    """``n`` image ids drawn without replacement, annotated images first, fixed by ``seed``."""
    if n <= 0 or not coco.images:
        return []
    rng = np.random.default_rng(seed)
    ids = coco.image_ids
    labelled = [i for i in ids if coco.annotations(i)]
    empty = [i for i in ids if not coco.annotations(i)]
    chosen = [labelled[j] for j in rng.permutation(len(labelled))[:n]]
    if len(chosen) < n:
        chosen += [empty[j] for j in rng.permutation(len(empty))[: n - len(chosen)]]
    return chosen


def write_class_plots(stats: Stats, palette: np.ndarray, out: Path) -> dict[str, Path]:
    """The count, share, area, size and co-occurrence plots; returns their paths by name."""
    plots: dict[str, Path] = {}
    plots["annotations_per_image"] = plot_annotations_per_image(stats, out / PLOTS["annotations_per_image"])
    names = stats.class_names
    plots["class_instances"] = plot_class_bars(
        names[1:],
        stats.instances[1:].tolist(),
        "Instances per class",
        "instances",
        out / PLOTS["class_instances"],
        palette[1:],
    )
    share_colours = palette.copy()
    share_colours[0] = (200, 200, 200)
    plots["class_pixel_share"] = plot_class_bars(
        names,
        stats.pixel_share.tolist(),
        "Pixel share per class (ground-truth maps)",
        "pixel share",
        out / PLOTS["class_pixel_share"],
        share_colours,
        log_scale=True,
    )
    plots["object_area"] = plot_object_area(stats, out / PLOTS["object_area"])
    if len(stats.sizes) > 1:
        plots["image_sizes"] = plot_image_sizes(stats, out / PLOTS["image_sizes"])
    else:
        (out / PLOTS["image_sizes"]).unlink(missing_ok=True)
    plots["cooccurrence"] = plot_cooccurrence(stats, out / PLOTS["cooccurrence"])
    return plots


def run(cfg: EDAConfig) -> dict[str, Any]:
    """Analyse ``cfg.ann_file`` and write the report, tables and plots; return the summary."""
    cfg.validate()
    coco = load_coco(cfg.data_dir, cfg.ann_file, mask_rule=cfg.mask_rule)
    checked = verify_images(coco) if cfg.check_images else None
    cache = MaskCache(coco, cfg.cache_dir)
    stats = collect_stats(coco, cache)
    rows = class_rows(stats)
    palette = class_palette(coco.num_classes)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_class_plots(stats, palette, out)
    sample_ids = choose_samples(coco, cfg.n_samples, cfg.seed)
    if sample_ids:
        plots["samples"] = plot_samples(coco, cache, sample_ids, palette, out / PLOTS["samples"])
    else:
        (out / PLOTS["samples"]).unlink(missing_ok=True)
    similar = similar_images(coco, cfg, out, plots)

    classes_csv = write_csv(out / "classes.csv", rows)
    summary = summary_rows(coco, stats, checked, similar)
    summary_csv = write_csv(out / "summary.csv", summary)
    text = render_report(coco, stats, rows, plots, checked, sample_ids, similar)
    report = atomic_write_text(out / "report.md", text)

    table = format_table(
        ["class", "images", "instances", "pixel share"],
        [[r["class_name"], r["images"], r["instances"], f"{r['pixel_share']:.2%}"] for r in rows],
    )
    log.info(
        "EDA of %s: %d images, %d annotations, %d classes\n%s",
        coco.path,
        len(coco.images),
        int(stats.instances.sum()),
        coco.num_classes,
        table,
    )
    log.info("EDA report written to %s", report)
    return {
        **{r["key"]: r["value"] for r in summary},
        "class_names": coco.class_names,
        "classes": rows,
        "image_sizes": {f"{h}x{w}": c for (h, w), c in stats.sizes.items()},
        "samples": sample_ids,
        "similarity": None if similar is None else similar.summary(),
        "out_dir": str(out),
        "files": {
            "report": str(report),
            "classes_csv": str(classes_csv),
            "summary_csv": str(summary_csv),
            **{k: str(p) for k, p in plots.items()},
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(
        EDAConfig, run, argv, "Exploratory data analysis of a contest-layout COCO file (writes reports/eda/)."
    )


if __name__ == "__main__":
    raise SystemExit(main())
