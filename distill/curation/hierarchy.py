"""Multi-level k-means with resampling (Vo et al. 2024, "Automatic data curation for self-supervised
learning"): level 1 clusters the embeddings, level l clusters the centroids of level l-1.

Resampling refinement, per level: after k-means, take in every cluster the `sample_size` points closest
to its centroid, re-run k-means on the union of those points starting from the current centroids, and
reassign every point; repeat `resampling_steps` times. Dense regions then stop hoarding centroids, so
the centroids spread more evenly over the concepts of the data.

Output directory::

    OUT/clusters.json                      config, embeddings source, point count, per-level summary
    OUT/points.safetensors                 rows: int64 embedding row of every level-1 point
    OUT/level_<l>/clusters.safetensors     centroids (k, d) f32, assignments (n_in,) i64, distances (n_in,) f32
    OUT/level_<l>/done.json                level settings + fingerprint; written last (the resume point)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.config import parse_dataclass, read_config_file
from distill.curation.split import split_assign, split_fit
from distill.io import TensorFileWriter, fingerprint, map_tensors, write_json_atomic

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
POINT_DTYPES = ("float32", "float16")


@dataclass
class LevelConfig:
    k: int                         # clusters at this level
    niter: int = 20                # Lloyd iterations of the main k-means
    resampling_steps: int = 0      # Vo et al. refinement rounds
    sample_size: int = 10          # points closest to each centroid kept per resampling round
    resample_niter: int = 5        # k-means iterations on the resampled points
    init: str = "random"           # random | kmeans++ (seeded from a subsample of 32 points per centroid)
    n_splits: int = 1              # > 1: k-means at k / n_splits, then each cluster split (distill.curation.split)


@dataclass
class ClusterConfig:
    levels: list[LevelConfig]
    name: str = "custom"
    engine: str = "faiss"          # faiss (one node) | torch (torch.distributed across ranks)
    normalize: bool = True         # L2-normalise embeddings before level 1 (cosine geometry)
    seed: int = 0
    fit_points: int | None = None  # fit level 1 on a seeded uniform subsample of this many points, then
                                   # assign every point to its centroids (the paper: 1B fit, 2.3B assigned)
    point_dtype: str = "float32"   # float16 halves a rank's points in memory (the paper's 72M x 768 per
                                   # rank: 206 -> 103 GiB); distances and sums stay float32 / float64
    description: str = ""


def parse_cluster_config(raw: dict) -> ClusterConfig:
    if isinstance(raw, dict) and not raw.get("levels"):
        raise ValueError("clustering config needs a non-empty 'levels' list, e.g. [{\"k\": 100}, {\"k\": 10}]")
    cfg = parse_dataclass(ClusterConfig, raw, "", top="the clustering config")
    levels = cfg.levels
    from distill.curation.kmeans import ENGINES, INIT_METHODS
    if cfg.engine not in ENGINES:
        raise ValueError(f"clustering config: engine must be one of {ENGINES}, got {cfg.engine!r}")
    if cfg.point_dtype not in POINT_DTYPES:
        raise ValueError(f"clustering config: point_dtype must be one of {POINT_DTYPES}, got {cfg.point_dtype!r}")
    if cfg.fit_points is not None and cfg.fit_points < 1:
        raise ValueError(f"clustering config: fit_points must be >= 1 or null, got {cfg.fit_points}")
    for i, lv in enumerate(levels, 1):
        if lv.init not in INIT_METHODS:
            raise ValueError(f"level {i}: init must be one of {INIT_METHODS}, got {lv.init!r}")
        if lv.k < 1 or lv.niter < 1 or lv.resampling_steps < 0 or lv.sample_size < 1 or lv.resample_niter < 1:
            raise ValueError(f"level {i}: need k >= 1, niter >= 1, resampling_steps >= 0, sample_size >= 1, "
                             f"resample_niter >= 1 (got {dataclasses.asdict(lv)})")
        if lv.n_splits < 1 or (lv.n_splits > 1 and lv.resampling_steps):
            raise ValueError(f"level {i}: n_splits must be >= 1, and a split level has no resampling rounds "
                             f"(got n_splits={lv.n_splits}, resampling_steps={lv.resampling_steps})")
        if i > 1 and lv.k > levels[i - 2].k:
            raise ValueError(f"level {i} has k={lv.k} > level {i - 1}'s k={levels[i - 2].k}: "
                             f"each level clusters the previous level's centroids, so k must shrink")
    return cfg


def load_cluster_config(source: str | os.PathLike | dict) -> ClusterConfig:
    """A dict, a JSON path, or a bundled config name ('paper', 'miniworld')."""
    if isinstance(source, dict):
        return parse_cluster_config(source)
    return parse_cluster_config(read_config_file(source, CONFIG_DIR, "clustering config")[0])


# ----------------------------------------------------------------------------- resampling k-means
def _top_m(labels: np.ndarray, dists: np.ndarray, k: int, m: int) -> np.ndarray:
    """Positions of the (at most) m smallest distances within each cluster."""
    order = np.lexsort((dists, labels))
    lab = labels[order]
    starts = np.searchsorted(lab, np.arange(k))
    rank_in_cluster = np.arange(len(lab)) - starts[lab]
    return order[rank_in_cluster < m]


def resample_threshold(engine, labels: np.ndarray, dists: np.ndarray, k: int, m: int) -> np.ndarray:
    """Per cluster, the distance of its m-th closest point over all ranks (each rank sends only its own
    m best candidates per cluster, which always contain the global m best)."""
    keep = _top_m(labels, dists, k, m)
    cand_l = engine.gather_rows(labels[keep].astype(np.int64))
    cand_d = engine.gather_rows(dists[keep].astype(np.float32))
    best = _top_m(cand_l, cand_d, k, m)
    thr = np.full(k, -np.inf, dtype=np.float32)
    np.maximum.at(thr, cand_l[best], cand_d[best])
    return thr


def kmeans_resampled(engine, x: np.ndarray, level: LevelConfig, seed: int, where: str):
    """k-means + resampling rounds. `x` is this rank's slice. Returns (centroids, labels, distances)."""
    c = engine.fit(x, level.k, level.niter, seed, where=where, init_method=level.init)
    labels, dists = engine.assign(x, c)
    for r in range(level.resampling_steps):
        thr = resample_threshold(engine, labels, dists, level.k, level.sample_size)
        chosen = dists <= thr[labels]
        c = engine.fit(x[chosen], level.k, level.resample_niter, seed + 1 + r, init=c, where=where)
        labels, dists = engine.assign(x, c)
    return c, labels, dists


