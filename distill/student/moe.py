"""Dense SwiGLU FFN and the token-choice MoE of the release (SIGLINO_FACTS.md §4.5).

Router: sigmoid scores (float32); experts are *chosen* by top-k of (score + expert_bias) but
*weighted* by the raw score, so the bias only steers load (auxiliary-loss-free balancing, see
`update_expert_bias`). No capacity limit: every token's result is independent of the others.

Expert compute has two interchangeable paths: a per-expert loop (reference) and one grouped GEMM
(`torch._grouped_mm`) over tokens sorted by expert. `expert_backend` picks: "loop", "grouped" or
"auto" (grouped where this torch has `_grouped_mm` and the shapes/dtype suit it).
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEArgs

EXPERT_BACKENDS = ("auto", "loop", "grouped")


def activate(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(z)
    if kind == "relu2":  # the release's "relu2" is 2 * relu(z)^2
        return 2.0 * F.relu(z).square()
    raise ValueError(f"unknown activation {kind!r}")


class FeedForward(nn.Module):
    """w2(act(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activate(self.w1(x), self.activation) * self.w3(x))


class GroupedExperts(nn.Module):
    """E experts as stacked bare parameters (release keys `experts.w1/w2/w3`, shapes [E,M,D]/[E,D,M]/[E,M,D])."""

    def __init__(self, dim: int, hidden: int, num_experts: int, activation: str):
        super().__init__()
        self.activation = activation
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x_sorted: torch.Tensor, counts: list[int], backend: str) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (expert 0 first), counts[e] tokens each."""
        if backend == "grouped":
            return self._grouped(x_sorted, counts)
        return self._loop(x_sorted, counts)

    def _loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = []
        for e, chunk in enumerate(torch.split(x, counts, dim=0)):
            if chunk.shape[0] == 0:
                continue
            h = activate(chunk @ self.w1[e].T, self.activation) * (chunk @ self.w3[e].T)
            outs.append(h @ self.w2[e].T)
        return torch.cat(outs, dim=0) if outs else x.new_zeros(0, self.w2.shape[1])

    def _grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        h1 = _grouped_mm(x, self.w1.transpose(-2, -1), offs)
        h3 = _grouped_mm(x, self.w3.transpose(-2, -1), offs)
        h = activate(h1, self.activation) * h3
        return _grouped_mm(h, self.w2.transpose(-2, -1), offs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s CPU
    backward rejects zero-stride (expanded) gradients such as the one `.sum()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offs))


def grouped_mm_supported(x: torch.Tensor, dims: Iterable[int]) -> bool:
    """`_grouped_mm` exists in this torch, runs (forward and backward) for x's device type and dtype,
    and its stride rule (rows 16-byte aligned) holds for the expert dims."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    per16 = 16 // x.element_size()
    if not all(d % per16 == 0 for d in dims):
        return False
    return _grouped_mm_works(x.device.type, x.dtype)


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): kernels differ across torch versions and GPUs (e.g. the CUDA
    kernel is bf16-only and needs a recent GPU; older torch has no CPU kernel)."""
    try:
        with torch.enable_grad():
            a = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
            _grouped_mm(a, b.transpose(-2, -1), offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class TokenChoiceRouter(nn.Module):
    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(dim, args.num_experts, bias=False)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor):
        scores = torch.sigmoid(self.gate(x).float())
        _, chosen = torch.topk(scores + expert_bias.float(), k=self.args.top_k, dim=-1)
        weights = scores.gather(-1, chosen)
        if self.args.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.args.route_scale, chosen


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.expert_backend = "auto"
        self.router = TokenChoiceRouter(dim, args)
        self.experts = GroupedExperts(dim, hidden, args.num_experts, args.activation)
        self.shared_experts = (FeedForward(dim, hidden * args.num_shared_experts, args.activation)
                               if args.num_shared_experts > 0 else None)
        self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        # tokens routed to each expert in the last forward (valid tokens only), for load balancing.
        # Non-persistent: not part of the checkpoint. The trainer sums/all-reduces it between steps.
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.float32),
                             persistent=False)

    def resolve_backend(self, x: torch.Tensor) -> str:
        backend = self.expert_backend
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown expert_backend {backend!r}; choose one of {EXPERT_BACKENDS}")
        dims = (self.experts.w1.shape[1], self.experts.w1.shape[2])
        if backend == "grouped":
            if not grouped_mm_supported(x, dims):
                raise RuntimeError("expert_backend='grouped' needs torch._grouped_mm (torch >= 2.8), bf16 on "
                                   "CUDA, and dims that are multiples of 16 bytes; use 'loop' or 'auto'")
            return "grouped"
        if backend == "auto":
            return "grouped" if grouped_mm_supported(x, dims) else "loop"
        return "loop"

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.router(x, self.expert_bias)
        E, K = self.args.num_experts, self.args.top_k
        flat_expert = chosen.reshape(-1)
        with torch.no_grad():
            counted = flat_expert if valid is None else chosen[valid.reshape(-1)].reshape(-1)
            self.tokens_per_expert.copy_(torch.bincount(counted, minlength=E).float())
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // K
        counts = torch.bincount(flat_expert, minlength=E).tolist()
        w_sorted = weights.reshape(-1)[order][:, None]
        x_sorted = x[token_of]
        if self.args.score_before_experts:
            x_sorted = (x_sorted.float() * w_sorted).to(x.dtype)
        y_sorted = self.experts(x_sorted, counts, self.resolve_backend(x))
        # scores applied to the expert output (again, when score_before_experts: release behaviour)
        y_sorted = (y_sorted.float() * w_sorted).to(x.dtype)
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        out = out.index_add(0, token_of, y_sorted)
        return out.reshape(shape)


def update_expert_bias(model_or_layers, tokens_per_expert=None, rate: float = 1e-3) -> list[torch.Tensor]:
    """Auxiliary-loss-free balancing (DeepSeek-V3 / torchtitan): per MoE layer,
        expert_bias += rate * sign(mean_load - load)
    so under-loaded experts become likelier to be chosen. `tokens_per_expert` is a list of per-layer
    loads (e.g. all-reduced sums over the step); by default each layer's recorded
    `tokens_per_expert` buffer is used. Returns the per-layer updates applied."""
    layers = _moe_layers(model_or_layers)
    if tokens_per_expert is None:
        tokens_per_expert = [m.tokens_per_expert for m in layers]
    tokens_per_expert = list(tokens_per_expert)
    if len(tokens_per_expert) != len(layers):
        raise ValueError(f"got loads for {len(tokens_per_expert)} layers but the model has {len(layers)} MoE layers")
    updates = []
    with torch.no_grad():
        for moe, load in zip(layers, tokens_per_expert):
            load = torch.as_tensor(load, dtype=torch.float32, device=moe.expert_bias.device)
            if load.shape != moe.expert_bias.shape:
                raise ValueError(f"load shape {tuple(load.shape)} != expert_bias shape {tuple(moe.expert_bias.shape)}")
            delta = rate * torch.sign(load.mean() - load)
            moe.expert_bias.add_(delta)
            updates.append(delta)
    return updates


def _moe_layers(obj) -> list[MoE]:
    if isinstance(obj, MoE):
        return [obj]
    if isinstance(obj, nn.Module):
        return [m for m in obj.modules() if isinstance(m, MoE)]
    return [m for item in obj for m in _moe_layers(item)]
