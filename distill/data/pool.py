"""Pre-training pool: webdataset tar shards of (image, caption, metadata) for distillation/curation.

Training data is allowed to be dirty: a sample whose image does not decode is skipped and counted
(`pool.stats`), never fatal. Evaluation readers do the opposite (they fail listing the files).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import IterableDataset

from .base import PoolSample, decode_rgb, require

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
POOL_LAYOUT = """  ROOT/shards/*.tar  or  ROOT/*.tar  or a list / brace pattern of shard paths ('pool-{000000..000009}.tar')
  each sample: <key>.jpg (or .png/.webp), optional <key>.txt caption, optional <key>.json metadata"""
POOL_SOURCE = "webdataset shards (https://github.com/webdataset/webdataset), e.g. made with img2dataset"


def sample_key(member_name: str) -> str:
    """A tar member's sample key by webdataset's rule: the path up to the first dot of the file name
    (`dir/000123.seg.png` -> `dir/000123`), so the trainer, curation and the webdataset reader the
    teachers use agree on which members form one sample."""
    head, _, base = member_name.rpartition("/")
    return f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0]


class TruncatedShardWarning(UserWarning):
    """A tar shard ends early (cut mid-member or corrupt); the members before the cut are used."""


def tar_members(shard: str | os.PathLike, suffixes: tuple[str, ...] | None = None,
                read: bool = True) -> Iterator[tuple[Any, bytes | None]]:
    """(member, its bytes or None) for the file members of a tar shard, in order: the one reader of
    tar members for the trainer, curation and the teachers' data.

    A shard that ends early (a copy cut mid-member, a corrupt header) yields every complete member
    before the cut, then warns naming the shard and stops: one bad file never stops a run. A member
    whose data runs past the end of the file counts as cut whether or not it is read, so listing
    keys (`read=False`) and reading images agree on what the shard holds."""
    import tarfile
    import warnings

    size = os.path.getsize(shard)
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile() or (suffixes and not m.name.lower().endswith(suffixes)):
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"member {m.name} is cut at byte {size}")
                yield m, (tar.extractfile(m).read() if read else None)
            # tarfile stops without a word at a header cut in two: a whole archive ends in two zero blocks
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(1024)
            if len(end) < 1024 or any(end):
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset}")
    except (tarfile.ReadError, EOFError, OSError) as e:
        warnings.warn(f"{shard}: the shard ends early ({e}); the members before the cut are used",
                      TruncatedShardWarning, stacklevel=2)


def resolve_shards(root: str | os.PathLike | list) -> list[str]:
    """A directory (ROOT/shards/*.tar or ROOT/*.tar), a list of paths, or a brace pattern."""
    if isinstance(root, (list, tuple)):
        return [str(p) for p in root]
    text = str(root)
    if "{" in text and ".." in text:
        import braceexpand
        return list(braceexpand.braceexpand(text))
    path = Path(text)
    if path.is_file():
        return [str(path)]
    shards = sorted((path / "shards").glob("*.tar")) if (path / "shards").is_dir() else []
    shards = shards or sorted(path.glob("*.tar"))
    require(len(shards) > 0, "webdataset", root, "no .tar shards found", POOL_LAYOUT, POOL_SOURCE)
    return [str(s) for s in shards]


class WebDatasetPool(IterableDataset):
    """Iterate samples of webdataset shards as `PoolSample`s, in shard order.

    `stats` counts `seen`, `yielded`, `corrupt` (image missing or undecodable; first keys kept in
    `corrupt_keys`). Under a multi-worker DataLoader each worker reads its own shards and keeps its own
    counts; the totals are logged at the end of every pass."""

    def __init__(self, shards, max_corrupt_keys: int = 100):
        self.shards = resolve_shards(shards)
        missing = [s for s in self.shards if "://" not in s and not Path(s).is_file()]
        require(not missing, "webdataset", shards, f"shard files missing: {missing[:5]}", POOL_LAYOUT, POOL_SOURCE)
        self.max_corrupt_keys = max_corrupt_keys
        self.stats = {"seen": 0, "yielded": 0, "corrupt": 0, "corrupt_keys": []}

    def _raw_samples(self) -> Iterator[dict]:
        import webdataset as wds
        # every shard on every rank (nodesplitter None): callers that split work over ranks do it
        # themselves (the teachers keep one seeded sample stream on all ranks)
        return iter(wds.WebDataset(self.shards, shardshuffle=False, empty_check=False, nodesplitter=None))

    def _skip(self, key: str, why: str) -> None:
        self.stats["corrupt"] += 1
        if len(self.stats["corrupt_keys"]) < self.max_corrupt_keys:
            self.stats["corrupt_keys"].append(f"{key}: {why}")

    def __iter__(self) -> Iterator[PoolSample]:
        self.stats = {"seen": 0, "yielded": 0, "corrupt": 0, "corrupt_keys": []}
        for raw in self._raw_samples():
            self.stats["seen"] += 1
            key, shard = raw.get("__key__", "?"), raw.get("__url__", "?")
            blob = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            if blob is None:
                self._skip(key, "no image member")
                continue
            try:
                image = decode_rgb(blob)
            except Exception as e:  # any decode failure: training data is skipped, counted, reported
                self._skip(key, f"{type(e).__name__}")
                continue
            try:
                metadata = json.loads(raw["json"]) if "json" in raw else {}
            except ValueError:
                metadata = {}
                log.warning("webdataset: %s has unparsable json metadata; using {}", key)
            caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else None
            self.stats["yielded"] += 1
            yield PoolSample(key=key, shard=os.path.basename(shard), image=image, caption=caption,
                             metadata=metadata)
        if self.stats["corrupt"]:
            log.warning("webdataset: skipped %d corrupt sample(s) of %d (first: %s)", self.stats["corrupt"],
                        self.stats["seen"], self.stats["corrupt_keys"][:3])

    def report(self) -> str:
        s = self.stats
        return f"{s['yielded']} samples read, {s['corrupt']} corrupt skipped (of {s['seen']} seen)"


def load_webdataset(root, split: str = "train", **kw) -> WebDatasetPool:
    """`split` is accepted for registry symmetry; a ROOT/<split>/ folder of shards is used if present."""
    if isinstance(root, (str, os.PathLike)) and (Path(root) / split).is_dir():
        root = Path(root) / split
    return WebDatasetPool(root, **kw)
