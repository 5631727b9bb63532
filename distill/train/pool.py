"""Random-access view of webdataset pool shards for the trainer, stored as columns.

Token-balanced batching must know each image's token count before it plans a step, and resuming
must reach any sample without replaying the stream. So the trainer indexes the shards once: for
every image member of every ``*.tar`` it records (shard, byte offset, size, width, height) and the
sample key by reading only the image header. Images whose header does not parse are skipped and
counted; an image that fails to decode later, at training time, is dropped from its step and counted.

At the paper's scale (213M images in stage 2) one Python object per image would take ~90 GB per rank,
so everything here is numpy columns:
- the index of a source is two ``.npy`` files memory-mapped from ``INDEX_DIR/source_<i>/``
  (``entries.npy``: a 24-byte record per image; ``keys.npy``: fixed-width key bytes). A rank pages in
  only the rows of the images it reads.
- the plan of the pool (which index row each item is, its side budget, its target size and token
  count) is 18 bytes per item in memory; the sampler adds its 4-byte token counts and its 4-byte
  permutation: 26 bytes per item resident (`amoe distill perf --bench pool` measures it).

Under torchrun each rank indexes every world-size-th shard into ``parts/`` (one file per shard, so an
interrupted indexing resumes where it stopped), rank 0 joins the parts, and every rank maps the result.
Independent processes that index one folder at once (the quickstart fills each teacher's targets in
its own process) take turns under a file lock: the first builds, the others map what it wrote.
``meta.json`` (written last) names the shards by file name, size and mtime; a changed shard rebuilds.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from distill.data.base import decode_rgb
from distill.data.pool import sample_key, tar_members
from distill.io import FileLock, atomic_path, write_json_atomic
from distill.student.processor import smart_resize

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_VERSION = 3   # 3: columnar (entries.npy + keys.npy); 2: sample keys by webdataset's rule
PLAN_CHUNK = 1 << 20      # images planned at a time when a pool is built
ENTRY_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<i8"), ("size", "<u4"),
                        ("width", "<u4"), ("height", "<u4")])


@dataclass(frozen=True)
class PoolEntry:
    """One indexed image, made on demand from the columns (never held for the whole pool)."""
    shard: str
    offset: int
    size: int
    key: str
    width: int
    height: int


def _shard_signature(shards: Sequence[Path]) -> list[list]:
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in shards]


def list_shards(path: str | os.PathLike) -> list[Path]:
    """Shard files of a pool source (same rules as the pool reader: dir, dir/shards, list, brace pattern)."""
    from distill.data.pool import resolve_shards

    return [Path(s) for s in resolve_shards(path)]


class PoolIndex:
    """The images of one data source: `entries` (ENTRY_DTYPE records) and `keys` (bytes), row-aligned."""

    def __init__(self, shards: list[Path], entries: np.ndarray, keys: np.ndarray, corrupt: int):
        self.shards, self.entries, self.keys, self.corrupt = shards, entries, keys, int(corrupt)

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, row: int) -> PoolEntry:
        e = self.entries[row]
        return PoolEntry(str(self.shards[int(e["shard"])]), int(e["offset"]), int(e["size"]),
                         self.keys[row].decode("utf-8"), int(e["width"]), int(e["height"]))

    def shard_rows(self) -> np.ndarray:
        """Row where each shard's entries start, plus len(self) at the end (rows are in shard order)."""
        return np.searchsorted(self.entries["shard"], np.arange(len(self.shards) + 1), side="left")


def _index_shard(shard_id: int, shard: Path) -> tuple[np.ndarray, list[bytes], int]:
    rows, keys, corrupt = [], [], 0
    for m, data in tar_members(shard, IMAGE_EXTS):
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                im.verify()
        except Exception:  # any parse failure = unusable image: skip and count
            corrupt += 1
            continue
        rows.append((shard_id, m.offset_data, m.size, w, h))
        keys.append(sample_key(m.name).encode("utf-8"))
    return np.array(rows, dtype=ENTRY_DTYPE), keys, corrupt


