"""Embed a pool (webdataset shards or an image list) with any `Encoder` into memory-mapped float32 arrays.

Layout of an embeddings directory::

    OUT/units/<unit>.npy        float32 (rows, dim), written through numpy.lib.format.open_memmap
    OUT/units/<unit>.done.json  keys + valid flags of that unit, written atomically after its rows are flushed
    OUT/embeddings.json         encoder fingerprint, head, resolution, dim, units in order, row counts
    OUT/index.parquet           one row per sample: key, shard, unit, row (global), valid

A unit is one webdataset shard (or a chunk of an image list). Under torchrun each rank embeds whole units
(unit i goes to rank i % world_size) and skips units whose done file exists, so a killed run resumes
where it stopped. Images that do not decode keep their row (zeros, ``valid = false``) so row numbers
never depend on decode luck; they are left out of clustering. A non-finite embedding is an error
listing the keys: it would poison every centroid it touches.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from distill.data.base import decode_rgb
from distill.data.pool import sample_key, tar_members
from distill.encoders.base import Encoder
from distill.errors import AmoeError
from distill.io import atomic_path, portable, write_json_atomic

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
LIST_CHUNK = 1000          # images per unit when the pool is an image list
FORMAT_VERSION = 1


class NonFiniteEmbeddingError(AmoeError, ValueError):
    """The encoder produced NaN/inf for some samples."""


@dataclass(frozen=True)
class Unit:
    name: str                 # file stem under OUT/units/
    shard: str                # what the manifest records as the sample's shard (tar basename or list name)
    path: str                 # tar file, or the image-list file
    start: int = 0            # image-list units: line range
    stop: int = 0

    @property
    def is_tar(self) -> bool:
        return self.path.endswith(".tar")


def _is_image_list(pool: str) -> bool:
    p = Path(pool)
    return p.is_file() and p.suffix in (".txt", ".lst", ".list")


def _list_lines(path: str) -> list[str]:
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def pool_units(pool: str | os.PathLike | list) -> list[Unit]:
    """Shards of a webdataset pool (same rules as the pool reader), or chunks of an image-list file."""
    from distill.data.pool import resolve_shards

    if not isinstance(pool, (list, tuple)) and _is_image_list(str(pool)):
        lines = _list_lines(str(pool))
        if not lines:
            raise ValueError(f"image list {pool} is empty; it should hold one image path per line")
        name = Path(pool).name
        return [Unit(f"{Path(pool).stem}-{i // LIST_CHUNK:06d}", name, str(pool), i, min(i + LIST_CHUNK, len(lines)))
                for i in range(0, len(lines), LIST_CHUNK)]
    shards = resolve_shards(pool)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"pool shards missing: {missing[:5]}")
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("pool shards must have distinct file names (the manifest records shards by name)")
    return [Unit(Path(s).stem, Path(s).name, str(s)) for s in shards]


def unit_keys(unit: Unit) -> list[str]:
    """Sample keys of a unit in order; for tars, webdataset's key of each image member (`sample_key`)
    (the key the trainer's pool index uses)."""
    if unit.is_tar:
        return [sample_key(m.name) for m, _ in tar_members(unit.path, IMAGE_EXTS, read=False)]
    return _list_lines(unit.path)[unit.start:unit.stop]


def unit_images(unit: Unit) -> Iterator[tuple[str, Image.Image | None]]:
    """(key, RGB image or None when it does not decode), in `unit_keys` order."""
    def decode(data_or_path) -> Image.Image | None:
        try:
            return decode_rgb(data_or_path)
        except Exception:  # any decode failure: the row is kept and marked invalid
            return None

    if unit.is_tar:
        for m, data in tar_members(unit.path, IMAGE_EXTS):
            yield sample_key(m.name), decode(data)
    else:
        base = Path(unit.path).parent
        for line in _list_lines(unit.path)[unit.start:unit.stop]:
            p = Path(line) if Path(line).is_absolute() else base / line
            yield line, decode(str(p)) if p.is_file() else None


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _summary(encoder: Encoder, batch: list[torch.Tensor], head: str) -> np.ndarray:
    with torch.inference_mode():
        feats = encoder.encode([x.to(encoder.device, encoder.dtype) for x in batch])
    return feats.summary[head].detach().to(torch.float32).cpu().numpy()


def embed_unit(encoder: Encoder, unit: Unit, out_dir: Path, head: str, resolution: int | None,
               batch_size: int, dim: int | None = None) -> dict:
    """Embed one unit into OUT/units/<unit>.npy and write its done file. Returns the done record."""
    keys = unit_keys(unit)
    npy = out_dir / "units" / f"{unit.name}.npy"
    valid = np.zeros(len(keys), dtype=bool)
    bad: list[str] = []
    with atomic_path(npy) as tmp:
        arr = None
        if dim is not None:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), dim))
        batch, rows, row = [], [], 0

        def flush():
            nonlocal arr
            if not batch:
                return
            emb = _summary(encoder, batch, head)
            if arr is None:   # width known from the first batch
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), emb.shape[1]))
            finite = np.isfinite(emb).all(1)
            bad.extend(keys[r] for r, ok in zip(rows, finite) if not ok)
            arr[rows] = np.where(finite[:, None], emb, 0)
            valid[rows] = True
            batch.clear()
            rows.clear()

        for key, image in unit_images(unit):
            if key != keys[row]:
                raise RuntimeError(f"{unit.path}: member order changed while reading ({key} != {keys[row]})")
            if image is not None:
                batch.append(encoder.preprocess(image, resolution))
                rows.append(row)
                if len(batch) == batch_size:
                    flush()
            row += 1
        flush()
        if bad:
            raise NonFiniteEmbeddingError(
                f"encoder {encoder.name} produced non-finite embeddings for {len(bad)} sample(s) of {unit.shard}: "
                f"{bad[:20]}{' ...' if len(bad) > 20 else ''}; check the encoder's dtype (fp32 instead of "
                f"bf16/fp16) and those images")
        if arr is None:   # every image failed to decode (or an empty unit): zero rows of the known width
            width = dim or 0
            with open(tmp, "wb") as f:
                np.save(f, np.zeros((len(keys), width), dtype=np.float32))
        else:
            arr.flush()
            width = int(arr.shape[1])
            del arr
    record = {"unit": unit.name, "shard": unit.shard, "path": unit.path, "rows": len(keys), "dim": width,
              "keys": keys, "valid": valid.tolist(), "corrupt": int((~valid).sum())}
    # the done file is the commit point: written only after the rows above are flushed and renamed
    write_json_atomic(out_dir / "units" / f"{unit.name}.done.json", portable(record, out_dir / "units"))
    return record


