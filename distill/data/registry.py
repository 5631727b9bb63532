"""Dataset registry: `load_dataset(name, root, split, **kw)` and `list_datasets()`."""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable

from distill.plugins import load_plugins

from . import classification as cls
from . import pool, refer, retrieval, segmentation

# name -> (kind, loader(root, split, **kw), one-line description)
DATASETS: dict[str, tuple[str, Callable[..., Any], str]] = {
    "imagefolder": ("classification", cls.load_imagefolder, "any ImageFolder tree (+classnames.txt, templates.txt)"),
    "imagenet": ("classification", cls.load_imagenet, "ImageNet-1k as ImageFolder; open_clip names + 80 templates"),
    "food101": ("classification", cls.load_food101, "Food-101 (torchvision layout)"),
    "dtd": ("classification", cls.load_dtd, "Describable Textures (torchvision layout, partition=1)"),
    "fgvc_aircraft": ("classification", cls.load_fgvc_aircraft, "FGVC-Aircraft 2013b variants (torchvision layout)"),
    "flowers102": ("classification", cls.load_flowers102, "Oxford Flowers-102 (torchvision layout, .mat files)"),
    "caltech101": ("classification", cls.load_caltech101, "Caltech-101, seeded 30-per-class train split"),
    "cub200": ("classification", cls.load_cub200, "CUB-200-2011 (its own images.txt/... layout)"),
    "karpathy": ("retrieval", retrieval.load_karpathy, "any Karpathy-format JSON (json_name=, image_root=)"),
    "coco_karpathy": ("retrieval", retrieval.load_coco_karpathy, "COCO Karpathy split (dataset_coco.json)"),
    "flickr30k_karpathy": ("retrieval", retrieval.load_flickr30k_karpathy,
                           "Flickr30k Karpathy split (dataset_flickr30k.json)"),
    "ade20k": ("segmentation", segmentation.load_ade20k, "ADEChallengeData2016, reduce_zero_label"),
    "cityscapes": ("segmentation", segmentation.load_cityscapes, "Cityscapes leftImg8bit + gtFine labelTrainIds"),
    "refcoco": ("referring", partial(refer.load_refer, dataset="refcoco"), "RefCOCO, refs(unc).p"),
    "refcoco+": ("referring", partial(refer.load_refer, dataset="refcoco+"), "RefCOCO+, refs(unc).p"),
    "refcocog": ("referring", partial(refer.load_refer, dataset="refcocog"), "RefCOCOg, refs(umd).p"),
    "webdataset": ("pool", pool.load_webdataset, "webdataset tar shards (jpg + txt + json); corrupt skipped"),
}


KINDS = ("classification", "retrieval", "segmentation", "referring", "pool")


def register_dataset(name: str, kind: str, loader: Callable[..., Any], description: str = "") -> None:
    """Add a reader `loader(root, split, **kw)` under `name` (plugins call this; see distill.plugins)."""
    if kind not in KINDS:
        raise ValueError(f"dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if name in DATASETS and DATASETS[name][1] is not loader:
        raise ValueError(f"a dataset reader named '{name}' is already registered")
    DATASETS[name] = (kind, loader, description)


def list_datasets(kind: str | None = None) -> list[str]:
    """Registered names, optionally of one kind: classification, retrieval, segmentation, referring, pool."""
    load_plugins()
    return sorted(n for n, (k, _, _) in DATASETS.items() if kind is None or k == kind)


def dataset_kind(name: str) -> str:
    return _entry(name)[0]


def _entry(name: str):
    load_plugins()
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None


def load_dataset(name: str, root: str | os.PathLike, split: str, **kw) -> Any:
    """Build reader `name` over the files at `root` for `split`; extra keywords go to the reader."""
    return _entry(name)[1](root, split, **kw)
