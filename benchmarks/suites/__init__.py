"""Benchmark suites as data: one JSON file per suite (datasets, roles, tasks, leaderboard layout).

`load_suite(name_or_path)` reads `benchmarks/suites/<name>.json` or any JSON path; `${VAR}` in a
dataset root is filled from the sweep's vars, then the environment, when the dataset is used.
"""
from __future__ import annotations

import os
from pathlib import Path

from distill.config import ConfigError, interpolate, read_config_file

SUITES_DIR = Path(__file__).resolve().parent


class SuiteError(ConfigError):
    """A suite file is missing, malformed, or names a dataset / variable that is not there."""


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def portable_suite_ref(suite: dict, relative_to: str | os.PathLike) -> str | None:
    """How a result names its suite file without this machine's absolute paths: None for a built-in
    suite (its name finds it), else the file's path relative to `relative_to` (the results folder)."""
    path = suite.get("_path")
    if path is None or Path(path).resolve() == (SUITES_DIR / f"{suite['name']}.json").resolve():
        return None
    return os.path.relpath(Path(path).resolve(), Path(relative_to).resolve())


def load_suite(name_or_path: str | os.PathLike) -> dict:
    suite, path = read_config_file(name_or_path, SUITES_DIR, "suite", error=SuiteError)
    for field in ("name", "datasets"):
        if field not in suite:
            raise SuiteError(f"suite {path} lacks '{field}'")
    seen = set()
    for i, ds in enumerate(suite["datasets"]):
        missing = [f for f in ("id", "reader", "root", "roles", "tasks") if f not in ds]
        if missing:
            raise SuiteError(f"suite {path}: dataset #{i} ({ds.get('id', '?')}) lacks {', '.join(missing)}")
        if ds["id"] in seen:
            raise SuiteError(f"suite {path}: dataset id '{ds['id']}' appears twice")
        seen.add(ds["id"])
    suite["_path"] = str(path)
    return suite


def expand_vars(text: str, variables: dict[str, str] | None = None, where: str = "") -> str:
    """Fill `${NAME}` from `variables`, then the environment (distill.config.interpolate)."""
    return interpolate(text, variables, where, how_to_set="pass --var {name}=PATH, add \"vars\": "
                       "{{\"{name}\": PATH}} to the sweep config, or export {name}=PATH", error=SuiteError)


def dataset_entry(suite: dict, dataset_id: str, variables: dict[str, str] | None = None) -> dict:
    """The suite's entry for `dataset_id` with its root (and string reader kwargs) expanded."""
    for ds in suite["datasets"]:
        if ds["id"] == dataset_id:
            where = f"suite '{suite['name']}', dataset '{dataset_id}'"
            out = dict(ds)
            out["root"] = expand_vars(ds["root"], variables, where)
            out["reader_kwargs"] = {k: expand_vars(v, variables, where) if isinstance(v, str) else v
                                    for k, v in (ds.get("reader_kwargs") or {}).items()}
            return out
    known = ", ".join(d["id"] for d in suite["datasets"])
    raise SuiteError(f"suite '{suite['name']}' has no dataset '{dataset_id}'; its datasets: {known}")