def _settings(encoder: Encoder, head: str, resolution: int | None) -> dict:
    return {"encoder": encoder.fingerprint(), "head": head, "resolution": resolution,
            "preprocess": encoder.preprocess_config()}


def embed_pool(encoder: Encoder, pool: str | os.PathLike | list, out_dir: str | os.PathLike,
               head: str | None = None, resolution: int | None = None, batch_size: int = 32,
               progress: bool = True) -> Path:
    """Embed every unit of `pool` with `encoder.summary[head]` into `out_dir` (see module doc).

    Resumable: units with a done file are skipped. Ranks (if a process group is initialised) split the
    units; rank 0 writes embeddings.json and index.parquet once all units are done. Returns `out_dir`.
    """
    out = Path(out_dir)
    head = head or encoder.heads[0]
    encoder.require_head(head)
    units = pool_units(pool)
    settings = _settings(encoder, head, resolution)
    rank, world = _rank_world()
    settings_file = out / "settings.json"
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
        if old != json.loads(json.dumps(settings, default=str)):
            raise ValueError(f"{out} holds embeddings made with different settings ({old}); "
                             f"use a new --out or delete it to re-embed")
    elif rank == 0:
        write_json_atomic(settings_file, settings)
    mine = [u for i, u in enumerate(units) if i % world == rank]
    todo = [u for u in mine if not (out / "units" / f"{u.name}.done.json").exists()]
    dim = None
    from tqdm import tqdm
    for u in tqdm(todo, desc=f"embed (rank {rank})", disable=not progress, unit="shard"):
        rec = embed_unit(encoder, u, out, head, resolution, batch_size, dim)
        dim = dim or (rec["dim"] or None)
    _barrier()
    if rank == 0:
        finalize(out, units)
    _barrier()
    return out


