"""Run benchmark cells and sweeps (models x tasks x datasets x resolutions).

A sweep config is JSON:

    {"suite": "miniworld",                 # built-in suite name or a suite JSON path
     "vars": {"world": "runs/quickstart/world"},
     "models": ["siglip2:runs/quickstart/teachers/siglip2", "dinov3:..."],
     "tasks": ["zeroshot", "knn", "retrieval", "segmentation"],
     "datasets": null,                     # null = every suite dataset that lists the task
     "resolutions": [null],                # null = the suite's resolution (itself null = model default)
     "limit": null, "batch_size": 32, "num_workers": 0, "device": "cpu",
     "task_cfg": {"knn": {"k": 20}},       # overrides of each task's defaults
     "out": "results", "cache_dir": null}

Every cell writes one result JSON (distill.results). Cells already finished ("ok" or "skipped")
are not run again, so a killed sweep re-run finishes only the missing cells; a failing cell is
recorded as "failed" with its traceback and the sweep goes on (failed cells are retried next run).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from distill.config import ConfigError, read_config_file, unknown_keys_error
from distill.data.base import UnreadableImageError
from distill.encoders.base import Encoder, MissingHeadError
from distill import stats
from distill.io import fingerprint

from benchmarks.cache import FeatureCache
from benchmarks.context import HarnessContext, default_device, dist_info
from distill.results import (DONE_STATUSES, Cell, existing_status, jsonable, make_record, result_path,
                                settings_digest, write_result)
from benchmarks.suites import SuiteError, dataset_entry, load_suite, portable_suite_ref

SWEEP_FIELDS = ("suite", "vars", "models", "tasks", "datasets", "resolutions", "limit", "batch_size",
                "num_workers", "device", "task_cfg", "out", "cache_dir", "content_hash", "bootstrap")


class SweepConfigError(ConfigError):
    """A sweep config is malformed; the message names the field and the fix."""


# ---------------------------------------------------------------- pluggable pieces (tests swap them)

def default_encoder_loader(spec: str, device: str = "cpu") -> Encoder:
    from distill.encoders.registry import load_encoder  # the encoder registry (distill.encoders)
    encoder = load_encoder(spec)
    return encoder.to(device)


def default_task_lookup(name: str):
    from benchmarks.tasks.base import get_task  # importing the package registers every task
    return get_task(name)


@dataclass
class Harness:
    """What a cell needs beyond its coordinates; defaults are the real registries."""

    out_dir: Path
    cache: FeatureCache
    limit: int | None = None
    batch_size: int = 32
    num_workers: int = 0
    device: str = "cpu"
    task_cfg: dict = field(default_factory=dict)
    variables: dict = field(default_factory=dict)
    show_progress: bool = True
    content_hash: bool = False     # feature-cache keys hash each image's bytes (default: path/size/mtime)
    # 95 % intervals by resampling the evaluation items (distill.stats); None = no intervals
    bootstrap: dict | None = field(default_factory=lambda: dict(stats.DEFAULTS))
    encoder_loader: Callable[..., Encoder] | None = None   # None = the encoder registry
    task_lookup: Callable | None = None                   # None = the task registry
    dataset_loader: Callable | None = None                # None = distill.data.load_dataset
    # dataset id -> files found unreadable in this sweep: later cells leave their items out up front
    unreadable: dict = field(default_factory=dict)

    def load_encoder(self, spec: str) -> Encoder:
        return (self.encoder_loader or default_encoder_loader)(spec, device=self.device)

    def get_task(self, name: str):
        return (self.task_lookup or default_task_lookup)(name)

    def task_settings(self, task, name: str, dataset: dict | None = None) -> dict:
        """The config a task runs with: its defaults, then the suite's settings for this dataset (its
        entry's `task_cfg`, e.g. the segmentation protocol a dataset is scored with), then this sweep's
        overrides."""
        per_dataset = ((dataset or {}).get("task_cfg") or {}).get(name) or {}
        return {**jsonable(task.defaults), **per_dataset, **(self.task_cfg.get(name) or {})}

    def identify(self, cell: Cell, suite: dict | None = None) -> Cell:
        """`cell` with its whole identity: this harness's `limit` and the digest of the task's settings
        (with the suite's settings for the cell's dataset, when `suite` is given), so a smoke run, a full
        run and a run with other settings never take each other's place."""
        try:
            task = self.get_task(cell.task)
        except KeyError:   # an unknown task: the cell fails in run_cell, where that is recorded
            return replace(cell, limit=self.limit, settings=None)
        dataset = next((d for d in (suite or {}).get("datasets", ()) if d["id"] == cell.dataset), None)
        settings = settings_digest(task.version, self.task_settings(task, cell.task, dataset))
        return replace(cell, limit=self.limit, settings=settings)


