"""`amoe curate perf`: wall time and peak memory of the clustering stage against the number of points.

Each size runs in its own child process so its peak resident memory (``ru_maxrss``) is its own. The
points are a seeded long-tailed Gaussian mixture (so k-means has real structure to find); the timed part
is `run_hierarchy` only (all levels, resampling included), not data generation.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from distill.memory import peak_rss_mib, reset_peak_rss, status_mib

DEFAULT_SIZES = (50_000, 200_000, 1_000_000)
DEFAULT_LEVELS = [{"k": 1000, "niter": 10, "resampling_steps": 2, "sample_size": 10, "resample_niter": 5},
                  {"k": 100, "niter": 20, "resampling_steps": 2, "sample_size": 3, "resample_niter": 5},
                  {"k": 10, "niter": 20}]


def synthetic_points(n: int, dim: int, seed: int = 0, modes: int = 2000) -> np.ndarray:
    """Unit-norm points around `modes` centres whose weights follow a Zipf law (a long-tailed pool)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, dim)).astype(np.float32)
    w = 1.0 / np.arange(1, modes + 1) ** 1.1
    which = rng.choice(modes, size=n, p=w / w.sum())
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):   # in chunks, so temporaries stay small next to the data
        part = centres[which[s:s + 65536]] + 0.35 * rng.standard_normal((len(which[s:s + 65536]), dim)).astype(np.float32)
        x[s:s + 65536] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_one(n: int, dim: int, engine: str, levels: list[dict], seed: int = 0,
                point_dtype: str = "float32") -> dict:
    """Cluster `n` synthetic points in this process; returns timings and memory, and what
    `amoe curate plan` predicts for the same run on one rank (host and device are one memory here)."""
    from distill.curation.hierarchy import parse_cluster_config, run_hierarchy
    from distill.curation.kmeans import make_engine
    from distill.curation.plan import plan_levels

    x = synthetic_points(n, dim, seed)
    cfg = parse_cluster_config({"name": "perf", "engine": engine, "normalize": False, "seed": seed,
                                "levels": levels, "point_dtype": point_dtype})
    plan = plan_levels(cfg, 1, n, dim)
    planned = max(lv["host_total_bytes"] + lv["device_total_bytes"] for lv in plan["levels"]) / 2**20
    eng = make_engine(engine)
    before = status_mib("VmRSS")
    exact = reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu_s()
        out = run_hierarchy(x, n, cfg, tmp, eng, source={"synthetic": n}, progress=False)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    # VmHWM after a reset = the clustering's own peak; otherwise the process peak (ru_maxrss, KiB)
    peak = peak_rss_mib()
    return {"points": n, "dim": dim, "engine": engine, "levels": [lv["k"] for lv in levels],
            "point_dtype": point_dtype, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(peak, 1), "peak_is_clustering_only": exact,
            "rss_before_cluster_mb": None if before is None else round(before, 1),
            # what clustering added to the process against the plan's count for it
            "clustering_grew_mb": None if before is None or not exact else round(peak - before, 1),
            "planned_mb": round(planned, 1),
            "data_mb": round(x.nbytes / 2**20, 1),
            "level1_largest_cluster": int(np.bincount(out[0].assignments).max())}


def split_levels(n_splits: int) -> list[dict]:
    """DEFAULT_LEVELS with level 1 split `n_splits` ways (and, as a split level must, no resampling)."""
    first = {**DEFAULT_LEVELS[0], "resampling_steps": 0, "n_splits": n_splits}
    return [first] + DEFAULT_LEVELS[1:]


def run_split_perf(sizes, n_splits: int, dim: int = 128, engine: str = "torch", point_dtype: str = "float32") -> dict:
    """The split-based level 1 against the flat engine at the same k (both without level-1 resampling)."""
    return {"n_splits": n_splits, "flat": run_perf(sizes, dim, engine, split_levels(1), point_dtype=point_dtype),
            "split": run_perf(sizes, dim, engine, split_levels(n_splits), point_dtype=point_dtype)}


def run_perf(sizes=DEFAULT_SIZES, dim: int = 128, engine: str = "faiss", levels: list[dict] | None = None,
             threads: int | None = None, point_dtype: str = "float32") -> dict:
    levels = levels or DEFAULT_LEVELS
    threads = threads or os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs = []
    for n in sizes:
        code = (f"import json; from distill.curation.perf import measure_one; "
                f"print(json.dumps(measure_one({int(n)}, {int(dim)}, {engine!r}, {levels!r}, "
                f"point_dtype={point_dtype!r})))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"perf run with {n} points failed:\n{proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"runs": runs, "threads": threads,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
