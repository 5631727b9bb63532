"""The learning-rate schedule every trainer uses (distiller, teachers, grounding VLM).

A multiplier of the base learning rate, for `torch.optim.lr_scheduler.LambdaLR` or a manual loop:
linear warm-up over `warmup` steps, then cosine decay from 1 to `min_ratio` at `total` steps (or
constant after warm-up).
"""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0, constant: bool = False) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if constant:
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