# ---------------------------------------------------------------- configs

SWEEPS_DIR = Path(__file__).resolve().parent / "suites" / "sweeps"


def load_sweep_config(path: str | os.PathLike) -> dict:
    """A sweep config by path, or by name from benchmarks/suites/sweeps/."""
    cfg, found = read_config_file(path, SWEEPS_DIR, "sweep config", error=SweepConfigError)
    return validate_sweep_config(cfg, str(found))


def validate_sweep_config(cfg: dict, where: str = "sweep config") -> dict:
    unknown = sorted(set(cfg) - set(SWEEP_FIELDS))
    if unknown:
        raise SweepConfigError(str(unknown_keys_error(unknown, SWEEP_FIELDS, where)))
    for f in ("suite", "models", "tasks"):
        if not cfg.get(f):
            raise SweepConfigError(f"{where}: '{f}' is required (see docs/benchmarks.md, 'Sweep configs')")
    for f in ("models", "tasks"):
        if not isinstance(cfg[f], list) or not all(isinstance(x, str) for x in cfg[f]):
            raise SweepConfigError(f"{where}: '{f}' must be a list of strings")
    if cfg.get("resolutions") is not None and not isinstance(cfg["resolutions"], list):
        raise SweepConfigError(f"{where}: 'resolutions' must be a list such as [224, 512] or [null]")
    return cfg


def plan_cells(cfg: dict, suite: dict) -> list[Cell]:
    """Every (model, task, dataset, resolution) cell of a sweep, grouped by model then dataset.

    Grouping keeps one encoder loaded at a time and lets a dataset's cached features serve every task.
    """
    wanted = cfg.get("datasets")
    ids = [d["id"] for d in suite["datasets"]]
    if wanted:
        unknown = [d for d in wanted if d not in ids]
        if unknown:
            raise SuiteError(f"suite '{suite['name']}' has no dataset(s) {', '.join(unknown)}; "
                             f"its datasets: {', '.join(ids)}")
    resolutions = cfg.get("resolutions") or [suite.get("resolution")]
    cells = []
    for model in cfg["models"]:
        for ds in suite["datasets"]:
            if wanted and ds["id"] not in wanted:
                continue
            for res in resolutions:
                for task in cfg["tasks"]:
                    if task in ds["tasks"]:
                        cells.append(Cell(model, task, ds["id"], None if res is None else int(res)))
    if not cells:
        raise SweepConfigError(f"the sweep selects no cells: no dataset of suite '{suite['name']}' lists "
                               f"the tasks {cfg['tasks']}")
    return cells


# ---------------------------------------------------------------- one cell

def count_params(encoder: Encoder) -> dict:
    """Total and active parameter counts, where the encoder can say (used by the leaderboard plot)."""
    total = getattr(encoder, "num_params", None)
    active = getattr(encoder, "active_params", None)
    if total is None:
        modules = [encoder] if isinstance(encoder, torch.nn.Module) else \
            [v for v in vars(encoder).values() if isinstance(v, torch.nn.Module)]
        seen, n = set(), 0
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        total = n or None
    total = total() if callable(total) else total
    active = active() if callable(active) else active
    return {"params": total, "active_params": active if active is not None else total}


def model_info(spec: str, encoder: Encoder) -> dict:
    return {"spec": spec, "name": encoder.name, "fingerprint": encoder.fingerprint(),
            "heads": list(encoder.heads), "text_heads": list(encoder.text_heads),
            "patch_size": encoder.patch_size, "dtype": str(encoder.dtype),
            "preprocess": jsonable(encoder.preprocess_config()), **count_params(encoder),
            "runtime": jsonable(encoder.runtime_info()),
            # a text branch a model lacks, and why (e.g. a DINOv3 teacher without its dino.txt head)
            **({"missing_text_heads": {"dinotxt": encoder.dinotxt_missing}}
               if getattr(encoder, "dinotxt_missing", None) else {})}


