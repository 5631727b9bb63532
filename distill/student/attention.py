"""Attention with QK-norm, interleaved GQA, golden RoPE and attention sinks.

Which query may see which key is described by one integer tensor `segment_ids` (B, S): tokens
attend only to tokens of the same segment (one segment = one image), and a token with id < 0
(padding) attends to nothing and is seen by nothing. The same description serves the padded
batch (one image per row) and true packing (several images per row).

Sinks: each head's output is scaled by sigmoid(LSE - sinks[h]), i.e. softmax with one extra key
whose logit is sinks[h] and whose value is zero. Three backends compute it:
- "flex": FlexAttention with a BlockMask, LSE returned by the kernel (CUDA; has no CPU backward).
- "segments": SDPA per image: the tokens of each segment are gathered, segments of equal length
  share one batched unmasked SDPA call, and the outputs are scattered back. Attention work is then
  sum(n_i^2) per sequence instead of S^2, and the unmasked call takes SDPA's fused CPU kernel. The
  default wherever flex is not used (CPU training and feature extraction).
- "sdpa": scaled_dot_product_attention with a dense boolean mask over the whole packed sequence and
  the sink as a real extra key: the reference path the other two are tested against.
  To give that key logit sinks[h] for every query, q gets one extra component equal to 1 and the
  sink key carries sinks[h] * sqrt(head_dim) there (real keys carry 0), with the scale fixed at
  1/sqrt(head_dim). A fully masked (padding) query then puts all weight on the zero-valued sink
  and outputs 0, exactly as the LSE form gives. ("segments" uses the same sink key per segment and
  gives padding tokens 0.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_golden_rope

BACKENDS = ("auto", "flex", "segments", "sdpa")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention_backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "flex" if device.type == "cuda" and _flex_available() else "segments"
    if backend == "flex" and not _flex_available():
        raise RuntimeError("attention_backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); "
                           "use attention_backend='sdpa'")
    return backend


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class AttentionMask:
    """Lazily built masks for one forward call, shared by all layers.

    Built fresh for every call from `segment_ids`: nothing is cached on the model, so a later call
    with other shapes or another padding pattern can never reuse a stale mask (release bug §7).
    """

    def __init__(self, segment_ids: torch.Tensor, backend: str, compiled_flex=None):
        self.segment_ids = segment_ids
        self.backend = backend
        self._dense = None
        self._block = None
        self._groups = None
        self._compiled_flex = compiled_flex

    def segment_groups(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([idx (G, L) per distinct segment length L], inverse permutation): `idx` holds flat
        positions (b * S + s) of each segment's tokens (segments are contiguous runs of one id);
        gathering every group then the padding positions and indexing with the inverse permutation
        restores sequence order."""
        if self._groups is None:
            ids = self.segment_ids.cpu()
            B, S = ids.shape
            by_len: dict[int, list[int]] = {}
            flat = ids.reshape(-1)
            change = torch.ones_like(flat, dtype=torch.bool)
            change[1:] = (flat[1:] != flat[:-1]) | (torch.arange(1, B * S) % S == 0)
            starts = torch.nonzero(change).reshape(-1).tolist() + [B * S]
            pad = []
            for a, b in zip(starts[:-1], starts[1:]):
                if flat[a] < 0:
                    pad.extend(range(a, b))
                else:
                    by_len.setdefault(b - a, []).append(a)
            groups = [torch.tensor(st)[:, None] + torch.arange(n)[None, :] for n, st in sorted(by_len.items())]
            order = torch.cat([g.reshape(-1) for g in groups] + [torch.tensor(pad, dtype=torch.long)])
            dev = self.segment_ids.device
            self._groups = ([g.to(dev) for g in groups], torch.argsort(order).to(dev), len(pad))
        return self._groups

    def attention_scores(self) -> dict[str, int]:
        """Query-key scores each backend computes for this layout, and the scores the images need."""
        B, S = self.segment_ids.shape
        groups, _, _ = self.segment_groups()
        needed = sum(int(g.shape[0]) * int(g.shape[1]) ** 2 for g in groups)
        return {"needed": needed, "segments": needed, "dense": B * S * S}

    @property
    def valid(self) -> torch.Tensor:
        return self.segment_ids >= 0

    def dense_with_sink(self) -> torch.Tensor:
        """(B, 1, S, S+1) bool: same-segment pairs of valid tokens, plus an always-visible sink column."""
        if self._dense is None:
            ids = self.segment_ids
            same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
            sink = torch.ones_like(same[:, :, :1])
            self._dense = torch.cat([same, sink], dim=-1)[:, None]
        return self._dense

    def block_mask(self):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            ids = self.segment_ids

            def same_segment(b, h, q, k):
                return (ids[b, q] == ids[b, k]) & (ids[b, q] >= 0)

            B, S = ids.shape
            self._block = create_block_mask(same_segment, B, None, S, S, device=ids.device)
        return self._block

    def flex(self, q, k, v, scale):
        from torch.nn.attention.flex_attention import flex_attention

        fn = self._compiled_flex or flex_attention
        return fn(q, k, v, block_mask=self.block_mask(), scale=scale, return_lse=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, use_qk_norm: bool = True,
                 qk_norm_eps: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.use_qk_norm = use_qk_norm
        self.qk_norm_eps = qk_norm_eps
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(n_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q = rms_norm(q, None, self.qk_norm_eps)
            k = rms_norm(k, None, self.qk_norm_eps)
        # interleaved repetition (query head h uses kv head h // group), *before* RoPE so each copy
        # is rotated with its own query head's frequencies
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        q = apply_golden_rope(q, cos, sin)
        k = apply_golden_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        out = sink_attention(q, k, v, self.sinks, mask)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


def sink_attention(q, k, v, sinks: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """softmax attention under `mask` with one zero-valued sink key of logit sinks[h] per head."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mask.backend == "flex":
        out, lse = mask.flex(q, k, v, scale)
        factor = torch.sigmoid(lse.float() - sinks.float()[None, :, None])
        return (out.float() * factor[..., None]).to(q.dtype)
    if mask.backend == "segments":
        return _segment_sink_attention(q, k, v, sinks, mask, scale)
    B, H, S, hd = q.shape
    # q: [q, 1]; keys: [k, 0] plus the sink key [0, sinks*sqrt(hd)]; values: [v, 0] plus a zero row.
    # v is padded to hd+1 as well only so q, k and v share a head dim: that lets SDPA pick its fused
    # CPU kernel instead of the slower math fallback. The extra output column is always 0 and dropped.
    q1, k1, v1 = _with_sink(q, k, v, sinks)
    out = F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask.dense_with_sink(), scale=scale)
    return out[..., :hd]


def _with_sink(q, k, v, sinks):
    """The sink as a real extra key (see the module doc): q -> [q, 1], k -> [k, 0] + sink key, v -> [v, 0] + 0."""
    G, H, L, hd = q.shape
    q1 = torch.cat([q, q.new_ones(G, H, L, 1)], dim=-1)
    sink_key = torch.cat([q.new_zeros(H, hd), (sinks.to(q.dtype) * math.sqrt(hd))[:, None]], dim=-1)
    k1 = torch.cat([torch.cat([k, k.new_zeros(G, H, L, 1)], dim=-1),
                    sink_key[None, :, None, :].expand(G, H, 1, hd + 1)], dim=2)
    return q1, k1, F.pad(v, (0, 1, 0, 1))


def _segment_sink_attention(q, k, v, sinks, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Per-segment SDPA: gather each length group's tokens, one unmasked call per group, scatter back."""
    B, H, S, hd = q.shape
    groups, inverse, n_pad = mask.segment_groups()
    flat = [t.transpose(1, 2).reshape(B * S, H, hd) for t in (q, k, v)]   # (B*S, H, hd)
    outs = []
    for idx in groups:
        G, L = idx.shape
        qg, kg, vg = (t[idx.reshape(-1)].view(G, L, H, hd).transpose(1, 2) for t in flat)
        q1, k1, v1 = _with_sink(qg, kg, vg, sinks)
        o = F.scaled_dot_product_attention(q1, k1, v1, scale=scale)[..., :hd]
        outs.append(o.transpose(1, 2).reshape(G * L, H, hd))
    outs.append(q.new_zeros(n_pad, H, hd))                                # padding tokens output 0
    return torch.cat(outs)[inverse].view(B, S, H, hd).transpose(1, 2)


def reference_sink_attention(q, k, v, sinks, segment_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-math reference (explicit LSE): returns (output, lse). Used by tests to verify both backends."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    ids = segment_ids
    allowed = ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0))[:, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.where(allowed, torch.exp(logits - torch.where(lse.isfinite(), lse, 0)[..., None]), 0.0)
    out = probs @ v.float()
    factor = torch.sigmoid(lse - sinks.float()[None, :, None])
    return out * factor[..., None], lse
