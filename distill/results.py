"""Result files: one JSON per (model, task, dataset, resolution) cell.

A cell's identity is (model, task, dataset, resolution, limit, settings): `settings` is a digest of
the task's version and its full config, so a limited smoke run and a full run, or a run with `k=[20]`
and one with `k=[10, 20]`, are different cells in different files and never stand in for each other.

A result records what was measured and everything needed to trust or reproduce it: schema version,
status ("ok" | "skipped" | "failed"), metrics (percentages), the full config (suite entry, task cfg,
limit...), model and dataset fingerprints, code version, timings and environment. Files are written
atomically, so a file that exists is complete. Leaderboards are built from these files only.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import AmoeError
from distill.io import atomic_path, file_sha256, fingerprint, portable, write_json_atomic

SCHEMA_VERSION = 3   # 2: the cell carries `limit` and `settings`; 3: optional `intervals` and per-item scores
READABLE_VERSIONS = (2, 3)   # 3 only adds optional fields, so version-2 files still read
STATUSES = ("ok", "skipped", "failed")
DONE_STATUSES = ("ok", "skipped")  # a re-run retries failed cells and skips marked `retry`, never the others
REQUIRED_FIELDS = ("schema_version", "status", "cell", "metrics", "config", "model", "dataset", "task",
                   "code", "timings", "environment", "created")


class ResultSchemaError(AmoeError, ValueError):
    """A result JSON does not follow the schema this code reads."""


@dataclass(frozen=True)
class Cell:
    model: str            # encoder spec as given on the command line / in the sweep
    task: str
    dataset: str          # dataset id within the suite
    resolution: int | None = None
    limit: int | None = None          # `--limit N` (items per split); None = the whole split
    settings: str | None = None       # settings_digest(task version, task config)

    def as_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "resolution": self.resolution,
                "limit": self.limit, "settings": self.settings}

    def filename(self) -> str:
        """Readable and unique: slugs for humans, a hash of the exact cell for uniqueness."""
        res = "native" if self.resolution is None else str(self.resolution)
        parts = [_slug(self.model, 48), _slug(self.task, 24), _slug(self.dataset, 32), res]
        if self.limit is not None:
            parts.append(f"limit{self.limit}")
        return "__".join(parts + [fingerprint(self.as_dict())[:10]]) + ".json"

    def __str__(self) -> str:
        res = "native" if self.resolution is None else self.resolution
        lim = "" if self.limit is None else f" | limit {self.limit}"
        return f"{self.model} | {self.task} | {self.dataset} | {res}{lim}"


def settings_digest(version, cfg: dict) -> str:
    """What a task was asked to do, as a short digest: its version and its full (merged) config."""
    return fingerprint({"version": str(version), "cfg": cfg})[:12]


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:limit] or "x"


def result_path(out_dir: str | os.PathLike, cell: Cell) -> Path:
    return Path(out_dir) / cell.filename()


# ---------------------------------------------------------------- provenance

_REPO = Path(__file__).resolve().parents[1]


def code_version() -> dict:
    """Package version plus git commit (and whether the tree had local changes) when available."""
    try:
        from importlib.metadata import version
        pkg = version("amoe")
    except Exception:  # not installed (running from a plain checkout)
        pkg = None
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": "amoe", "version": pkg, "git_commit": commit, "git_dirty": dirty}


_CODE_VERSION: dict | None = None


def cached_code_version() -> dict:
    global _CODE_VERSION
    if _CODE_VERSION is None:
        _CODE_VERSION = code_version()
    return _CODE_VERSION


def environment(device: torch.device | str | None = None) -> dict:
    device = torch.device(device or "cpu")
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "device": str(device), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
    try:
        import torch.distributed as dist
        env["world_size"] = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    except Exception:
        env["world_size"] = 1
    return env


# ---------------------------------------------------------------- records

def make_record(cell: Cell, status: str, *, metrics: dict[str, float] | None = None, config: dict,
                model: dict, dataset: dict, task: dict, timings: dict, device=None,
                reason: str | None = None, error: str | None = None, retry: bool = False,
                intervals: dict | None = None) -> dict:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "cell": cell.as_dict(),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "config": config,
        "model": model,
        "dataset": dataset,
        "task": task,
        "code": cached_code_version(),
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "environment": environment(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if reason is not None:
        record["reason"] = reason
    if error is not None:
        record["error"] = error
    if retry:
        record["retry"] = True
    if intervals:   # {"method", "resamples", "confidence", "seed", "metrics": {m: [lo, hi]}, "missing": {m: why}}
        record["intervals"] = intervals
    validate(record)
    return record


def validate(record: dict, source: str = "result") -> dict:
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ResultSchemaError(f"{source}: missing field(s) {', '.join(missing)}")
    if record["schema_version"] not in READABLE_VERSIONS:
        raise ResultSchemaError(f"{source}: schema_version {record['schema_version']} is not one this amoe "
                                f"reads ({', '.join(map(str, READABLE_VERSIONS))}); re-run the cell with this version")
    if record["status"] not in STATUSES:
        raise ResultSchemaError(f"{source}: status {record['status']!r} not in {STATUSES}")
    if record["status"] == "skipped" and not record.get("reason"):
        raise ResultSchemaError(f"{source}: a skipped cell must say why (field 'reason')")
    bad = {k: v for k, v in record["metrics"].items() if not isinstance(v, (int, float))}
    if bad:
        raise ResultSchemaError(f"{source}: non-numeric metrics {bad}")
    for f in ("model", "task", "dataset", "resolution", "limit", "settings"):
        if f not in record["cell"]:
            raise ResultSchemaError(f"{source}: cell lacks '{f}'")
    return record


def write_result(out_dir: str | os.PathLike, record: dict, items: dict | None = None) -> Path:
    """Write a result atomically. `items` ({metric: distill.stats.ItemScores}) goes first to a sidecar
    named by its digest, `<result>.<sha12>.items.npz`; the result then names it, and only after that
    are older sidecars of the cell removed, so a crash at any point leaves a result whose sidecar
    matches it."""
    validate(record)
    path = result_path(out_dir, Cell(**record["cell"]))
    # paths relative to the results folder, except the cell's identity (the model as the sweep names it)
    # (in place, as `items` below: the caller's record is the one written)
    record.update({k: portable(v, out_dir) for k, v in record.items() if k not in ("cell", "model")})
    side = None
    if items:
        keys = {metric: f"m{i}" for i, metric in enumerate(sorted(items))}
        buf = io.BytesIO()
        np.savez_compressed(buf, **{keys[m]: items[m].values for m in keys})
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        side = path.with_name(f"{path.stem}.{digest[:12]}.items.npz")
        with atomic_path(side) as tmp:
            tmp.write_bytes(data)
        record["items"] = {"file": side.name, "sha256": digest,
                           "metrics": {m: {"key": keys[m], "reduce": items[m].reduce, "n": len(items[m])}
                                       for m in keys}}
    write_json_atomic(path, record)
    for old in path.parent.glob(f"{path.stem}.*items.npz"):
        if old != side:
            old.unlink(missing_ok=True)
    return path


def read_items(record: dict, result_file: str | os.PathLike | None = None) -> dict:
    """{metric: ItemScores} of a result (empty when it has none); the sidecar's digest is checked."""
    from distill.stats import ItemScores
    info = record.get("items")
    if not info:
        return {}
    side = Path(result_file or record["_path"]).with_name(info["file"])
    if not side.is_file() or file_sha256(side) != info["sha256"]:
        raise ResultSchemaError(f"{side}: per-item scores missing or changed since the result was written; "
                                "re-run the cell (amoe bench sweep --force)")
    with np.load(side, allow_pickle=False) as z:
        return {m: ItemScores(z[spec["key"]], spec["reduce"]) for m, spec in info["metrics"].items()}


