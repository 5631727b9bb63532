"""A byte-bounded least-recently-used store of tensors, for decoded inputs kept in memory (the
distillation's student inputs, the grounding trainer's processed images)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch


class TensorLRU:
    """Tensors by key; once they hold more than `capacity_bytes` the least recently used go first (the
    newest is always kept). A hit returns the very tensor that was put."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def lookup(self, key: Hashable) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
        return t

    def put(self, key: Hashable, t: torch.Tensor) -> None:
        self._items[key] = t
        self._bytes += t.nbytes
        while self._bytes > self.capacity_bytes and len(self._items) > 1:
            self._bytes -= self._items.popitem(last=False)[1].nbytes
