"""Reading a curated manifest where data is consumed: the trainer restricts a pool to its samples.

A manifest is a parquet file with at least the columns ``key`` and ``shard`` (shard = tar file name).
Everything is checked before training starts: a manifest naming shards the data source does not have, or
keys its shards do not hold, is an error that lists them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, TypeVar

from distill.errors import AmoeError

T = TypeVar("T")


class ManifestError(AmoeError, ValueError):
    """A manifest does not match the pool it is applied to."""


def read_manifest(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found; make one with `amoe curate sample --out {path}`")
    df = pd.read_parquet(path, columns=None)
    missing = {"key", "shard"} - set(df.columns)
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {sorted(missing)}; expected key, shard, ...")
    return df


def restrict_to_manifest(entries: Sequence[T], manifest: str | os.PathLike, source: str = "") -> list[T]:
    """Keep the pool entries (objects with ``.shard`` path and ``.key``) listed in the manifest, in the
    manifest's order. Raises ManifestError on shards or keys the pool lacks."""
    df = read_manifest(manifest)
    by_id = {(Path(e.shard).name, e.key): e for e in entries}
    have_shards = {s for s, _ in by_id}
    want_shards = set(df["shard"].astype(str))
    absent = sorted(want_shards - have_shards)
    if absent:
        raise ManifestError(
            f"manifest {manifest} references {len(absent)} shard(s) missing from data source {source or '?'}: "
            f"{absent[:10]}{' ...' if len(absent) > 10 else ''}; point the source at the pool the manifest was "
            f"sampled from")
    ids = list(zip(df["shard"].astype(str), df["key"].astype(str)))
    lost = [f"{s}/{k}" for s, k in ids if (s, k) not in by_id]
    if lost:
        raise ManifestError(
            f"manifest {manifest}: {len(lost)} sample(s) not found (or not decodable) in their shards: "
            f"{lost[:10]}{' ...' if len(lost) > 10 else ''}; the shards changed since the manifest was made")
    return [by_id[i] for i in ids]
