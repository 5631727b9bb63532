"""A byte-bounded least-recently-used store of tensors, for decoded inputs kept in memory (the
distillation's student inputs and cached teacher outputs, the grounding trainer's processed images)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch


class TensorLRU:
    """Tensors (or other values of a stated size) by key; once they hold more than `capacity_bytes` the
    least recently used go first (the newest is always kept). A hit returns the very value that was put."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()   # key -> (value, bytes)
        self._bytes = 0

    def lookup(self, key: Hashable):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, t, nbytes: int | None = None) -> None:
        """Store `t` (a tensor, or any value whose size `nbytes` gives) under `key`."""
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]
        self._items[key] = (t, t.nbytes if nbytes is None else int(nbytes))
        self._bytes += self._items[key][1]
        while self._bytes > self.capacity_bytes and len(self._items) > 1:
            self._bytes -= self._items.popitem(last=False)[1][1]

    @property
    def nbytes(self) -> int:
        """Bytes held (the sizes the values were put with)."""
        return self._bytes

    def keys(self) -> list:
        """Keys, least recently used first."""
        return list(self._items)
