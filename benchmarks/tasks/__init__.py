"""Benchmark tasks: zero-shot, kNN, linear probe, retrieval and linear-probe segmentation (see docs/tasks.md).

Importing the package registers every task; `get_task(name)` / `list_tasks()` are the entry points.
"""
from .base import TaskConfigError, UnknownTaskError, get_task, list_tasks, register_task
from . import knn, linear, retrieval, segmentation, zeroshot  # noqa: F401  (register)

__all__ = ["get_task", "list_tasks", "register_task", "TaskConfigError", "UnknownTaskError"]