def run_cell(cell: Cell, encoder: Encoder, suite: dict, h: Harness, model_load_s: float = 0.0,
             force: bool = False) -> dict:
    """Run one cell and write its result (rank 0). Never raises for a task failure: it is recorded.
    `force` also recomputes the features instead of reading them from the cache."""
    t_start = time.perf_counter()
    rank, world = dist_info()
    task = None
    ds_cfg: dict = {"id": cell.dataset}
    ctx = None
    config: dict = {"suite": suite["name"], "suite_file": portable_suite_ref(suite, h.out_dir), "limit": cell.limit,
                    "batch_size": h.batch_size, "resolution": cell.resolution, "world_size": world}
    task_info: dict = {"name": cell.task}
    status, metrics, reason, error, retry = "ok", {}, None, None, False
    intervals, bootstrap_s = None, 0.0
    dataset_info: dict = {"id": cell.dataset}
    try:
        ds_cfg = dataset_entry(suite, cell.dataset, h.variables)
        config["dataset_cfg"] = ds_cfg
        dataset_info.update({"reader": ds_cfg["reader"], "root": ds_cfg["root"], "roles": ds_cfg["roles"]})
        task = h.get_task(cell.task)
        task_cfg = h.task_settings(task, cell.task, ds_cfg)
        config["task_cfg"] = task_cfg
        task_info.update({"version": task.version, "roles": list(task.roles), "needs_patches": task.needs_patches})
        ctx = HarnessContext(encoder, ds_cfg, resolution=cell.resolution, limit=cell.limit, cache=h.cache,
                             batch_size=h.batch_size, num_workers=h.num_workers, show_progress=h.show_progress,
                             load_dataset=h.dataset_loader, refresh=force, content_hash=h.content_hash,
                             leave_out=h.unreadable.get(cell.dataset, ()))
        ctx.check_label_space()
        _extract_features(ctx, task)
        unreadable = ctx.unreadable_report(task.roles)
        if ctx.leave_out:
            h.unreadable[cell.dataset] = set(ctx.leave_out)
        dataset_info.update({"fingerprint": ctx.dataset_fingerprint(task.roles),
                             "sizes": {r: len(ctx.dataset(r)) for r in task.roles},
                             **({"unreadable": unreadable} if unreadable else {})})
        if cell.limit is not None:
            config["limit_rule"] = {r: ctx.dataset(r).limit_rule for r in task.roles}
        if rank == 0:
            metrics = task.run(ctx, task_cfg)
            bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float))}
            if bad:
                raise TypeError(f"task '{cell.task}' returned non-numeric metrics {bad}")
            if h.bootstrap is not None:
                t_boot = time.perf_counter()
                intervals = stats.metric_intervals(metrics, ctx.items, **h.bootstrap)
                bootstrap_s = time.perf_counter() - t_boot
    except MissingHeadError as e:
        status, reason = "skipped", str(e).strip("'\"")
        here = encoder.unavailable_heads()   # heads this machine failed to load
        if here:
            retry = True
            reason += "; retried next run, since " + "; ".join(here.values())
    except Exception as e:  # isolate the cell: record it, let the sweep go on
        status, reason = "failed", f"{type(e).__name__}: {e}"
        error = traceback.format_exc()
    total = time.perf_counter() - t_start
    feature_s = ctx.feature_seconds if ctx is not None else 0.0
    timings = {"total_s": total, "features_s": feature_s, "task_s": max(total - feature_s - bootstrap_s, 0.0),
               "bootstrap_s": bootstrap_s, "model_load_s": model_load_s}
    record = make_record(cell, status, metrics=metrics, config=jsonable(config),
                         model=model_info(cell.model, encoder), dataset=jsonable(dataset_info), task=task_info,
                         timings=timings, device=h.device, reason=reason, error=error, retry=retry,
                         intervals=intervals)
    if rank == 0:
        write_result(h.out_dir, record, items=ctx.items if ctx is not None and status == "ok" else None)
    return record


def _extract_features(ctx: HarnessContext, task) -> None:
    """Every rank extracts (its shard of) the features a task needs up front, so the task itself runs
    on rank 0 alone without collective calls inside it. Bad data is data: a pass that finds images
    that do not decode names them, leaves their items out (for every later cell on this dataset too)
    and runs again; the result records them (`dataset.unreadable`) and the leaderboard notes them."""
    def extract() -> None:
        for role in task.roles:
            ctx.features(role, patches=task.needs_patches)

    try:
        extract()
    except UnreadableImageError as e:
        if not ctx.skip_unreadable(e.files):
            raise
        shown = ", ".join(e.files[:5]) + (f" and {len(e.files) - 5} more" if len(e.files) > 5 else "")
        print(f"[amoe bench] {ctx.dataset_cfg.get('id')}: {len(e.files)} unreadable image(s) left out "
              f"({shown})", file=sys.stderr, flush=True)
        extract()


