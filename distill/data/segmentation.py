"""Semantic segmentation: ADE20K (ADEChallengeData2016, reduce_zero_label) and Cityscapes (gtFine trainIds).

`ds[i] -> (PIL RGB image, int64 HxW label array)`, labels 0..C-1 and 255 = ignore.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .base import IGNORE_INDEX, ImageListDataset, UnreadableImageError, load_rgb, require


class SegmentationDataset(ImageListDataset):
    def __init__(self, name: str, image_paths, label_paths, classes, reduce_zero_label: bool,
                 check_files: bool = True):
        self.name = name
        self.image_paths = [Path(p) for p in image_paths]
        self.label_paths = [Path(p) for p in label_paths]
        self.classes = list(classes)
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = IGNORE_INDEX
        if check_files:
            self._check_exist()
            missing = [p for p in self.label_paths if not p.is_file()]
            if missing:
                raise UnreadableImageError(name, missing, reason="label map missing")

    def verify(self, decode: bool = False) -> None:
        """Raise UnreadableImageError listing every unreadable image *and* label map."""
        from .base import find_unreadable
        bad = find_unreadable(self.image_paths, decode) + find_unreadable(self.label_paths, decode)
        if bad:
            raise UnreadableImageError(self.name, bad)

    def load_label(self, i: int) -> np.ndarray:
        try:
            with Image.open(self.label_paths[i]) as im:
                label = np.asarray(im, dtype=np.int64)
        except (OSError, ValueError) as e:
            raise UnreadableImageError(self.name, [self.label_paths[i]], f"{type(e).__name__}: {e}") from e
        if label.ndim != 2:
            raise ValueError(f"{self.name}: label map {self.label_paths[i]} is not single-channel "
                             f"(shape {label.shape}); expected an index PNG")
        if self.reduce_zero_label:
            # mmseg's rule: 0 ("other") -> ignore, k -> k-1, an existing 255 stays ignore
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        return label

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image = load_rgb(self.image_paths[i], self.name)
        label = self.load_label(i)
        if label.shape != (image.height, image.width):
            raise ValueError(f"{self.name}: {self.label_paths[i]} is {label.shape[::-1]} but its image is "
                             f"{image.size}")
        return image, label

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name!r}, n={len(self)}, classes={len(self.classes)})"


ADE_LAYOUT = """  ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg
  ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png  (same stem; 0 = other, 1..C = classes)
  class names: ROOT/ADEChallengeData2016/classes.txt (one per line, label 1..C), else objectInfo150.txt,
  else mmsegmentation's ADE20K list. (ROOT may also be the ADEChallengeData2016 folder itself.)"""
ADE_SOURCE = "ADE20K SceneParsing (MIT), http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ADE_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def _ade_classes(base: Path, explicit) -> list[str]:
    if explicit is not None:
        return list(explicit) if not isinstance(explicit, (str, os.PathLike)) else \
            [x.strip() for x in Path(explicit).read_text().splitlines() if x.strip()]
    if (base / "classes.txt").is_file():
        return [x.strip() for x in (base / "classes.txt").read_text().splitlines() if x.strip()]
    info = base / "objectInfo150.txt"
    if info.is_file():  # header 'Idx Ratio Train Val Name', names like 'building;edifice'
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        return [r[-1].split(";")[0].split(",")[0].strip() for r in rows]
    from mmseg.datasets import ADE20KDataset
    return list(ADE20KDataset.METAINFO["classes"])


def load_ade20k(root: str | os.PathLike, split: str = "validation", classes=None,
                reduce_zero_label: bool = True) -> SegmentationDataset:
    root = Path(root)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    if split not in ADE_SPLITS:
        raise ValueError(f"ade20k: split must be one of {sorted(ADE_SPLITS)}, got {split!r}")
    sub = ADE_SPLITS[split]
    img_dir, ann_dir = base / "images" / sub, base / "annotations" / sub
    require(img_dir.is_dir() and ann_dir.is_dir(), "ade20k", root, f"{sub} images/annotations not found",
            ADE_LAYOUT, ADE_SOURCE)
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    require(len(images) > 0, "ade20k", root, f"no images in {img_dir}", ADE_LAYOUT, ADE_SOURCE)
    return SegmentationDataset("ade20k", images, [ann_dir / (p.stem + ".png") for p in images],
                               _ade_classes(base, classes), reduce_zero_label)


CITYSCAPES_LAYOUT = """  ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
  (the *_labelTrainIds.png files are made by cityscapesscripts' createTrainIdLabelImgs)"""
CITYSCAPES_SOURCE = "Cityscapes (Cordts et al. 2016), https://www.cityscapes-dataset.com (leftImg8bit + gtFine)"


def cityscapes_classes() -> list[str]:
    """The 19 evaluation classes in trainId order, from torchvision's Cityscapes label table."""
    from torchvision.datasets import Cityscapes
    train = sorted((c.train_id, c.name) for c in Cityscapes.classes if 0 <= c.train_id < 255)
    return [name for _, name in train]


def load_cityscapes(root: str | os.PathLike, split: str = "val") -> SegmentationDataset:
    root = Path(root)
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    require(img_dir.is_dir() and gt_dir.is_dir(), "cityscapes", root, f"split {split!r} not found",
            CITYSCAPES_LAYOUT, CITYSCAPES_SOURCE)
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    require(len(images) > 0, "cityscapes", root, f"no *_leftImg8bit.png under {img_dir}",
            CITYSCAPES_LAYOUT, CITYSCAPES_SOURCE)
    labels = [gt_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
              for p in images]
    missing = [p for p in labels if not p.is_file()]
    require(not missing, "cityscapes", root,
            f"{len(missing)} *_gtFine_labelTrainIds.png files missing (first: {missing[0] if missing else ''}); "
            "run cityscapesscripts' createTrainIdLabelImgs", CITYSCAPES_LAYOUT, CITYSCAPES_SOURCE)
    return SegmentationDataset("cityscapes", images, labels, cityscapes_classes(), reduce_zero_label=False)
