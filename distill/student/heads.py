"""Teacher adapters and the SigLIP2 MAP head (SIGLINO_FACTS.md §4.6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAP_HEADS = 16        # hard-coded in the release
MAP_MLP_HIDDEN = 4304  # hard-coded in the release (SigLIP2 so400m MLP width)


class Adapter(nn.Module):
    """fc2(GELU_exact(LayerNorm(fc1(z)))), fc1 with bias, fc2 without."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, out_dim, bias=True)
        self.norm = nn.LayerNorm(out_dim, eps=1e-5)
        self.fc2 = nn.Linear(out_dim, out_dim, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(z))))


class MAPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MAPHead(nn.Module):
    """One learned probe attends (nn.MultiheadAttention semantics, 16 heads) over a token set;
    the result r becomes r + MLP(LayerNorm(r))."""

    def __init__(self, dim: int):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, MAP_HEADS, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MAPMLP(dim, MAP_MLP_HIDDEN)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (N, S, C), valid (N, S) bool or None -> (N, C). Invalid keys get the dtype's most
        negative finite value added to their logits (release semantics)."""
        N = tokens.shape[0]
        probe = self.probe.expand(N, -1, -1).to(tokens.dtype)
        mask = None
        if valid is not None:
            neg = torch.finfo(tokens.dtype).min
            mask = torch.zeros(valid.shape, dtype=tokens.dtype, device=tokens.device)
            mask = mask.masked_fill(~valid.bool(), neg)[:, None, :]              # (N, 1, S)
            mask = mask.repeat_interleave(MAP_HEADS, dim=0)                       # (N*heads, 1, S)
        r = self.attention(probe, tokens, tokens, attn_mask=mask, need_weights=False)[0]
        r = r + self.mlp(self.layernorm(r))
        return r[:, 0]
