"""The data layer: COCO files of the contest layout, ground-truth maps, images, augmentations,
datasets and fold splits.  Every public name is importable from ``pipeline.data``."""
from pipeline.core.errors import DataError
from pipeline.data.coco import BACKGROUND, OFF_IMAGE_REPAIR, CocoData, file_digest, load_coco, resolve_annotation
from pipeline.data.datasets import SegmentationDataset, TestDataset, ValDataset, collate, collate_test, image_meta
from pipeline.data.images import image_size_from_data, read_image, verify_images
from pipeline.data.masks import (
    DEFAULT_MASK_RULE,
    MASK_RULE_VERSION,
    MASK_RULES,
    PNG_PARAMS,
    MaskCache,
    annotation_area,
    annotation_mask,
    check_mask_rule,
    mask_dtype,
    rasterize,
)
from pipeline.data.splits import iterative_stratification, load_folds, presence_matrix, split_ids
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
    "AUGMENTATIONS", "BACKGROUND", "IMAGENET", "Preprocessing", "normalize", "DEFAULT_MASK_RULE", "IMAGENET_MEAN", "IMAGENET_STD", "MASK_RULES",
    "MASK_RULE_VERSION", "OFF_IMAGE_REPAIR", "PNG_PARAMS", "CocoData", "DataError", "MaskCache",
    "SegmentationDataset", "TestDataset", "ValDataset", "annotation_area", "annotation_mask", "build_transform",
    "check_mask_rule", "collate", "collate_test", "file_digest", "image_meta", "image_size_from_data",
    "iterative_stratification", "load_coco", "load_folds", "mask_dtype", "presence_matrix", "rasterize",
    "read_image", "resolve_annotation", "split_ids", "to_tensor", "verify_images",
]
