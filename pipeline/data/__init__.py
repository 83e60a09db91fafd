"""The data layer: COCO files of the contest layout, ground-truth maps, images, augmentations,
datasets, fold splits, look-alike image groups, the probability store and array resizing.
Every public name is importable from ``pipeline.data``."""

from pipeline.core.errors import DataError
from pipeline.data.coco import BACKGROUND, OFF_IMAGE_REPAIR, CocoData, file_digest, load_coco, resolve_annotation
from pipeline.data.datasets import (
    FolderDataset,
    SegmentationDataset,
    TestDataset,
    ValDataset,
    collate,
    collate_test,
    image_meta,
)
from pipeline.data.images import (
    IMAGE_SUFFIXES,
    common_image_size,
    image_size_from_data,
    list_images,
    read_image,
    verify_images,
)
from pipeline.data.mask_cache import MaskCache
from pipeline.data.masks import (
    DEFAULT_MASK_RULE,
    MASK_RULE_VERSION,
    MASK_RULES,
    PNG_PARAMS,
    annotation_area,
    annotation_mask,
    check_mask_rule,
    mask_dtype,
    rasterize,
)
from pipeline.data.resize import resize_nearest, resize_probs, scaled_size
from pipeline.data.similarity import (
    ImageHashes,
    SimilarityGroups,
    SimilarityParams,
    group_hashes,
    image_hashes,
    similarity_groups,
)
from pipeline.data.splits import iterative_stratification, load_folds, presence_matrix, split_ids
from pipeline.data.store import ProbReader, ProbWriter, stores_mask_rule
from pipeline.data.transforms import (
    AUGMENTATIONS,
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    build_transform,
    normalize,
    to_tensor,
)

__all__ = [
    "AUGMENTATIONS",
    "BACKGROUND",
    "IMAGENET",
    "Preprocessing",
    "normalize",
    "DEFAULT_MASK_RULE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASK_RULES",
    "MASK_RULE_VERSION",
    "OFF_IMAGE_REPAIR",
    "PNG_PARAMS",
    "CocoData",
    "DataError",
    "FolderDataset",
    "IMAGE_SUFFIXES",
    "MaskCache",
    "SegmentationDataset",
    "TestDataset",
    "ValDataset",
    "annotation_area",
    "annotation_mask",
    "build_transform",
    "check_mask_rule",
    "collate",
    "collate_test",
    "file_digest",
    "image_meta",
    "common_image_size",
    "image_size_from_data",
    "iterative_stratification",
    "list_images",
    "load_coco",
    "load_folds",
    "mask_dtype",
    "presence_matrix",
    "rasterize",
    "read_image",
    "resolve_annotation",
    "split_ids",
    "to_tensor",
    "verify_images",
    "ImageHashes",
    "SimilarityGroups",
    "SimilarityParams",
    "group_hashes",
    "image_hashes",
    "similarity_groups",
    "ProbReader",
    "ProbWriter",
    "stores_mask_rule",
    "resize_nearest",
    "resize_probs",
    "scaled_size",
]
