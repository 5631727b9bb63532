"""The task registry and the pieces every task shares.

A task is an object with `name`, `version`, `roles` (dataset roles it reads, e.g. ("train", "test")),
`needs_patches`, `defaults` (its config as plain JSON data) and `run(ctx, cfg) -> {"head/metric": percent}`.
The harness (benchmarks/sweep.py) merges `defaults` with the sweep's overrides and hands the result to
`run`; `ctx` is a `benchmarks.context.HarnessContext` (datasets, cached features, text embeddings).
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch
import torch.nn.functional as F

from distill.encoders.base import MissingHeadError
from distill.config import unknown_keys_error
from distill.errors import AmoeError


class Task(Protocol):
    name: str
    version: str
    roles: tuple[str, ...]
    needs_patches: bool
    defaults: dict

    def run(self, ctx: Any, cfg: dict) -> dict[str, float]: ...


class UnknownTaskError(AmoeError, KeyError):
    """A task name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class NoUsableHeadError(MissingHeadError):
    """The encoder has no head of the kind a task needs (e.g. no text tower for zero-shot); the harness
    records the cell as skipped, like any MissingHeadError."""

    def __init__(self, encoder: str, task: str, what: str, available: tuple[str, ...]):
        KeyError.__init__(self, f"encoder '{encoder}' has no {what} that {task} can use "
                                f"(its {what}s: {', '.join(available) or 'none'})")

    def __str__(self) -> str:
        return str(self.args[0])


class TaskConfigError(AmoeError, ValueError):
    """A task config value is wrong; the message names the key and the fix."""


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task instance under `task.name` (a second task with the same name is an error)."""
    for attr in ("name", "version", "roles", "needs_patches", "defaults", "run"):
        if not hasattr(task, attr):
            raise TypeError(f"task {task!r} lacks '{attr}'; see benchmarks/tasks/base.py for the contract")
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"a task named '{task.name}' is already registered ({_REGISTRY[task.name]!r})")
    _REGISTRY[task.name] = task
    return task


def _load_builtin() -> None:
    import benchmarks.tasks  # noqa: F401  (importing the package registers every built-in task)
    from distill.plugins import load_plugins
    load_plugins()           # and plugins register theirs (distill/plugins.py)


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownTaskError(f"unknown task '{name}'; known tasks: {', '.join(list_tasks())}")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


# ---------------------------------------------------------------- shared helpers

def unknown_keys(cfg: dict, defaults: dict, task: str) -> None:
    """A misspelt override would otherwise be ignored silently."""
    extra = sorted(set(cfg) - set(defaults))
    if extra:
        raise TaskConfigError(str(unknown_keys_error(extra, defaults, f"the {task} task config")))


def select_heads(available: Iterable[str], wanted: list[str] | None, task: str, encoder: str,
                 what: str = "head") -> list[str]:
    """The heads a task evaluates: `wanted` (config) or every available one, in encoder order."""
    available = list(available)
    if wanted is None:
        if not available:
            raise NoUsableHeadError(encoder, task, what, tuple(available))
        return available
    missing = [h for h in wanted if h not in available]
    if missing:
        raise MissingHeadError(encoder, missing[0], tuple(available), what)
    return list(wanted)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def percent(x: torch.Tensor | float) -> float:
    return 100.0 * float(x)
