"""Guarded optimisation, shared by every trainer (distiller, teachers, grounding VLM).

After `backward()`, `guarded_step` measures the global gradient norm (clipping it when asked) and asks
a `StepGuard` whether the update may be applied. A step is skipped, its gradients dropped, when the loss
or the gradient norm is not finite, or (with `spike_factor`) when the norm exceeds that factor times the
running median of the last accepted norms: a finite loss with a destructive update is not applied
either. The guard counts skips in a row; a trainer aborts once `max_in_a_row` is reached.

`require_finite` is the last line: no checkpoint or export is ever written from weights holding a
NaN or an infinity.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from distill.errors import AmoeError


class NonFiniteWeightsError(AmoeError, RuntimeError):
    """Weights hold NaN or infinite values; they are never saved."""


class TrainingAborted(AmoeError, RuntimeError):
    """Training stopped on purpose (e.g. too many skipped steps in a row)."""


@dataclass
class StepGuard:
    max_in_a_row: int = 20            # abort after this many skipped steps in a row
    spike_factor: float | None = None  # skip when grad norm > factor x running median (None: off)
    window: int = 100                 # accepted norms the median is taken over
    min_history: int = 20             # no spike verdict before this many accepted steps
    in_a_row: int = 0
    skipped: int = 0
    history: deque = field(default_factory=deque)

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must not be applied, or None when it may."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self.spike_factor and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and grad_norm > self.spike_factor * median:
                return (f"gradient norm {grad_norm:.4g} is over {self.spike_factor:g} x the running median "
                        f"{median:.4g}")
        return None

    def record(self, reason: str | None, grad_norm: float) -> None:
        if reason is None:
            self.in_a_row = 0
            self.history.append(float(grad_norm))
            while len(self.history) > self.window:
                self.history.popleft()
        else:
            self.in_a_row += 1
            self.skipped += 1

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped, "history": list(self.history)}

    def load_state_dict(self, state: Mapping) -> None:
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))
        self.history = deque(float(v) for v in state.get("history", []))


def guarded_step(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], loss: float, clip: float,
                 guard: StepGuard, timings: dict | None = None) -> tuple[str | None, float]:
    """Measure (and clip, when `clip` > 0) the global grad norm, then step or drop the gradients.

    Returns (why the step was skipped or None, the pre-clip gradient norm). Every rank of a DDP / FSDP
    run sees the same global norm and loss, so all ranks take the same decision. `timings["guard_s"]`
    accumulates the seconds the guard itself costs (norm and verdict, not the optimiser step)."""
    t0 = time.perf_counter()
    params = list(params)
    if clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    else:   # the norm alone: clip_grad_norm_ with an infinite max would still rescale every gradient by 1
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    reason = guard.verdict(float(loss), grad_norm)
    if timings is not None:
        timings["guard_s"] = timings.get("guard_s", 0.0) + time.perf_counter() - t0
    if reason is None:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    guard.record(reason, grad_norm)
    return reason, grad_norm


def optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, params, clip: float,
                   guard: StepGuard, what: str, fix: str, value: float | None = None) -> float:
    """One update of a small loop (the mini-world teachers, the stand-in LM): backward, then the
    guarded step (clip the global grad norm; skip a non-finite step), the schedule on an applied
    step, and an abort after too many skips in a row that says `fix`. Returns the loss, or `value`:
    the loss of the whole global batch where `loss` is one DDP rank's share (so ranks agree)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    value = loss.item() if value is None else value
    skipped, _ = guarded_step(opt, params, value, clip, guard)
    if skipped is None:
        sched.step()
    elif guard.exhausted:
        raise TrainingAborted(f"{what}: {guard.in_a_row} skipped steps in a row ({skipped}); {fix}")
    return round(value, 5)


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def require_finite(state: Mapping[str, torch.Tensor], what: str, last_good: str | None = None) -> None:
    """Refuse to save `state` (a model or optimiser state dict) if any tensor is not finite."""
    bad = nonfinite_tensors(state)
    if bad:
        where = f"the last good checkpoint is {last_good}" if last_good else "no good checkpoint exists yet"
        raise NonFiniteWeightsError(
            f"refusing to write {what}: {len(bad)} tensor(s) hold NaN or infinite values (first: {bad[0]}); "
            f"{where}. Resume from it with a lower learning rate (--set optim.lr=...)")