def _keys_array(keys: list[bytes]) -> np.ndarray:
    return np.array(keys, dtype=f"S{max([len(k) for k in keys] + [1])}")


def _join(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    width = max([k.dtype.itemsize for _, k, _ in parts] + [1])
    entries = np.concatenate([e for e, _, _ in parts]) if parts else np.zeros(0, ENTRY_DTYPE)
    keys = np.concatenate([k.astype(f"S{width}") for _, k, _ in parts]) if parts else np.zeros(0, "S1")
    return entries, keys, sum(c for _, _, c in parts)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_index(folder: Path, signature: list[list], entries: np.ndarray, keys: np.ndarray, corrupt: int) -> None:
    """A source's index files; `meta.json` (which marks the index complete) last."""
    _save_npy(folder / "entries.npy", entries)
    _save_npy(folder / "keys.npy", keys)
    write_json_atomic(folder / "meta.json", {"version": INDEX_VERSION, "shards": signature, "corrupt": int(corrupt),
                                             "images": len(entries)})


def _write_index_parts(folder: Path, shards: list[Path], sig: list[list], rank: int, world_size: int,
                       barrier: Callable[[], None]) -> None:
    """Each rank indexes its share of the shards, one part file per shard (resumable); rank 0 joins them."""
    part_dir = folder / "parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    for i in range(rank, len(shards), world_size):
        part = part_dir / f"{i:07d}.{sig[i][1]}.{sig[i][2]}.npz"
        if not part.exists():
            e, k, c = _index_shard(i, shards[i])
            with atomic_path(part) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, entries=e, keys=_keys_array(k), corrupt=np.array(c))
    barrier()
    if rank == 0:
        parts = []
        for i in range(len(shards)):
            with np.load(part_dir / f"{i:07d}.{sig[i][1]}.{sig[i][2]}.npz") as z:
                parts.append((z["entries"], z["keys"], int(z["corrupt"])))
        write_index(folder, sig, *_join(parts))
        for f in part_dir.iterdir():
            f.unlink()
        part_dir.rmdir()
    barrier()


