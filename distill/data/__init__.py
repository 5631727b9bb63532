"""Dataset readers for real on-disk layouts (and the mini-world, written in the same layouts).

    from distill.data import load_dataset, list_datasets
    ds = load_dataset("imagefolder", "WORLD/classification", "val")
"""
from .base import (IGNORE_INDEX, AnnotationError, ClassificationDataset, DatasetLayoutError, LabelSpaceError,
                   PoolSample, RefSample, RetrievalDataset, UnreadableImageError, check_same_classes)
from .pool import WebDatasetPool
from .refer import ReferDataset, decode_mask
from .registry import DATASETS, dataset_kind, list_datasets, load_dataset
from .safe_pickle import UnsafePickleError, safe_load, safe_loads
from .segmentation import SegmentationDataset

__all__ = [
    "IGNORE_INDEX", "AnnotationError", "LabelSpaceError", "check_same_classes",
    "ClassificationDataset", "DatasetLayoutError", "PoolSample", "RefSample", "RetrievalDataset",
    "UnreadableImageError", "WebDatasetPool", "ReferDataset", "decode_mask", "DATASETS", "dataset_kind",
    "list_datasets", "load_dataset", "UnsafePickleError", "safe_load", "safe_loads", "SegmentationDataset",
]
