"""Golden 2-D RoPE of the SigLino release (SIGLINO_FACTS.md §4.3).

Each head's vector is split in halves. The first half carries a 1-D RoPE whose position is always
0 (the time axis of a still image), i.e. the identity, so it is simply left alone. The second half
is read as adjacent pairs (2f, 2f+1) = complex numbers rotated by
    theta[token, h, f] = y * freqs[h, f, 0] + x * freqs[h, f, 1]
with (y, x) the aspect-aware patch coordinates of the token. CLS, registers and padding get angle 0.
"""
from __future__ import annotations

import torch

# Constant of the release: 10 fixed-point iterations of x <- (1+x)^(1/3) from 2, in float64. It is
# an approximation of the plastic number (1.32471795724...); the approximation is what the
# checkpoints were trained with, so it is kept exactly.
def plastic_constant(iterations: int = 10) -> float:
    x = 2.0
    for _ in range(iterations):
        x = (1.0 + x) ** (1.0 / 3.0)
    return x


def golden_freqs(n_heads: int, head_dim: int, min_freq: float = 1.0, max_freq: float = 20.0) -> torch.Tensor:
    """The `freqs_cis_golden` buffer: float32 [n_heads, head_dim // 4, 2] (row, column) frequencies."""
    n_freqs = head_dim // 4
    g = plastic_constant()
    idx = torch.arange(1, n_heads * n_freqs + 1, dtype=torch.float64, device="cpu")
    # quasi-random low-discrepancy points in [0,1)^2 (R2 sequence), mapped to Gaussian directions
    z = torch.stack([torch.frac(idx * g ** -1.0), torch.frac(idx * g ** -2.0)], dim=-1)
    directions = torch.special.erfinv(2.0 * z - 1.0)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    directions = directions.to(torch.float32).reshape(n_heads, n_freqs, 2)
    magnitudes = min_freq * (max_freq / min_freq) ** torch.linspace(0.0, 1.0, n_freqs, dtype=torch.float32,
                                                                     device="cpu")
    return directions * magnitudes[None, :, None]


def grid_coordinates(hp: int, wp: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Aspect-aware (y, x) of an hp x wp patch grid in raster order, spanning [-a,a] x [-b,b] with
    a = sqrt(hp/wp), b = sqrt(wp/hp): resolution independent, area 4. float32, shape (hp*wp,)."""
    a = torch.tensor(hp / wp, dtype=torch.float32, device=device).sqrt()
    b = torch.tensor(wp / hp, dtype=torch.float32, device=device).sqrt()
    i = torch.arange(hp, dtype=torch.float32, device=device)
    j = torch.arange(wp, dtype=torch.float32, device=device)
    y = -a + 2 * a * i / max(hp - 1, 1)
    x = -b + 2 * b * j / max(wp - 1, 1)
    return y[:, None].expand(hp, wp).reshape(-1), x[None, :].expand(hp, wp).reshape(-1)


def rotation_angles(y: torch.Tensor, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """theta (..., H, F) in float32 from per-token coordinates (...,) and freqs [H, F, 2]."""
    freqs = freqs.to(torch.float32)
    return y[..., None, None].float() * freqs[..., 0] + x[..., None, None].float() * freqs[..., 1]


def apply_golden_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the second half of each head of t (B, S, H, hd) by angles given as cos/sin (B, S, H, hd/4).
    Computed in float32, returned in t's dtype."""
    hd = t.shape[-1]
    first, second = t[..., : hd // 2], t[..., hd // 2:].float()
    pairs = second.unflatten(-1, (hd // 4, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return torch.cat([first, rotated.to(t.dtype)], dim=-1)
