"""Image-text retrieval: Karpathy-split JSON files (COCO 5k, Flickr30k 1k, or any file in that format).

The Karpathy file lists `images[]`, each with `filename`, optional `filepath` (COCO: `val2014`),
`split` and `sentences[]` holding `raw` text. We keep the images of the requested split in file order
and all of their captions (COCO has a few images with 6-7 captions: they are kept, not truncated).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .base import AnnotationError, RetrievalDataset, require

KARPATHY_LAYOUT = """  ROOT/<json_name>            Karpathy split file: {"images": [{"filename", "filepath"?, "split",
                                "sentences": [{"raw", "tokens"}, ...]}, ...]}
  ROOT/<image_root>/<filepath>/<filename>   images (image_root defaults to ROOT, then ROOT/images)"""
KARPATHY_SOURCE = ("Karpathy & Fei-Fei 2015 splits (dataset_coco.json / dataset_flickr30k.json from "
                   "https://cs.stanford.edu/people/karpathy/deepimagesent/); COCO val2014 or Flickr30k images")


def _find_image(candidates: list[Path]) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def load_karpathy(root: str | os.PathLike, split: str = "test", json_name: str = "dataset.json",
                  image_root: str | os.PathLike | None = None, name: str = "karpathy") -> RetrievalDataset:
    """Images of `split` from ROOT/json_name; image path = image_root/filepath/filename.

    Without `image_root`, ROOT and ROOT/images are tried (per file, first that exists)."""
    root = Path(root)
    json_path = Path(json_name) if Path(json_name).is_absolute() else root / json_name
    require(json_path.is_file(), name, root, f"Karpathy JSON {json_path.name} not found",
            KARPATHY_LAYOUT, KARPATHY_SOURCE)
    data = json.loads(json_path.read_text())
    require(isinstance(data, dict) and isinstance(data.get("images"), list), name, root,
            f"{json_path.name} has no 'images' list", KARPATHY_LAYOUT, KARPATHY_SOURCE)
    bases = [Path(image_root)] if image_root is not None else [root, root / "images"]
    paths, captions = [], []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or img.get("split") != split:
            continue
        rel = Path(img.get("filepath", "")) / img["filename"] if "filename" in img else None
        item = f"images[{k}]" + (f" ({img['filename']})" if rel else "")
        if rel is None:
            raise AnnotationError(json_path, item, "no 'filename'", "every image needs its file name")
        sents = img.get("sentences")
        if not isinstance(sents, list) or not sents:
            raise AnnotationError(json_path, item, "no 'sentences' list",
                                  "every image of a retrieval split needs at least one caption")
        bad = [j for j, s in enumerate(sents) if not isinstance(s, dict) or not isinstance(s.get("raw"), str)]
        if bad:
            raise AnnotationError(json_path, f"{item} sentences[{bad[0]}]", "no 'raw' caption text",
                                  "each sentence needs {\"raw\": \"the caption\"}")
        paths.append(_find_image([b / rel for b in bases] + [b / img["filename"] for b in bases]))
        captions.append([s["raw"].strip() for s in sents])
    splits = sorted({img.get("split") for img in data["images"]} - {None})
    require(len(paths) > 0, name, root, f"no images with split {split!r} (splits present: {splits})",
            KARPATHY_LAYOUT, KARPATHY_SOURCE)
    return RetrievalDataset(name, paths, captions)


def load_coco_karpathy(root: str | os.PathLike, split: str = "test", **kw) -> RetrievalDataset:
    """COCO Karpathy split: ROOT/dataset_coco.json and ROOT/val2014/*.jpg (5,000 test images)."""
    kw.setdefault("json_name", "dataset_coco.json")
    return load_karpathy(root, split, name="coco_karpathy", **kw)


def load_flickr30k_karpathy(root: str | os.PathLike, split: str = "test", **kw) -> RetrievalDataset:
    """Flickr30k Karpathy split: ROOT/dataset_flickr30k.json and images in ROOT/flickr30k-images
    (or ROOT, ROOT/images). 1,000 test images."""
    root = Path(root)
    kw.setdefault("json_name", "dataset_flickr30k.json")
    if "image_root" not in kw and (root / "flickr30k-images").is_dir():
        kw["image_root"] = root / "flickr30k-images"
    return load_karpathy(root, split, name="flickr30k_karpathy", **kw)
