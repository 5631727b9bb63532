"""Referring expressions in the `refer` toolkit layout: RefCOCO, RefCOCO+, RefCOCOg.

    ROOT/refcoco/refs(unc).p  refs(google).p  instances.json
    ROOT/refcoco+/refs(unc).p                 instances.json
    ROOT/refcocog/refs(umd).p refs(google).p  instances.json
    images: ROOT/images/train2014/COCO_train2014_000000xxxxxx.jpg (or ROOT/images/mscoco/images/train2014)

The refs pickles are untrusted input and are read with `distill.data.safe_pickle` (plain data only).
A ref's `file_name` carries an `_<ann_id>` suffix (`COCO_train2014_000000581857_16.jpg`) that names no
real file: the image path is taken from instances.json's `images[].file_name` by `image_id`.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .base import AnnotationError, RefSample, UnreadableImageError, load_rgb, require
from .safe_pickle import safe_load

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REFER_SOURCE = ("refer toolkit data (Yu et al. 2016 RefCOCO/RefCOCO+, Mao et al. 2016 RefCOCOg), "
                "https://github.com/lichengunc/refer ; images: COCO train2014, https://cocodataset.org")


def _layout(dataset: str, split_by: str) -> str:
    return (f"  ROOT/{dataset}/refs({split_by}).p     pickle: list of refs (ref_id, ann_id, image_id, split,\n"
            f"                                sentences[{{raw, sent, tokens, sent_id}}], category_id, file_name)\n"
            f"  ROOT/{dataset}/instances.json   COCO-format images / annotations / categories\n"
            "  ROOT/images/train2014/COCO_train2014_%012d.jpg   (or pass image_root=...)")


def _image_root(root: Path, image_root) -> Path:
    if image_root is not None:
        return Path(image_root)
    for cand in (root / "images" / "train2014", root / "images" / "mscoco" / "images" / "train2014",
                 root / "train2014"):
        if cand.is_dir():
            return cand
    return root / "images" / "train2014"


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=1)
def _read_annotations(refs_path: str, inst_path: str, refs_stamp: tuple, inst_stamp: tuple):
    """(refs, images by id, annotations by id, category names by id) of one annotation set, parsed once
    per process while the files stay the same (size and mtime): a grounding run reads its train split
    and every eval split from the same files, and an ablation worker reads them for each arm. Shared
    between datasets, so treated as read-only."""
    refs = safe_load(refs_path)
    instances = json.loads(Path(inst_path).read_text())
    return (refs, {int(im["id"]): im for im in instances["images"]},
            {int(a["id"]): a for a in instances["annotations"]},
            {int(c["id"]): c["name"] for c in instances["categories"]})


class ReferDataset(Dataset):
    """All refs of one split; `ds[i] -> RefSample` (bbox xyxy in original pixels)."""

    def __init__(self, root: str | os.PathLike, dataset: str = "refcoco", split: str = "val",
                 split_by: str | None = None, image_root: str | os.PathLike | None = None,
                 check_files: bool = True):
        root = Path(root)
        split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
        self.name, self.split, self.split_by = dataset, split, split_by
        folder = root / dataset
        refs_path, inst_path = folder / f"refs({split_by}).p", folder / "instances.json"
        layout = _layout(dataset, split_by)
        require(refs_path.is_file() and inst_path.is_file(), dataset, root,
                f"{refs_path.name} and/or instances.json missing in {folder}", layout, REFER_SOURCE)
        refs, self.images, self.annotations, self.categories = _read_annotations(
            str(refs_path), str(inst_path), _stamp(refs_path), _stamp(inst_path))
        require(isinstance(refs, list) and all(isinstance(r, dict) for r in refs), dataset, root,
                f"{refs_path.name} is not a list of ref dicts", layout, REFER_SOURCE)
        splits = sorted({r["split"] for r in refs})
        if split not in splits:
            raise ValueError(f"{dataset} ({split_by}): no refs with split {split!r}; splits present: {splits}")
        self.refs = [r for r in refs if r["split"] == split]
        self._check_refs(refs_path, inst_path)
        self.image_root = _image_root(root, image_root)
        if check_files:
            needed = sorted({self.image_path(int(r["image_id"])) for r in self.refs})
            missing = [p for p in needed if not p.is_file()]
            if missing:
                raise UnreadableImageError(dataset, missing,
                                           reason=f"image file missing (image root {self.image_root})")

    def _check_refs(self, refs_path: Path, inst_path: Path) -> None:
        """Every ref of the split names an annotation and an image instances.json has, with sentences:
        checked at load, not at `ds[i]` minutes into a run."""
        for r in self.refs:
            item = f"ref_id {r.get('ref_id')}"
            for field_ in ("ref_id", "ann_id", "image_id", "sentences"):
                if field_ not in r:
                    raise AnnotationError(refs_path, item, f"no '{field_}'", "re-export the refs file")
            if int(r["ann_id"]) not in self.annotations:
                raise AnnotationError(refs_path, item, f"ann_id {r['ann_id']} is not in {inst_path.name}",
                                      "use the instances.json that came with this refs file")
            if int(r["image_id"]) not in self.images:
                raise AnnotationError(refs_path, item, f"image_id {r['image_id']} is not in {inst_path.name}",
                                      "use the instances.json that came with this refs file")
            bbox = self.annotations[int(r["ann_id"])].get("bbox")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) for v in bbox)):
                raise AnnotationError(inst_path, f"annotation {r['ann_id']} ({item})",
                                      f"bbox {bbox!r} is not [x, y, width, height]",
                                      "the box of a referred object must be four numbers")
            info = self.images[int(r["image_id"])]
            if not all(isinstance(info.get(k), int) and info[k] > 0 for k in ("width", "height")):
                raise AnnotationError(inst_path, f"image {r['image_id']} ({item})", "no positive width/height",
                                      "boxes are scored in the original image's pixels, so images need their size")
            if not r["sentences"] or any(not isinstance(s, dict) or "sent" not in s for s in r["sentences"]):
                raise AnnotationError(refs_path, item, "a sentence without 'sent' (or no sentences)",
                                      "every ref needs sentences [{'sent': ...}]")

    def image_path(self, image_id: int) -> Path:
        # instances.json knows the real file; the ref's file_name has the _<ann_id> suffix quirk
        info = self.images.get(image_id)
        name = info["file_name"] if info else f"COCO_train2014_{image_id:012d}.jpg"
        return self.image_root / name

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> RefSample:
        ref = self.refs[i]
        image_id, ann_id = int(ref["image_id"]), int(ref["ann_id"])
        ann, info = self.annotations[ann_id], self.images[image_id]
        x, y, w, h = (float(v) for v in ann["bbox"])
        return RefSample(image_path=self.image_path(image_id), image_id=image_id, ref_id=int(ref["ref_id"]),
                         ann_id=ann_id, split=ref["split"], sentences=[s["sent"] for s in ref["sentences"]],
                         bbox=(x, y, x + w, y + h), category_id=int(ref["category_id"]),
                         width=int(info["width"]), height=int(info["height"]),
                         segmentation=ann.get("segmentation"))

    def load_image(self, i: int):
        return load_rgb(self.image_path(int(self.refs[i]["image_id"])), self.name)

    def __repr__(self) -> str:
        return f"ReferDataset({self.name!r}, {self.split_by}, split={self.split!r}, refs={len(self)})"


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygons / uncompressed RLE / compressed RLE -> uint8 HxW mask (pycocotools)."""
    from pycocotools import mask as mask_utils
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(np.uint8)


def load_refer(root, split: str = "val", dataset: str = "refcoco", **kw) -> ReferDataset:
    return ReferDataset(root, dataset=dataset, split=split, **kw)