# ----------------------------------------------------------------------------- the hierarchy
SUBSAMPLE_CHUNK = 1 << 20


def subsample_mask(start: int, stop: int, fraction: float, seed: int) -> np.ndarray:
    """Bernoulli(fraction) choice of the global rows [start, stop), independent of how rows are split
    over ranks: row r's coin comes from a generator keyed by (seed, r // 2^20), so no rank needs an array
    over all points (2.3B at paper scale)."""
    mask = np.zeros(stop - start, dtype=bool)
    if stop <= start:
        return mask
    for c in range(start // SUBSAMPLE_CHUNK, (stop - 1) // SUBSAMPLE_CHUNK + 1):
        u = np.random.default_rng([seed, c]).random(SUBSAMPLE_CHUNK)
        lo, hi = max(start, c * SUBSAMPLE_CHUNK), min(stop, (c + 1) * SUBSAMPLE_CHUNK)
        mask[lo - start:hi - start] = u[lo - c * SUBSAMPLE_CHUNK:hi - c * SUBSAMPLE_CHUNK] < fraction
    return mask


def _rank_slice(n: int) -> slice:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
    else:
        r, w = 0, 1
    per = -(-n // w)
    return slice(min(n, r * per), min(n, (r + 1) * per))


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclass
class Level:
    centroids: np.ndarray          # (k, d)
    assignments: np.ndarray        # (n_in,) cluster of each input row (points at level 1, centroids above)
    distances: np.ndarray          # (n_in,) squared distance to that centroid


@dataclass
class Hierarchy:
    levels: list[Level]
    rows: np.ndarray               # embedding row of each level-1 point
    meta: dict = field(default_factory=dict)


LOAD_CHUNK = 1 << 18        # rows read (and normalised in float32) at a time while loading a rank's points


def fit_first_order(mine: slice, n_points: int, cfg: ClusterConfig) -> tuple[np.ndarray | None, int]:
    """This rank's rows in the order level 1 holds them, and how many of them are fitted: with
    `fit_points`, the seeded subsample first and the rest after, so the fit set is a view of the points
    and never a copy (89 GiB per rank at the paper's scale). None (natural order) when every point fits."""
    n_local = mine.stop - mine.start
    if cfg.fit_points is None or cfg.fit_points >= n_points:
        return None, n_local
    mask = subsample_mask(mine.start, mine.stop, cfg.fit_points / n_points, cfg.seed)
    fit = np.flatnonzero(mask)
    return np.concatenate([fit, np.flatnonzero(~mask)]), len(fit)


def load_points(read, ids: np.ndarray, dtype) -> np.ndarray:
    """`read(global ids) -> rows`, chunk by chunk into one `dtype` array (no float32 copy of them all)."""
    first = np.asarray(read(ids[:LOAD_CHUNK]))
    out = np.empty((len(ids), first.shape[1]), dtype)
    out[:len(first)] = first
    for s in range(LOAD_CHUNK, len(ids), LOAD_CHUNK):
        out[s:s + LOAD_CHUNK] = read(ids[s:s + LOAD_CHUNK])
    return out


def _level_file(ldir: Path, k: int, d: int, n_in: int) -> TensorFileWriter:
    return TensorFileWriter(ldir / "clusters.safetensors", {
        "centroids": (np.float32, (k, d)), "assignments": (np.int64, (n_in,)), "distances": (np.float32, (n_in,))})


def _read_level(ldir: Path) -> Level:
    t = map_tensors(ldir / "clusters.safetensors")
    return Level(t["centroids"], t["assignments"], t["distances"])


def _cluster_level(engine, inputs: np.ndarray, fit_x: np.ndarray, lv: LevelConfig, seed: int, where: str,
                   writer: TensorFileWriter) -> tuple[np.ndarray, np.ndarray]:
    """One level on this rank's `inputs`; the centroids go into the level file (the main rank writes
    them), the labels and distances of `inputs` come back."""
    main = _is_main()
    if lv.n_splits > 1:     # the (k, d) table is written group by group and read back by every rank
        _, coarse, offsets = split_fit(engine, fit_x, lv.k, lv.n_splits, lv.niter, seed, where,
                                       out=writer.rows("centroids"), write=main)
        _barrier()
        return split_assign(inputs, coarse, writer.read("centroids"), offsets, engine)
    if fit_x is not inputs:
        c, _, _ = kmeans_resampled(engine, fit_x, lv, seed, where)
        labels, dists = engine.assign(inputs, c)
    else:
        c, labels, dists = kmeans_resampled(engine, inputs, lv, seed, where)
    if main:
        writer.write("centroids", 0, c)
    return labels, dists


def run_hierarchy(points, n_points: int, cfg: ClusterConfig, out_dir: str | os.PathLike,
                  engine, source: dict | None = None, progress: bool = True) -> list[Level]:
    """Cluster level by level. `points`: every (normalised) point by global row, as an (n_points, d) array
    or a function from global row ids to rows; each rank loads only its own slice, in `point_dtype`.

    Each level is written in place into its safetensors file (each rank its own rows of the labels, the
    main rank the centroids), so no rank ever holds the labels of all points; it is committed before
    the next level starts, and a level whose done file matches the config and the input is read back
    (memory-mapped) instead of recomputed."""
    from tqdm import tqdm

    out = Path(out_dir)
    read = points.__getitem__ if isinstance(points, np.ndarray) else points
    mine = _rank_slice(n_points)
    order, n_fit = fit_first_order(mine, n_points, cfg)
    levels: list[Level] = []
    inputs = None
    for i, lv in enumerate(tqdm(cfg.levels, desc="levels", disable=not progress), 1):
        where = f"level {i}"
        n_in = n_points if i == 1 else cfg.levels[i - 2].k
        def identity(src):
            # n_splits and point_dtype enter only when set, so clusterings made before them still resume
            levels = [{k: v for k, v in dataclasses.asdict(lv_).items() if not (k == "n_splits" and v == 1)}
                      for lv_ in cfg.levels[:i]]
            extra = {} if cfg.point_dtype == "float32" else {"point_dtype": cfg.point_dtype}
            return fingerprint({"source": src, "normalize": cfg.normalize, "seed": cfg.seed, "n": n_points,
                                "fit_points": cfg.fit_points, "levels": levels, "engine": cfg.engine, **extra})

        fp = identity(source)
        ldir = out / f"level_{i}"
        done = ldir / "done.json"
        if done.exists():
            rec = json.loads(done.read_text())
            legacy = None   # earlier clusterings named the embeddings by absolute path
            if source and "embeddings" in source and not Path(source["embeddings"]).is_absolute():
                legacy = identity({**source, "embeddings": str((out / source["embeddings"]).resolve())})
            if rec.get("fingerprint") not in (fp, legacy):
                raise ValueError(f"{ldir} was clustered with other settings or input; use a new --out "
                                 f"(or delete {out}) to recluster")
        else:
            if i == 1:
                local = np.arange(mine.start, mine.stop) if order is None else mine.start + order
                inputs = load_points(read, local, np.dtype(cfg.point_dtype))
                del local
            fit_x = inputs[:n_fit] if i == 1 and order is not None else inputs
            writer = _level_file(ldir, lv.k, inputs.shape[1], n_in)
            if _is_main():
                writer.create()
            _barrier()
            labels, dists = _cluster_level(engine, inputs, fit_x, lv, cfg.seed + 1000 * i, where, writer)
            if i == 1 and order is not None:         # back to row order
                labels[order], dists[order] = labels.copy(), dists.copy()
            start = _rank_slice(n_in).start
            writer.write("assignments", start, labels)
            writer.write("distances", start, dists)
            # level statistics from per-rank counts: no rank gathers every label
            sizes = engine.all_reduce(torch.from_numpy(np.bincount(labels, minlength=lv.k).astype(np.int64)))
            inertia = engine.all_reduce(torch.tensor([dists.astype(np.float64).sum()], dtype=torch.float64))
            _barrier()
            if _is_main():
                writer.commit()
                write_json_atomic(done, {"level": i, "fingerprint": fp, "config": dataclasses.asdict(lv),
                                         "n_in": int(n_in), "empty_clusters": int((sizes == 0).sum()),
                                         "largest": int(sizes.max()), "smallest": int(sizes.min()),
                                         "inertia": float(inertia[0])})
            _barrier()
        level = _read_level(ldir)
        levels.append(level)
        # the next level clusters these centroids, split across ranks the same way
        inputs = np.asarray(level.centroids[_rank_slice(len(level.centroids))], dtype=cfg.point_dtype)
    return levels


def cluster_embeddings(embeddings: str | os.PathLike, cfg: ClusterConfig | str | dict, out_dir: str | os.PathLike,
                       engine_name: str | None = None, progress: bool = True) -> Hierarchy:
    """`amoe curate cluster`: the valid rows of an embeddings directory -> a saved hierarchy."""
    from distill.curation.embed import EmbeddingSet
    from distill.curation.kmeans import make_engine

    cfg = cfg if isinstance(cfg, ClusterConfig) else load_cluster_config(cfg)
    if engine_name:
        cfg = dataclasses.replace(cfg, engine=engine_name)
    emb = EmbeddingSet(embeddings)
    n = emb.n_valid
    if n == 0:
        raise ValueError(f"{embeddings} has no valid embeddings to cluster")
    engine = make_engine(cfg.engine)
    mine = _rank_slice(n)
    rows = emb.valid_rows_between(mine.start, mine.stop)      # embedding row of each of this rank's points

    def read(ids: np.ndarray) -> np.ndarray:
        x = emb.rows(rows[ids - mine.start])
        if cfg.normalize:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    # relative to the clusters folder: no absolute path of this machine in what is written (and both
    # folders can move together)
    where = os.path.relpath(Path(embeddings).resolve(), Path(out_dir).resolve())
    source = {"embeddings": where, "encoder": emb.meta.get("encoder"), "rows": n, "dim": emb.dim}
    levels = run_hierarchy(read, n, cfg, out_dir, engine, source, progress)
    meta = {"config": dataclasses.asdict(cfg), "source": source, "points": n,
            "levels": [{"k": int(len(l.centroids)), "n_in": int(len(l.assignments))} for l in levels]}
    points = TensorFileWriter(Path(out_dir) / "points.safetensors", {"rows": (np.int64, (n,))})
    if _is_main():
        points.create()
    _barrier()
    points.write("rows", mine.start, rows)
    _barrier()
    if _is_main():
        points.commit()
        write_json_atomic(Path(out_dir) / "clusters.json", meta)
    _barrier()
    return Hierarchy(levels, map_tensors(Path(out_dir) / "points.safetensors")["rows"], meta)


def load_hierarchy(out_dir: str | os.PathLike) -> Hierarchy:
    out = Path(out_dir)
    meta_file = out / "clusters.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{out} holds no finished clustering (no clusters.json); "
                                f"run `amoe curate cluster --out {out}` (again, to resume) first")
    meta = json.loads(meta_file.read_text())
    emb = Path(meta["source"]["embeddings"])        # relative to `out` (absolute in older clusterings)
    meta["source"]["embeddings"] = str(emb if emb.is_absolute() else out / emb)
    levels = [_read_level(out / f"level_{i}") for i in range(1, len(meta["levels"]) + 1)]
    return Hierarchy(levels, map_tensors(out / "points.safetensors")["rows"], meta)