def build_index(path: str | os.PathLike, index_dir: str | os.PathLike | None = None, *, rank: int = 0,
                world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> PoolIndex:
    """Index every image in the shards under `path`; with `index_dir`, keep it there (memory-mapped,
    reused while the shards are unchanged, built by all ranks together). Every rank must call it."""
    shards = list_shards(path)
    sig = _shard_signature(shards)
    if index_dir is None:
        parts = []
        for i, s in enumerate(shards):
            e, k, c = _index_shard(i, s)
            parts.append((e, _keys_array(k), c))
        return PoolIndex(shards, *_join(parts))
    folder = Path(index_dir)
    meta_file = folder / "meta.json"

    def current() -> dict | None:
        if not meta_file.exists():
            return None
        meta = json.loads(meta_file.read_text())
        return meta if meta.get("version") == INDEX_VERSION and meta.get("shards") == sig else None

    if current() is None and world_size == 1:
        # independent processes (the two teachers' target fills, side by side) may index one folder
        # at once: one builds, the others wait for it and then map its result
        lock = FileLock(folder / ".building", "pool indexing")
        while not lock.acquire():
            time.sleep(0.2)
        try:
            if current() is None:
                _write_index_parts(folder, shards, sig, 0, 1, barrier)
        finally:
            lock.release()
    elif current() is None:
        _write_index_parts(folder, shards, sig, rank, world_size, barrier)
    meta = current()
    if meta is None:
        raise RuntimeError(f"pool index {folder} was not written; is another run indexing the same folder?")
    return PoolIndex(shards, np.load(folder / "entries.npy", mmap_mode="r"),
                     np.load(folder / "keys.npy", mmap_mode="r"), meta["corrupt"])


def read_image(entry: PoolEntry) -> Image.Image:
    """Decode one indexed image (raises on corrupt data; the caller skips and counts)."""
    with open(entry.shard, "rb") as f:
        f.seek(entry.offset)
        data = f.read(entry.size)
    return decode_rgb(data)


class UndecodableImage(Exception):
    """An image of the pool that does not decode despite a valid header (its readers skip and count it)."""


def lazy_image(entry: PoolEntry) -> Callable[[], Image.Image]:
    """The entry's image, decoded on the first call only (a reader whose outputs are all cached never
    decodes it); `UndecodableImage` when it does not decode."""
    decoded: list[Image.Image] = []

    def image() -> Image.Image:
        if not decoded:
            try:
                decoded.append(read_image(entry))
            except Exception as e:
                raise UndecodableImage(entry.key) from e
        return decoded[0]
    return image


def fit_token_budget(h: int, w: int, patch: int, max_tokens: int) -> tuple[int, int]:
    """(H, W) shrunk along the long side until (H/p)(W/p) <= max_tokens. `smart_resize` keeps every
    side >= one patch, so an extreme aspect (a 20 x 4000 banner) can exceed the area budget; such an
    image is narrowed to fit instead of refusing the whole run."""
    gh, gw = h // patch, w // patch
    if gh * gw <= max_tokens:
        return h, w
    if gh >= gw:
        gh = max(1, max_tokens // gw)
    else:
        gw = max(1, max_tokens // gh)
    return gh * patch, gw * patch


def planned_size(height: int, width: int, resolution: int, min_resolution: int, patch: int) -> tuple[int, int]:
    """The student's (H, W) for an image of this size at this side budget."""
    hw = smart_resize(height, width, patch, min_resolution ** 2, resolution ** 2, strict=False)
    return fit_token_budget(*hw, patch, (resolution // patch) ** 2)


def plan_sizes(heights: np.ndarray, widths: np.ndarray, resolutions: np.ndarray, min_resolution: int,
               patch: int) -> tuple[np.ndarray, np.ndarray]:
    """`planned_size` for many images at once, in numpy: the same float64 operations and roundings
    (`np.rint` is Python's half-to-even `round`), so the sizes agree exactly (tested). A web pool has
    millions of distinct image sizes, so neither a Python loop nor a memo of them would scale."""
    f = float(patch)
    h0, w0 = heights.astype(np.float64), widths.astype(np.float64)
    small = (h0 < f) | (w0 < f)                       # a side under one patch: scaled up to one first
    if small.any():
        s = f / np.minimum(h0, w0)
        h0 = np.where(small, np.maximum(f, np.rint(h0 * s)), h0)
        w0 = np.where(small, np.maximum(f, np.rint(w0 * s)), w0)
    h, w = np.rint(h0 / f) * f, np.rint(w0 / f) * f
    max_px, min_px = resolutions.astype(np.float64) ** 2, float(min_resolution) ** 2
    area = h0 * w0
    over = h * w > max_px
    beta = np.sqrt(area / max_px)
    h = np.where(over, np.maximum(f, np.floor(h0 / beta / f) * f), h)
    w = np.where(over, np.maximum(f, np.floor(w0 / beta / f) * f), w)
    under = ~over & (h * w < min_px)
    beta = np.sqrt(min_px / area)
    h = np.where(under, np.ceil(h0 * beta / f) * f, h)
    w = np.where(under, np.ceil(w0 * beta / f) * f, w)
    # fit_token_budget: narrow the long side of what still exceeds the budget (extreme aspects)
    gh, gw = (h // f).astype(np.int64), (w // f).astype(np.int64)
    budget = (resolutions.astype(np.int64) // patch) ** 2
    exceed, tall = gh * gw > budget, gh >= gw
    gh, gw = (np.where(exceed & tall, np.maximum(1, budget // np.maximum(gw, 1)), gh),
              np.where(exceed & ~tall, np.maximum(1, budget // np.maximum(gh, 1)), gw))
    return (gh * patch).astype(np.uint16), (gw * patch).astype(np.uint16)


@dataclass(frozen=True)
class PlannedImage:
    entry: PoolEntry
    resolution: int          # side budget (max pixels = resolution^2)
    size: tuple[int, int]    # target (H, W) for the student
    tokens: int


class TrainingPool:
    """All sources of a recipe as one indexable list of (image, resolution, token count).

    A source's ``weight`` sets its share of the list (entries repeated or subsampled deterministically);
    each listed image gets one side budget drawn from the source's ``resolutions`` with
    ``resolution_weights`` (fixed per image and seed, so resuming sees the same plan).

    Columns, one value per item: ``row`` (int64, into the concatenated source indexes), ``resolution``,
    ``height``/``width`` (the student's target size; uint16) and ``tokens`` (int32).
    """

    def __init__(self, sources, patch_size: int, seed: int, index_dir: str | os.PathLike | None = None,
                 *, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None):
        self.indexes: list[PoolIndex] = []
        self.corrupt_at_index = 0
        selected = []
        for i, src in enumerate(sources):
            folder = None if index_dir is None else Path(index_dir) / f"source_{i}"
            index = build_index(src.path, folder, rank=rank, world_size=world_size, barrier=barrier)
            self.corrupt_at_index += index.corrupt
            rows = np.arange(len(index), dtype=np.int64)
            if src.manifest:
                from distill.curation.manifest import manifest_rows

                rows = manifest_rows(index, src.manifest, src.path)
            if src.limit is not None:
                rows = rows[:src.limit]
            if not len(rows):
                raise ValueError(f"data source {src.path} has no readable images")
            self.indexes.append(index)
            selected.append(rows)
        self._starts = np.cumsum([0] + [len(ix) for ix in self.indexes])
        total = sum(len(r) for r in selected)
        weights = [s.weight for s in sources]
        rng = np.random.default_rng(seed + 17)
        shares = [max(1, round(total * w / sum(weights))) for w in weights]
        n = sum(shares)
        self.row = np.empty(n, np.int64)
        self.resolution = np.empty(n, np.uint16)
        self.height, self.width = np.empty(n, np.uint16), np.empty(n, np.uint16)
        at = 0
        for k, (src, picked, share) in enumerate(zip(sources, selected, shares)):
            p = np.asarray(src.resolution_weights or [1.0] * len(src.resolutions), dtype=np.float64)
            cum, budgets = np.cumsum(p / p.sum()), np.asarray(src.resolutions, dtype=np.uint16)
            e = self.indexes[k].entries
            # in chunks: the temporaries of planning stay a few bytes per item of one chunk, not of the pool
            for lo in range(0, share, PLAN_CHUNK):
                hi = min(share, lo + PLAN_CHUNK)
                mine = picked[np.arange(lo, hi) % len(picked)]
                r = budgets[np.minimum(np.searchsorted(cum, rng.random(hi - lo), side="right"), len(p) - 1)]
                out = slice(at + lo, at + hi)
                self.row[out] = mine + self._starts[k]
                self.resolution[out] = r
                self.height[out], self.width[out] = plan_sizes(e["height"][mine], e["width"][mine], r,
                                                               src.min_resolution, patch_size)
            at += share
        self.tokens = (self.height // patch_size).astype(np.int32)
        self.tokens *= self.width // patch_size

    def __len__(self) -> int:
        return len(self.row)

    def entry_of_row(self, row: int) -> PoolEntry:
        k = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.indexes[k].entry(int(row - self._starts[k]))

    def item(self, i: int) -> PlannedImage:
        return PlannedImage(self.entry_of_row(int(self.row[i])), int(self.resolution[i]),
                            (int(self.height[i]), int(self.width[i])), int(self.tokens[i]))

    def nbytes(self) -> int:
        """Bytes this pool holds in memory (the columns; the indexes are memory-mapped files)."""
        return sum(a.nbytes for a in (self.row, self.resolution, self.height, self.width, self.tokens))
