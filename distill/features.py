"""The one result type every encoder returns (student, teachers, baselines).

Images in a batch may have different sizes, so patch features are kept per image as a
flat (h*w, C) tensor in raster order, with the grid (h, w) beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Features:
    """Per-head features for N images.

    summary:   head -> (N, C_head) summary vectors (CLS, pooled MAP output, adaptor summary...).
    patches:   head -> list of N tensors (h_i * w_i, C_head), raster order.
    grids:     list of N (h_i, w_i) patch grids, shared by every head's patches.
    cls:       (N, D) backbone CLS token where the model has one, else None.
    registers: (N, R, D) register tokens where the model has them, else None.
    """

    summary: dict[str, torch.Tensor]
    patches: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grids: list[tuple[int, int]] = field(default_factory=list)
    cls: torch.Tensor | None = None
    registers: torch.Tensor | None = None

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.summary)

    def __len__(self) -> int:
        return len(next(iter(self.summary.values())))

    def patch_map(self, head: str, index: int) -> torch.Tensor:
        """Patch features of one image as a (C, h, w) map."""
        h, w = self.grids[index]
        return self.patches[head][index].T.reshape(-1, h, w)

    def to(self, *args, **kwargs) -> "Features":
        return Features(
            summary={k: v.to(*args, **kwargs) for k, v in self.summary.items()},
            patches={k: [p.to(*args, **kwargs) for p in v] for k, v in self.patches.items()},
            grids=list(self.grids),
            cls=None if self.cls is None else self.cls.to(*args, **kwargs),
            registers=None if self.registers is None else self.registers.to(*args, **kwargs),
        )

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        """Join the features of consecutive batches (same heads in every part)."""
        if not parts:
            raise ValueError("Features.concat needs at least one part")
        first = parts[0]

        def cat_opt(xs):
            return None if any(x is None for x in xs) else torch.cat(xs)

        return Features(
            summary={k: torch.cat([p.summary[k] for p in parts]) for k in first.summary},
            patches={k: [t for p in parts for t in p.patches[k]] for k in first.patches},
            grids=[g for p in parts for g in p.grids],
            cls=cat_opt([p.cls for p in parts]),
            registers=cat_opt([p.registers for p in parts]),
        )