def finalize(out: Path, units: list[Unit]) -> None:
    """Write embeddings.json + index.parquet from the done files (all units must be done)."""
    import pandas as pd

    records = []
    missing = []
    for u in units:
        f = out / "units" / f"{u.name}.done.json"
        if not f.exists():
            missing.append(u.name)
            continue
        records.append(json.loads(f.read_text()))
    if missing:
        raise RuntimeError(f"embedding incomplete: {len(missing)} unit(s) not done ({missing[:5]}); "
                           f"run the same command again to resume")
    dims = {r["dim"] for r in records if r["dim"]}
    if len(dims) > 1:
        raise ValueError(f"units of {out} have different widths {sorted(dims)}; re-embed with one encoder")
    dim = dims.pop() if dims else 0
    frames, start = [], 0
    for r in records:
        n = r["rows"]
        frames.append(pd.DataFrame({"key": r["keys"], "shard": r["shard"], "unit": r["unit"],
                                    "row": np.arange(start, start + n, dtype=np.int64), "valid": r["valid"]}))
        start += n
    index = pd.concat(frames, ignore_index=True)
    with atomic_path(out / "index.parquet") as tmp:
        index.to_parquet(tmp, index=False)
    settings = json.loads((out / "settings.json").read_text())
    write_json_atomic(out / "embeddings.json", {
        "version": FORMAT_VERSION, **settings, "dim": dim, "rows": start, "valid": int(index["valid"].sum()),
        "units": [{"unit": r["unit"], "shard": r["shard"], "rows": r["rows"], "corrupt": r["corrupt"]} for r in records]})


class EmbeddingSet:
    """Read side of an embeddings directory: the index plus memory-mapped unit arrays. The index (a key
    per image: gigabytes at a 2.3B pool) is read only when asked for; clustering reads the `valid`
    column alone, one rank's stretch at a time."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta = self.root / "embeddings.json"
        if not meta.exists():
            raise FileNotFoundError(f"{self.root} is not a finished embeddings directory (no embeddings.json); "
                                    f"run `amoe curate embed --out {self.root}` (again, to resume) first")
        self.meta = json.loads(meta.read_text())
        self.dim = int(self.meta["dim"])

    @functools.cached_property
    def index(self):
        import pandas as pd

        return pd.read_parquet(self.root / "index.parquet")

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def n_valid(self) -> int:
        return int(self.meta["valid"])

    @property
    def valid_rows(self) -> np.ndarray:
        return self.valid_rows_between(0, self.n_valid)

    def valid_rows_between(self, start: int, stop: int, batch_rows: int = 1 << 22) -> np.ndarray:
        """Global row ids of the valid rows number start..stop-1 (in row order), read batch by batch
        from the index's `valid` column: no array over the whole pool."""
        import pyarrow.parquet as pq

        out, seen, base = [], 0, 0      # seen: valid rows before this batch; base: its first row id
        for batch in pq.ParquetFile(self.root / "index.parquet").iter_batches(columns=["valid"],
                                                                              batch_size=batch_rows):
            valid = batch.column(0).to_numpy(zero_copy_only=False)
            n = int(valid.sum())
            if seen + n > start and seen < stop:
                ids = np.flatnonzero(valid) + base
                out.append(ids[max(0, start - seen):stop - seen])
            seen, base = seen + n, base + len(valid)
            if seen >= stop:
                break
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim) for global row ids (read unit by unit through memory maps)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        starts = np.cumsum([0] + [u["rows"] for u in self.meta["units"]])
        which = np.searchsorted(starts, rows, side="right") - 1
        for ui in np.unique(which):
            sel = np.nonzero(which == ui)[0]
            arr = np.load(self.root / "units" / f"{self.meta['units'][ui]['unit']}.npy", mmap_mode="r")
            out[sel] = arr[rows[sel] - starts[ui]]
        return out