def read_result(path: str | os.PathLike) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ResultSchemaError(f"{path}: not valid JSON ({e})") from e
    return validate(record, str(path))


def existing_status(out_dir: str | os.PathLike, cell: Cell) -> str | None:
    """Status of a cell's result file, or None when there is none, it is unreadable, or it is a skip
    caused by this machine (`retry`: a teacher folder that could not be loaded...), which the next run
    tries again; a skip because the model lacks a head stays done."""
    path = result_path(out_dir, cell)
    if not path.exists():
        return None
    try:
        record = read_result(path)
    except (ResultSchemaError, OSError):
        return None
    return None if record["status"] == "skipped" and record.get("retry") else record["status"]


def load_results(results_dir: str | os.PathLike, statuses: tuple[str, ...] = STATUSES,
                 unreadable: list | None = None) -> list[dict]:
    """Every valid result JSON under `results_dir` (recursively).

    A file that cannot be read (truncated, not JSON, an older schema) never stops the build: it is
    left out with a warning naming it, and (path, reason) is appended to `unreadable` when given."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist; run `amoe bench sweep` first")
    out = []
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or "schema_version" not in record:
                continue  # other JSON files (sweep configs, manifests) may live beside the results
            validate(record, str(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ResultSchemaError) as e:
            why = str(e) if isinstance(e, ResultSchemaError) else f"{path}: unreadable ({type(e).__name__}: {e})"
            warnings.warn(f"{why}; left out (re-run its cell to replace it)", stacklevel=2)
            if unreadable is not None:
                unreadable.append((str(path), why))
            continue
        if record["status"] in statuses:
            record["_path"] = str(path)
            out.append(record)
    return out


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON so a config stored in a result holds only plain types."""
    return json.loads(json.dumps(obj, default=str))
