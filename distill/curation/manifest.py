"""Reading a curated manifest where data is consumed: the trainer restricts a pool to its samples.

A manifest is a parquet file with at least the columns ``key`` and ``shard`` (shard = tar file name).
Everything is checked before training starts: a manifest naming shards the data source does not have, or
keys its shards do not hold, is an error that lists them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from distill.errors import AmoeError


class ManifestError(AmoeError, ValueError):
    """A manifest does not match the pool it is applied to."""


def read_manifest(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found; make one with `amoe curate sample --out {path}`")
    df = pd.read_parquet(path, columns=None)
    missing = {"key", "shard"} - set(df.columns)
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {sorted(missing)}; expected key, shard, ...")
    return df


def manifest_rows(index, manifest: str | os.PathLike, source: str = "") -> np.ndarray:
    """Rows of a `distill.train.pool.PoolIndex` listed in the manifest, in the manifest's order. Raises
    ManifestError on shards or keys the pool lacks.

    Matched shard by shard on the index's columns (sorted keys, binary search), so no Python object
    is made per pool image: a 13M-sample manifest of a 200M-image pool is a search, not a dict."""
    df = read_manifest(manifest)
    names = {Path(s).name: i for i, s in enumerate(index.shards)}
    shard_col = df["shard"].astype(str).to_numpy()
    key_col = df["key"].astype(str).to_numpy()
    absent = sorted(set(shard_col) - set(names))
    if absent:
        raise ManifestError(
            f"manifest {manifest} references {len(absent)} shard(s) missing from data source {source or '?'}: "
            f"{absent[:10]}{' ...' if len(absent) > 10 else ''}; point the source at the pool the manifest was "
            f"sampled from")
    starts = index.shard_rows()
    rows = np.full(len(df), -1, dtype=np.int64)
    for shard, at in pd.Series(np.arange(len(df))).groupby(shard_col, sort=False).indices.items():
        lo, hi = int(starts[names[shard]]), int(starts[names[shard] + 1])
        if hi == lo:
            continue
        want = np.char.encode(key_col[at].astype(str), "utf-8")
        width = max(want.dtype.itemsize, index.keys.dtype.itemsize)   # compare at one width: no truncation
        have = np.asarray(index.keys[lo:hi]).astype(f"S{width}")
        want = want.astype(f"S{width}")
        order = np.argsort(have, kind="stable")
        pos = np.minimum(np.searchsorted(have[order], want), len(order) - 1)
        found = have[order][pos] == want
        rows[at[found]] = lo + order[pos[found]]
    lost = [f"{s}/{k}" for s, k in zip(shard_col[rows < 0], key_col[rows < 0])]
    if lost:
        raise ManifestError(
            f"manifest {manifest}: {len(lost)} sample(s) not found (or not decodable) in their shards: "
            f"{lost[:10]}{' ...' if len(lost) > 10 else ''}; the shards changed since the manifest was made")
    return rows