def _failed_load_record(cell: Cell, suite: dict, h: Harness, exc: BaseException) -> dict:
    return make_record(cell, "failed", config={"suite": suite["name"], "limit": cell.limit},
                       model={"spec": cell.model}, dataset={"id": cell.dataset}, task={"name": cell.task},
                       timings={"total_s": 0.0}, device=h.device,
                       reason=f"loading the encoder failed: {type(exc).__name__}: {exc}",
                       error="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


# ---------------------------------------------------------------- sweeps

@dataclass
class SweepSummary:
    total: int = 0
    already_done: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    busy: int = 0          # cells another sweep on the same folder held (claims), left to it
    seconds: float = 0.0
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run_cells(cells: list[Cell], suite: dict, h: Harness, force: bool = False,
              stop_after: int | None = None) -> SweepSummary:
    """Run `cells`, skipping finished ones (unless `force`); one encoder loaded at a time."""
    t0 = time.perf_counter()
    rank, world = dist_info()
    summary = SweepSummary(total=len(cells))
    cells = [h.identify(c, suite) for c in cells]
    done = [not force and existing_status(h.out_dir, c) in DONE_STATUSES for c in cells]
    if world > 1:
        # rank 0 decides: every rank must walk the same cells or the feature gathers would deadlock
        box = [done]
        torch.distributed.broadcast_object_list(box, src=0)
        done = box[0]
    todo = [c for c, d in zip(cells, done) if not d]
    summary.already_done = sum(done)
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not h.show_progress or rank != 0,
               dynamic_ncols=True)
    loaded = _LoadedEncoder()
    for n, cell in enumerate(todo):
        if stop_after is not None and n >= stop_after:
            break
        bar.set_postfix_str(str(cell), refresh=False)
        claim = _claim(h.out_dir, cell, rank, world, force)
        if claim is None:   # another sweep on this folder runs it now, or has just finished it
            summary.busy += 1
            bar.update(1)
            continue
        try:
            record = _run_claimed(cell, suite, h, loaded, force)
        finally:
            claim.release()
        setattr(summary, record["status"], getattr(summary, record["status"]) + 1)
        if record["status"] == "failed":
            summary.failures.append({"cell": str(cell), "reason": record.get("reason"),
                                     "path": str(result_path(h.out_dir, cell))})
            tqdm.write(f"FAILED {cell}: {record.get('reason')}")
        elif record["status"] == "skipped":
            tqdm.write(f"skipped {cell}: {record.get('reason')}")
        bar.update(1)
    bar.close()
    if summary.busy:
        tqdm.write(f"{summary.busy} cell(s) were held by another sweep on {h.out_dir}; re-run to pick up any it "
                   "did not finish")
    summary.seconds = time.perf_counter() - t0
    return summary


def _claim(out_dir: Path, cell: Cell, rank: int, world: int, force: bool):
    """This sweep's exclusive claim on a cell (OUT/.claims/<cell>.lock), or None when another sweep
    holds it or finished it meanwhile. Rank 0 decides; every rank learns the same answer."""
    from distill.io import FileLock

    lock = FileLock(out_dir / ".claims" / (cell.filename() + ".lock"))
    ok = True
    if rank == 0:
        ok = lock.acquire() and (force or existing_status(out_dir, cell) not in DONE_STATUSES)
        if not ok:
            lock.release()
    if world > 1:
        box = [ok]
        torch.distributed.broadcast_object_list(box, src=0)
        ok = box[0]
    return lock if ok else None


@dataclass
class _LoadedEncoder:
    """The one encoder a sweep holds (cells are grouped by model), or why it failed to load."""

    spec: str | None = None
    encoder: Encoder | None = None
    seconds: float = 0.0
    error: BaseException | None = None

    def get(self, spec: str, h: Harness) -> Encoder | None:
        if spec != self.spec:
            self.spec, self.encoder, self.error = spec, None, None
            t0 = time.perf_counter()
            try:
                self.encoder = h.load_encoder(spec)
            except Exception as e:  # one model that cannot load must not stop the other models
                self.error = e
            self.seconds = time.perf_counter() - t0
        return self.encoder


def _run_claimed(cell: Cell, suite: dict, h: Harness, loaded: _LoadedEncoder, force: bool) -> dict:
    """Run a claimed cell with its encoder (loaded once per model) and write its result."""
    encoder = loaded.get(cell.model, h)
    if encoder is not None:
        return run_cell(cell, encoder, suite, h, model_load_s=loaded.seconds, force=force)
    record = _failed_load_record(cell, suite, h, loaded.error)
    if dist_info()[0] == 0:
        write_result(h.out_dir, record)
    return record


