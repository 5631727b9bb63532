"""Random-access view of webdataset pool shards for the trainer.

Token-balanced batching must know each image's token count before it plans a step, and resuming
must reach any sample without replaying the stream. So the trainer indexes the shards once: for
every image member of every ``*.tar`` it records (shard, byte offset, size, key, width, height) by
reading only the image header. Images whose header does not parse are skipped and counted; an image
that fails to decode later, at training time, is dropped from its step and counted too.

The index is a JSON file (``pool_index.json``) keyed by the shards' names, sizes and mtimes, rebuilt
when a shard changes.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from distill.data.base import decode_rgb
from distill.data.pool import sample_key, tar_members
from distill.io import write_json_atomic
from distill.student.processor import smart_resize

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_VERSION = 2   # 2: sample keys by webdataset's rule (first dot of the file name)


@dataclass(frozen=True)
class PoolEntry:
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


def build_index(path: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> tuple[list[PoolEntry], int]:
    """Index every image in the shards under `path`. Returns (entries, corrupt_count)."""
    import json

    shards = list_shards(path)
    sig = _shard_signature(shards)
    if cache_file is not None and Path(cache_file).exists():
        cached = json.loads(Path(cache_file).read_text())
        if cached.get("version") == INDEX_VERSION and cached.get("shards") == sig:
            return [PoolEntry(**e) for e in cached["entries"]], int(cached["corrupt"])
    entries: list[PoolEntry] = []
    corrupt = 0
    for shard in shards:
        for m, data in tar_members(shard, IMAGE_EXTS):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    im.verify()
            except Exception:  # any parse failure = unusable image: skip and count
                corrupt += 1
                continue
            key = sample_key(m.name)
            entries.append(PoolEntry(str(shard), m.offset_data, m.size, key, w, h))
    if cache_file is not None:
        write_json_atomic(cache_file, {"version": INDEX_VERSION, "shards": sig, "corrupt": corrupt,
                                       "entries": [e.__dict__ for e in entries]})
    return entries, corrupt


def read_image(entry: PoolEntry) -> Image.Image:
    """Decode one indexed image (raises on corrupt data; the caller skips and counts)."""
    with open(entry.shard, "rb") as f:
        f.seek(entry.offset)
        data = f.read(entry.size)
    return decode_rgb(data)


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
    """

    def __init__(self, sources, patch_size: int, seed: int, index_dir: str | os.PathLike | None = None):
        self.items: list[PlannedImage] = []
        self.corrupt_at_index = 0
        g = torch.Generator().manual_seed(seed + 17)
        per_source = []
        for i, src in enumerate(sources):
            cache = None if index_dir is None else Path(index_dir) / f"pool_index_{i}.json"
            entries, corrupt = build_index(src.path, cache)
            self.corrupt_at_index += corrupt
            if src.manifest:
                from distill.curation.manifest import restrict_to_manifest

                entries = restrict_to_manifest(entries, src.manifest, src.path)
            if src.limit is not None:
                entries = entries[:src.limit]
            if not entries:
                raise ValueError(f"data source {src.path} has no readable images")
            per_source.append(entries)
        total = sum(len(e) for e in per_source)
        weights = [s.weight for s in sources]
        for src, entries, wgt in zip(sources, per_source, weights):
            share = max(1, round(total * wgt / sum(weights)))
            reps = [entries[j % len(entries)] for j in range(share)]
            res_w = torch.tensor(src.resolution_weights or [1.0] * len(src.resolutions), dtype=torch.float)
            choice = torch.multinomial(res_w, len(reps), replacement=True, generator=g).tolist()
            for e, c in zip(reps, choice):
                res = src.resolutions[c]
                hw = smart_resize(e.height, e.width, patch_size, src.min_resolution ** 2, res ** 2, strict=False)
                h, w = fit_token_budget(*hw, patch_size, (res // patch_size) ** 2)
                self.items.append(PlannedImage(e, res, (h, w), (h // patch_size) * (w // patch_size)))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def token_counts(self) -> list[int]:
        return [it.tokens for it in self.items]
