"""`amoe bench perf`: the harness's two performance figures, measured on the mini-world.

(a) Harness overhead: a sweep cell's wall time minus the task's own compute, against the bare
    forward passes over the same images (decode + preprocess + encode in a plain loop, same batch
    size). Goal <= 10 %.
(b) Cache: re-running a finished sweep (and re-running it with --force, so every task recomputes
    from cached features) against the first run; adding a task to a finished (model, dataset) pair
    must encode no image again. Goal: re-run <= 10 % of the first run.
"""
from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import torch

from benchmarks.cache import FeatureCache
from benchmarks.context import LimitedDataset, image_of
from distill.results import Cell, read_result, result_path
from benchmarks.suites import dataset_entry, load_suite
from benchmarks.sweep import Harness, default_encoder_loader, plan_cells, run_cells

DEFAULT_TASKS = ("knn", "zeroshot")


def _bare_forward(encoder, ds, resolution, batch_size: int) -> float:
    """The minimum any script must do: read, preprocess, encode every image, in batches."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ds), batch_size):
            batch = [encoder.preprocess(image_of(ds[j]), resolution=resolution)
                     for j in range(i, min(i + batch_size, len(ds)))]
            encoder.encode([x.to(encoder.device, encoder.dtype) for x in batch])
    return time.perf_counter() - t0


def default_model(work: Path) -> str:
    """A random-init student export (no training needed), made once under `work`."""
    from distill.encoders.student import export_random_student, student_export_complete
    path = work / "random-student"
    if not student_export_complete(path):
        export_random_student(path, config="tiny-moe", seed=0)
    return f"student:{path}"


def ensure_world(world: str | None, work: Path) -> Path:
    if world:
        return Path(world)
    path = work / "world"
    if not (path / "world.json").is_file():
        from benchmarks.world import make_world
        make_world(path, size="small", seed=0)
    return path


def measure(model: str | None, world: str | None, work: Path, limit: int | None = None, batch_size: int = 32,
            show_progress: bool = False, tasks: tuple[str, ...] = DEFAULT_TASKS,
            encoder_loader=default_encoder_loader) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    world_dir = ensure_world(world, work)
    spec = model or default_model(work)
    suite = load_suite("miniworld")
    variables = {"world": str(world_dir)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = encoder_loader(spec, device=device)

    def harness(tag: str) -> Harness:
        return Harness(out_dir=work / tag / "results", cache=FeatureCache(work / tag / "cache"), limit=limit,
                       batch_size=batch_size, device=device, variables=variables, show_progress=show_progress,
                       encoder_loader=lambda s, device="cpu": encoder)

    for tag in ("overhead", "cache"):
        shutil.rmtree(work / tag, ignore_errors=True)

    # (a) overhead on one kNN cell: its images are the classification train + val splits
    entry = dataset_entry(suite, "mw-cls", variables)
    from distill.data import load_dataset
    datasets = [LimitedDataset(load_dataset(entry["reader"], entry["root"], entry["roles"][role],
                                            **(entry.get("reader_kwargs") or {})), limit) for role in ("train", "test")]
    n_images = sum(len(d) for d in datasets)
    _bare_forward(encoder, datasets[1], None, batch_size)  # warm-up: page cache, allocator, kernels
    bare_s = sum(_bare_forward(encoder, d, None, batch_size) for d in datasets)
    h = harness("overhead")
    cell = h.identify(Cell(spec, "knn", "mw-cls", None), suite)
    t0 = time.perf_counter()
    run_cells([cell], suite, h)
    cell_wall = time.perf_counter() - t0
    rec = read_result(result_path(h.out_dir, cell))
    if rec["status"] != "ok":
        raise RuntimeError(f"perf cell did not finish: {rec.get('reason')}")
    task_s = rec["timings"]["task_s"]
    harness_s = cell_wall - task_s
    overhead = {"cell_wall_s": round(cell_wall, 3), "task_compute_s": round(task_s, 3),
                "features_s": rec["timings"]["features_s"], "bare_forward_s": round(bare_s, 3),
                "images": n_images,
                "overhead_pct": round(100.0 * (harness_s - bare_s) / bare_s, 2),
                "goal_pct": 10.0}
    overhead["meets_goal"] = overhead["overhead_pct"] <= overhead["goal_pct"]

    # (b) cache: a small sweep, re-run, re-run with --force, then one more task added
    h = harness("cache")
    cfg = {"suite": "miniworld", "models": [spec], "tasks": list(tasks[:1])}
    first_cells = plan_cells(cfg, suite)
    t0 = time.perf_counter()
    s1 = run_cells(first_cells, suite, h)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s2 = run_cells(first_cells, suite, h)
    rerun_s = time.perf_counter() - t0
    misses_before = h.cache.stats.misses
    t0 = time.perf_counter()
    run_cells(first_cells, suite, h, force=True)
    forced_s = time.perf_counter() - t0
    forced_misses = h.cache.stats.misses - misses_before
    added = plan_cells({**cfg, "tasks": list(tasks)}, suite)
    misses_before = h.cache.stats.misses
    t0 = time.perf_counter()
    s4 = run_cells(added, suite, h)
    added_s = time.perf_counter() - t0
    cache = {"first_run_s": round(first_s, 3), "rerun_s": round(rerun_s, 4),
             "rerun_pct": round(100.0 * rerun_s / first_s, 2),
             "rerun_force_s": round(forced_s, 3), "rerun_force_pct": round(100.0 * forced_s / first_s, 2),
             "rerun_force_feature_misses": forced_misses,
             "cells_first": s1.ok + s1.skipped, "cells_rerun_skipped": s2.already_done,
             "added_tasks": list(tasks[1:]), "added_cells_run": s4.ok + s4.skipped + s4.failed,
             "added_task_s": round(added_s, 3),
             "added_task_image_feature_misses": h.cache.stats.misses - misses_before,
             "goal_pct": 10.0}
    cache["meets_goal"] = cache["rerun_pct"] <= cache["goal_pct"] and cache["added_task_image_feature_misses"] == 0
    return {"model": spec, "world": str(world_dir), "limit": limit, "batch_size": batch_size,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "device": device,
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "harness_overhead": overhead, "cache": cache}