def harness_from_config(cfg: dict, out: str | os.PathLike | None = None, limit: int | None = None,
                        cache_dir: str | os.PathLike | None = None, variables: dict | None = None,
                        **overrides) -> Harness:
    out_dir = Path(out or cfg.get("out") or "results")
    cache_root = cache_dir or cfg.get("cache_dir")
    overrides["content_hash"] = bool(overrides.get("content_hash") or cfg.get("content_hash"))
    if "bootstrap" in cfg and "bootstrap" not in overrides:   # false/null: no intervals; a dict: settings
        overrides["bootstrap"] = _bootstrap_settings(cfg["bootstrap"])
    return Harness(out_dir=out_dir, cache=FeatureCache(cache_root),
                   limit=limit if limit is not None else cfg.get("limit"),
                   batch_size=int(cfg.get("batch_size") or 32), num_workers=int(cfg.get("num_workers") or 0),
                   device=cfg.get("device") or default_device(),
                   task_cfg=cfg.get("task_cfg") or {},
                   variables={**(cfg.get("vars") or {}), **(variables or {})}, **overrides)


def _bootstrap_settings(value) -> dict | None:
    if value in (None, False):
        return None
    if value is True:
        return dict(stats.DEFAULTS)
    if not isinstance(value, dict) or set(value) - set(stats.DEFAULTS):
        raise SweepConfigError(f"sweep config: 'bootstrap' must be true, false or a dict with keys "
                               f"{', '.join(stats.DEFAULTS)}, got {value!r}")
    out = {**stats.DEFAULTS, **value}
    if not (isinstance(out["resamples"], int) and out["resamples"] >= 1
            and isinstance(out["confidence"], (int, float)) and 0 < out["confidence"] < 1):
        raise SweepConfigError("sweep config: bootstrap 'resamples' must be a positive int and 0 < 'confidence' < 1")
    return out


def run_sweep(cfg: dict, h: Harness, force: bool = False, workers: int = 1) -> SweepSummary:
    """Plan and run a sweep; `workers` > 1 runs it in that many processes side by side (`run_side_by_side`)."""
    validate_sweep_config(cfg)
    suite = load_suite(cfg["suite"])
    cells = plan_cells(cfg, suite)
    if workers > 1 and dist_info()[1] == 1:
        return run_side_by_side(cells, suite, h, workers, force=force)
    return run_cells(cells, suite, h, force=force)


def run_side_by_side(cells: list[Cell], suite: dict, h: Harness, workers: int, force: bool = False) -> SweepSummary:
    """`run_cells` in `workers` processes of one torch thread each (distill.jobs). A model's cells stay
    in one process, so its encoder loads once and its cached features are computed once; models go to
    the least loaded process, most cells first. Every cell runs on one thread whatever runs beside it,
    so its result does not depend on the scheduling. The mini-world's small encoders use two processes
    better than two threads (the same holds for its trainings; distill/jobs.py)."""
    from distill.jobs import side_by_side

    t0 = time.perf_counter()
    by_model: dict[str, list[Cell]] = {}
    for c in cells:
        by_model.setdefault(c.model, []).append(c)
    groups: list[list[Cell]] = [[] for _ in range(workers)]
    for model_cells in sorted(by_model.values(), key=len, reverse=True):
        min(groups, key=len).extend(model_cells)
    groups = [g for g in groups if g]
    quiet = replace(h, show_progress=False)

    def done(i: int, seconds: float) -> None:
        if h.show_progress:
            tqdm.write(f"[sweep] {len(groups[i])} cell(s) of {len({c.model for c in groups[i]})} model(s) "
                       f"finished in {seconds:.0f} s")

    parts = side_by_side([(run_cells, (g, suite, quiet), {"force": force}) for g in groups],
                         workers=len(groups), on_done=done)
    summary = SweepSummary()
    for part in parts:
        for k in ("total", "already_done", "ok", "skipped", "failed", "busy"):
            setattr(summary, k, getattr(summary, k) + getattr(part, k))
        summary.failures += part.failures
    summary.seconds = time.perf_counter() - t0
    return summary


def sweep_fingerprint(cfg: dict) -> str:
    return fingerprint({k: cfg.get(k) for k in SWEEP_FIELDS if k not in ("out", "cache_dir")})
