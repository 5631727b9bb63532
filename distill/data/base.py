"""Sample types and errors shared by every reader in `distill.data`.

The contract (see docs/datasets.md):
- classification: ``ds[i] -> (PIL RGB image, int label)``, ``ds.classes``, ``ds.templates``, ``ds.targets``
- retrieval:      ``ds[i] -> PIL RGB image``, ``ds.captions[i] -> list[str]``
- segmentation:   ``ds[i] -> (PIL RGB image, int64 HxW array)``, labels 0..C-1, 255 = ignore
- referring:      ``ds[i] -> RefSample``
- pool:           iterate -> ``PoolSample``; corrupt images skipped and counted
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from torch.utils.data import Dataset

from distill.errors import AmoeError

IGNORE_INDEX = 255


class DatasetLayoutError(AmoeError, FileNotFoundError):
    """The root is missing or does not hold the layout the reader expects."""

    def __init__(self, dataset: str, root: str | os.PathLike, problem: str, expected: str, source: str):
        self.dataset, self.root = dataset, str(root)
        super().__init__(
            f"{dataset}: {problem} (root: {root}).\n"
            f"Expected layout:\n{expected.rstrip()}\n"
            f"Where to get it: {source}")


class UnreadableImageError(AmoeError, OSError):
    """One or more evaluation images could not be decoded; lists every file that failed."""

    def __init__(self, dataset: str, files: Sequence[str | os.PathLike], reason: str = ""):
        self.files = [str(f) for f in files]
        shown = "\n  ".join(self.files[:20])
        more = f"\n  ... and {len(self.files) - 20} more" if len(self.files) > 20 else ""
        super().__init__(
            f"{dataset}: {len(self.files)} unreadable image(s){': ' + reason if reason else ''}\n  {shown}{more}\n"
            "Re-extract or re-download these files (the benchmark harness leaves such items out and "
            "records them).")


class AnnotationError(AmoeError, ValueError):
    """An annotation file is incomplete or inconsistent; one line naming the file, the item and the fix."""

    def __init__(self, file: str | os.PathLike, item: str, problem: str, fix: str):
        self.file, self.item = str(file), item
        super().__init__(f"{file}: {item}: {problem}; {fix}")


class LabelSpaceError(AmoeError, ValueError):
    """Two splits of one classification dataset disagree on their classes (names or order), so the
    same label index would mean different classes in them."""


def check_same_classes(dataset: str, splits: dict[str, Sequence[str]], where: dict[str, str] | None = None) -> None:
    """Raise LabelSpaceError unless every split lists the same class names in the same order."""
    items = list(splits.items())
    if len(items) < 2:
        return
    ref_split, ref = items[0]
    for split, classes in items[1:]:
        if list(classes) == list(ref):
            continue
        missing = [c for c in ref if c not in classes]
        extra = [c for c in classes if c not in ref]
        what = (f"lacks {', '.join(map(repr, missing[:5]))}" if missing else "") + \
               ("; " if missing and extra else "") + \
               (f"has {', '.join(map(repr, extra[:5]))} that '{ref_split}' lacks" if extra else "")
        what = what or "lists the same classes in another order"
        loc = f" ({where[split]})" if where and split in where else ""
        raise LabelSpaceError(
            f"{dataset}: split '{split}'{loc} has {len(classes)} classes and '{ref_split}' has {len(ref)}; "
            f"'{split}' {what}, so label indices would point at different classes; give every split the "
            f"same class folders (or one classnames file for all)")


def require(condition: bool, dataset: str, root, problem: str, expected: str, source: str) -> None:
    if not condition:
        raise DatasetLayoutError(dataset, root, problem, expected, source)


def decode_rgb(source: bytes | str | os.PathLike) -> Image.Image:
    """The toolkit's one image reader: a file's path or its bytes (a tar member) -> the fully decoded
    RGB image. It raises on bad data; its callers skip and count (training, curation, teachers' pool)
    or leave the item out and record it (`load_rgb`, then the benchmark harness)."""
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with Image.open(src) as im:
        return im.convert("RGB")


def load_rgb(path: str | os.PathLike, dataset: str) -> Image.Image:
    """`decode_rgb` of an evaluation image; a decode failure is an `UnreadableImageError` naming the file."""
    try:
        return decode_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(dataset, [path], reason=f"{type(e).__name__}: {e}") from e


def find_unreadable(paths: Sequence[str | os.PathLike], decode: bool = False) -> list[str]:
    """Files that are missing or whose header (or, with decode=True, whole image) fails to parse."""
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                if decode:
                    im.load()
                else:
                    im.verify()
        except Exception:  # any failure means the file is unusable; the caller lists them all
            bad.append(str(p))
    return bad


class ImageListDataset(Dataset):
    """Shared machinery: a list of image paths, `verify()` to check them all up front."""

    name = "dataset"
    image_paths: list[Path]

    def __len__(self) -> int:
        return len(self.image_paths)

    def verify(self, decode: bool = False) -> None:
        """Raise UnreadableImageError listing every missing/corrupt image (header check by default)."""
        bad = find_unreadable(self.image_paths, decode=decode)
        if bad:
            raise UnreadableImageError(self.name, bad)

    def _check_exist(self) -> None:
        """Cheap construction-time check: every listed image file exists (a stat per file)."""
        missing = [p for p in self.image_paths if not os.path.isfile(p)]
        if missing:
            raise UnreadableImageError(self.name, missing, reason="file missing")


class ClassificationDataset(ImageListDataset):
    """Image paths + integer labels + human-readable class names (+ optional prompt templates)."""

    def __init__(self, name: str, image_paths: Sequence[str | os.PathLike], targets: Sequence[int],
                 classes: Sequence[str], templates: Sequence[str] | None = None, check_files: bool = True):
        self.name = name
        self.image_paths = [Path(p) for p in image_paths]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.templates = list(templates) if templates is not None else None
        if len(self.image_paths) != len(self.targets):
            raise ValueError(f"{name}: {len(self.image_paths)} images but {len(self.targets)} labels")
        bad = [t for t in set(self.targets) if not 0 <= t < len(self.classes)]
        if bad:
            raise ValueError(f"{name}: labels {sorted(bad)[:10]} outside 0..{len(self.classes) - 1}")
        if check_files:
            self._check_exist()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.image_paths[i], self.name), self.targets[i]

    def __repr__(self) -> str:
        return f"ClassificationDataset({self.name!r}, n={len(self)}, classes={len(self.classes)})"


class RetrievalDataset(ImageListDataset):
    """Images with all their captions: ``ds[i] -> PIL image``, ``ds.captions[i] -> list[str]``."""

    def __init__(self, name: str, image_paths: Sequence[str | os.PathLike], captions: Sequence[Sequence[str]],
                 check_files: bool = True):
        self.name = name
        self.image_paths = [Path(p) for p in image_paths]
        self.captions = [list(c) for c in captions]
        if len(self.image_paths) != len(self.captions):
            raise ValueError(f"{name}: {len(self.image_paths)} images but {len(self.captions)} caption lists")
        if check_files:
            self._check_exist()

    def __getitem__(self, i: int) -> Image.Image:
        return load_rgb(self.image_paths[i], self.name)

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name!r}, images={len(self)}, captions={sum(map(len, self.captions))})"


@dataclass(frozen=True)
class RefSample:
    """One referring expression (a `ref` of the refer toolkit) with its target object.

    `bbox` is xyxy in original image pixels; `segmentation` is the COCO annotation's polygons or RLE,
    decodable with `pycocotools.mask` (see `distill.data.refer.decode_mask`)."""

    image_path: Path
    image_id: int
    ref_id: int
    ann_id: int
    split: str
    sentences: list[str]
    bbox: tuple[float, float, float, float]
    category_id: int
    width: int
    height: int
    segmentation: Any = field(default=None, repr=False, compare=False)

    def load_image(self) -> Image.Image:
        return load_rgb(self.image_path, "refer")


@dataclass
class PoolSample:
    """One pre-training sample from a webdataset shard."""

    key: str
    shard: str
    image: Image.Image
    caption: str | None
    metadata: dict
