"""PHI-S: PCA-Hadamard isotropic standardisation of teacher features (RADIO, Ranzinger et al. 2024).

For teacher features x in R^C with mean mu and covariance Sigma = U diag(lambda) U^T:

    y = alpha^-1 H U^T (x - mu),      alpha = sqrt(mean(lambda)),      H a normalised Hadamard matrix
    x = alpha U H^T y + mu            (the exact inverse: U and H are orthogonal, alpha > 0)

U^T decorrelates, and H spreads every principal variance evenly over all C output channels because
each of its entries is +-1/sqrt(C): cov(y) has diagonal sum_k H_ik^2 lambda_k / alpha^2 = 1 for every
channel. So every teacher's targets have unit variance per channel, whatever its raw scale, and the
student's MSE no longer favours the teacher with the largest variance. Unlike full whitening, no
eigenvalue is divided out, so the map stays well conditioned (and invertible) even when Sigma is
rank-deficient (fewer samples than channels, dead channels).

The covariance is the population covariance (divide by N), accumulated in float64 as raw sums
(n, sum x, sum x x^T) so that shards add up exactly: `PhiSAccumulator.all_reduce()` SUM-reduces them
over torch.distributed ranks, and fitting on the union of shards equals fitting on one process.

Hadamard matrices: Sylvester for powers of two; otherwise C = 2^k * m with m a Paley order
(Paley I: m = p + 1 for a prime p = 3 mod 4; Paley II: m = 2(p + 1) for a prime p = 1 mod 4), taking
the largest power of two that leaves a Paley core (1152 = 32 x 36, 36 = Paley II of 17; 768 = 64 x 12;
1280 = 64 x 20). Widths without such a construction raise `NoHadamardError`, naming the width.

File format (safetensors, float64 statistics, exact): `mean` (C,), `eigvecs` U (C, C) with columns
sorted by descending eigenvalue, `eigvals` (C,), `alpha` (), `hadamard` (C, C) int8 +-1 signs (the
unnormalised matrix, so loading never depends on the construction code); metadata `format=amoe-phis`,
`version`, `n` (samples fitted), `hadamard` (the construction, e.g. `sylvester(32)xpaley2(17)`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

from distill.errors import AmoeError
from distill.io import load_tensors, save_tensors_atomic

FORMAT = "amoe-phis"
VERSION = 1
_CHUNK_ROWS = 64         # rows converted to float64 at a time: the copy is 64 x C, a small fraction of
                         # the C x C statistics it is added to (C = 1152: 0.6 MB against 10.6 MB)


class NoHadamardError(AmoeError, ValueError):
    """No Hadamard construction is known (to this module) for the requested width."""


# ---------------------------------------------------------------------------- Hadamard matrices
def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(p: int) -> torch.Tensor:
    """Q_ij = chi(j - i) with chi the quadratic character mod the prime p (chi(0) = 0)."""
    chi = torch.full((p,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[[(k * k) % p for k in range(1, p)]] = 1
    idx = torch.arange(p)
    return chi[(idx[None, :] - idx[:, None]) % p]


def _paley1(p: int) -> torch.Tensor:
    """Order p + 1 for a prime p = 3 (mod 4): H = I + [[0, 1^T], [-1, Q]] (Q is skew-symmetric)."""
    q = _jacobsthal(p)
    s = torch.zeros(p + 1, p + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = q
    return s + torch.eye(p + 1, dtype=torch.int64)


def _paley2(p: int) -> torch.Tensor:
    """Order 2(p + 1) for a prime p = 1 (mod 4): the symmetric conference matrix C = [[0, 1^T], [1, Q]]
    with each 0 replaced by [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]]."""
    q = _jacobsthal(p)
    c = torch.zeros(p + 1, p + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = q
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, a) + torch.kron(torch.eye(p + 1, dtype=torch.int64), b)


def _paley_core(m: int) -> tuple[str, int] | None:
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1", m - 1
    if m % 2 == 0 and m >= 6 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2", m // 2 - 1
    return None


def _decompose(n: int) -> str | None:
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return f"sylvester({n})"
    two = n & -n                                   # largest power of two dividing n
    while two >= 1:
        core = _paley_core(n // two)
        if core is not None:
            kind, p = core
            return f"{kind}({p})" if two == 1 else f"sylvester({two})x{kind}({p})"
        two //= 2
    return None


def hadamard_construction(n: int) -> str:
    """The construction `hadamard_signs(n)` uses, e.g. 'sylvester(32)xpaley2(17)'; raises if none."""
    spec = _decompose(n)
    if spec is not None:
        return spec
    if n < 1:
        raise NoHadamardError(f"Hadamard width must be positive, got {n}")
    hint = ("no Hadamard matrix exists for widths other than 1, 2 and multiples of 4" if n > 2 and n % 4
            else "supported: 2^k, and 2^k * (p + 1) for a prime p = 3 mod 4 or 2^k * 2(p + 1) for a "
                 "prime p = 1 mod 4")
    near = min((c for d in range(1, n + 1) for c in (n - d, n + d) if _decompose(c) is not None),
               key=lambda c: (abs(c - n), c))
    raise NoHadamardError(
        f"PHI-S needs a Hadamard matrix of order {n} (the teacher's feature width) and none is "
        f"constructible here ({hint}). Fix: disable PHI-S (--set phis.enabled=false) or give the "
        f"teacher a head of a supported width (nearest: {near})")


@lru_cache(maxsize=16)
def _signs_cached(n: int) -> torch.Tensor:
    spec = hadamard_construction(n)
    h = torch.ones(1, 1, dtype=torch.int8)        # +-1 entries: int8 keeps the n x n build at 1 byte each
    for part in spec.split("x"):
        kind, arg = part[:-1].split("(")
        k = int(arg)
        factor = _sylvester(k) if kind == "sylvester" else _paley1(k) if kind == "paley1" else _paley2(k)
        h = torch.kron(h, factor.to(torch.int8))
    # the constructions are textbook, but a wrong sign would silently skew every target: verify, in
    # float32 (exact: every entry of H H^T is an integer of size <= n) and block by block, so no float
    # copy of H is ever whole (a fit's peak memory is measured against its C x C statistics)
    b = 256
    for s in range(0, n, b):
        rows = h[s:s + b].to(torch.float32)
        for t in range(0, n, b):
            want = torch.eye(len(rows), min(b, n - t)) * float(n) if s == t else torch.zeros(len(rows), min(b, n - t))
            if not torch.equal(rows @ h[t:t + b].to(torch.float32).T, want):
                raise AssertionError(f"internal error: {spec} is not a Hadamard matrix")
    return h


def hadamard_signs(n: int) -> torch.Tensor:
    """The unnormalised (n, n) Hadamard matrix of +-1 (int8), H H^T = n I."""
    return _signs_cached(n).clone()


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised (orthogonal) Hadamard matrix: entries +-1/sqrt(n), H H^T = I."""
    return _signs_cached(n).to(dtype) / math.sqrt(n)


# ---------------------------------------------------------------------------- statistics
class PhiSAccumulator:
    """Streaming float64 sums (n, sum x, sum x x^T) of (N, C) features; shards add exactly."""

    def __init__(self, width: int | None = None, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.device = torch.device(device)
        if width is not None:
            self._init(width)

    def _init(self, width: int) -> None:
        self.sum = torch.zeros(width, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(width, width, dtype=torch.float64, device=self.device)

    @property
    def width(self) -> int | None:
        return None if self.sum is None else self.sum.shape[0]

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "PhiSAccumulator":
        """Add rows of x (..., C); leading dims are flattened."""
        if x.ndim < 1:
            raise ValueError("PHI-S features must have a channel dimension, got a scalar")
        x = x.detach().reshape(-1, x.shape[-1])
        if self.sum is None:
            self._init(x.shape[-1])
        if x.shape[-1] != self.width:
            raise ValueError(f"PHI-S accumulator has width {self.width}, got features of width {x.shape[-1]}")
        chunk = _CHUNK_ROWS
        # checked chunk by chunk (a bool mask of all of x would cost a byte per feature; a float64 sum
        # of x would copy it) and before any sum changes, so a refused update leaves the accumulator as it was
        if not all(torch.isfinite(x[s:s + chunk]).all() for s in range(0, x.shape[0], chunk)):
            raise ValueError("PHI-S features contain NaN/Inf; check the teacher outputs before fitting")
        for s in range(0, x.shape[0], chunk):
            c = x[s:s + chunk].to(self.device, torch.float64)
            self.sum += c.sum(0)
            self.outer.addmm_(c.T, c)          # in place: no C x C temporary
        self.n += x.shape[0]
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "PhiSAccumulator":
        """SUM the sums over all ranks (no-op without an initialised process group). Every rank must
        call it with the same width; a rank that saw no data passes `width=` at construction."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.sum is None:
            raise ValueError("PhiSAccumulator.all_reduce on a rank that saw no data: construct it with "
                             "width=C so every rank contributes tensors of the same shape")
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.device),
                          self.sum, self.outer.reshape(-1)])
        if dist.get_backend(group) == "nccl" and flat.device.type != "cuda":
            flat = flat.cuda()               # NCCL reduces CUDA tensors only
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.to(self.device)
        c = self.width
        self.n = int(round(flat[0].item()))
        self.sum = flat[1:1 + c].clone()
        self.outer = flat[1 + c:].reshape(c, c).clone()
        return self

    @torch.no_grad()
    def finish(self) -> "PhiS":
        """The fitted PhiS. Consumes the accumulator: the C x C sums become the covariance, then the
        eigenvectors, in place, so a fit's peak stays near its statistics (one C x C float64 table for
        the eigenvectors, one for the transform)."""
        if self.sum is None or self.n < 2:
            raise ValueError(f"PHI-S needs at least 2 feature vectors to fit, got {self.n}; "
                             "raise phis.fit_images")
        hadamard_construction(self.width)      # an unsupported width fails here, before any work
        mean = (self.sum / self.n).cpu()
        cov = self.outer.cpu().div_(self.n).addr_(mean, mean, alpha=-1)
        self.sum = self.outer = None           # consumed: its buffer is now the covariance
        eigvals, eigvecs = _eigh_in_place(cov)
        eigvals = eigvals.clamp_min(0)         # round-off negatives of a PSD matrix
        mean_var = float(eigvals.mean())
        if not mean_var > 0:
            raise ValueError("PHI-S cannot standardise features with zero variance (all fitted vectors "
                             "are identical); fit on more, varied images")
        return PhiS(mean, eigvecs, eigvals, torch.tensor(math.sqrt(mean_var), dtype=torch.float64), n=self.n)


def _eigh_in_place(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of a symmetric float64 CPU matrix, the vectors
    written over `cov` (LAPACK dsyev through scipy, O(C) workspace; torch's eigh allocates two more
    C x C). Each vector's sign is fixed (largest |component| positive) so fits are reproducible."""
    import numpy as np
    import scipy.linalg

    a = cov.numpy().T                      # Fortran-ordered view of the symmetric matrix: LAPACK works in it
    w, v = scipy.linalg.eigh(a, overwrite_a=True, check_finite=False, driver="ev")
    if not np.shares_memory(v, a):         # a scipy that copied anyway: correct, just not in place
        a = v
    c = a.shape[1]
    for j in range(c // 2):                # descending order, one column pair at a time (no C x C copy)
        a[:, [j, c - 1 - j]] = a[:, [c - 1 - j, j]]
    w = w[::-1].copy()
    for s in range(0, c, 128):             # in column blocks: no C x C |a| temporary
        block = a[:, s:s + 128]
        sign = np.sign(block[np.abs(block).argmax(0), np.arange(block.shape[1])])
        np.multiply(block, np.where(sign == 0, 1.0, sign)[None, :], out=block)
    return torch.from_numpy(w), torch.from_numpy(a)


# ---------------------------------------------------------------------------- the standardiser
class PhiS:
    """An invertible PHI-S map for one feature space (C channels)."""

    def __init__(self, mean: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor,
                 alpha: torch.Tensor, hadamard_signs: torch.Tensor | None = None, n: int = 0):
        c = mean.shape[0]
        for name, t, shape in (("eigvecs", eigvecs, (c, c)), ("eigvals", eigvals, (c,)),
                               ("hadamard", hadamard_signs, (c, c)), ("alpha", alpha, ())):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"PHI-S {name} has shape {tuple(t.shape)}, expected {shape}")
        self.mean = mean.to(torch.float64)
        self.eigvecs = eigvecs.to(torch.float64)
        self.eigvals = eigvals.to(torch.float64)
        self.alpha = alpha.to(torch.float64)
        # H is a constant of the width, not fitted: built at first use, like W, so a fit holds neither
        self._signs = None if hadamard_signs is None else hadamard_signs.to(torch.int8)
        self.n = int(n)
        self._w_table: torch.Tensor | None = None
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def hadamard_signs(self) -> torch.Tensor:
        if self._signs is None:
            self._signs = hadamard_signs(self.width)
        return self._signs

    @property
    def width(self) -> int:
        return self.mean.shape[0]

    @property
    def _w(self) -> torch.Tensor:
        """W = alpha^-1 H U^T: y = (x - mu) W^T, and x = y W_inv^T + mu with W_inv = alpha U H^T = alpha^2 W^T
        (H and U orthogonal). Built in row blocks, so no float64 copy of H is ever whole."""
        if self._w_table is None:
            c = self.width
            w = torch.empty(c, c, dtype=torch.float64)
            for s in range(0, c, 128):
                hb = self.hadamard_signs[s:s + 128].to(torch.float64) / math.sqrt(c)
                torch.matmul(hb, self.eigvecs.T, out=w[s:s + 128])
            self._w_table = w.div_(self.alpha)
        return self._w_table

    def __repr__(self) -> str:
        return f"PhiS(width={self.width}, n={self.n}, alpha={float(self.alpha):.4g})"

    # -------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, x: torch.Tensor) -> "PhiS":
        """Fit on features x (N, C) (leading dims flattened), float64 accumulation, one process."""
        return PhiSAccumulator().update(x).finish()

    # -------------------------------------------------------------- applying
    def _mats(self, device: torch.device, dtype: torch.dtype):
        # bf16/fp16 matmuls would cost ~3 significant digits on a C-long sum: compute in float32
        work = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, work)
        if key not in self._cache:
            w_t = self._w.T.to(device, work).contiguous()
            self._cache[key] = (self.mean.to(device, work), w_t, (self._w * self.alpha ** 2).to(device, work))
        return self._cache[key]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.width:
            raise ValueError(f"PHI-S was fitted on width {self.width}, got features of width {x.shape[-1]}")

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher space -> standardised space; x (..., C), same shape and dtype out."""
        self._check(x)
        mean, wt, _ = self._mats(x.device, x.dtype)
        return ((x.to(mean.dtype) - mean) @ wt).to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Standardised space -> teacher space (the exact inverse of `transform`)."""
        self._check(y)
        mean, _, wit = self._mats(y.device, y.dtype)
        return (y.to(mean.dtype) @ wit + mean).to(y.dtype)

    # -------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        save_tensors_atomic(path, {"mean": self.mean, "eigvecs": self.eigvecs.contiguous(), "eigvals": self.eigvals,
                                   "alpha": self.alpha, "hadamard": self.hadamard_signs},
                            metadata={"format": FORMAT, "version": str(VERSION), "n": str(self.n),
                                      "hadamard": hadamard_construction(self.width)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PhiS":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"PHI-S file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a PHI-S file (format={meta.get('format')!r}, expected {FORMAT!r})")
        if int(meta.get("version", "0")) > VERSION:
            raise ValueError(f"{path} is PHI-S format version {meta['version']}; this code reads up to "
                             f"{VERSION}: update amoe")
        t = load_tensors(path)
        signs = t["hadamard"]
        c = signs.shape[0]
        s64 = signs.to(torch.float64)
        if not torch.equal(s64 @ s64.T, c * torch.eye(c, dtype=torch.float64)):
            raise ValueError(f"{path}: the stored Hadamard matrix is not orthogonal; the file is corrupt")
        return cls(t["mean"], t["eigvecs"], t["eigvals"], t["alpha"], signs, n=int(meta.get("n", "0")))


# ---------------------------------------------------------------------------- perf command
def run_perf(n: int = 65536, width: int = 1152, repeats: int = 3, seed: int = 0, device: str = "cpu") -> dict:
    """Fit and transform/inverse wall times on correlated random features (N x C, float32)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / math.sqrt(width)
    scale = torch.logspace(-2, 1, width)
    x = ((torch.randn(n, width, generator=g) * scale) @ mix + 3.0).to(device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def best(fn):
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times), out

    t_fit, phis = best(lambda: PhiS.fit(x))
    t_tr, y = best(lambda: phis.transform(x))
    t_inv, back = best(lambda: phis.inverse(y))
    var = y.double().var(0, unbiased=False)
    return {"n": n, "width": width, "device": str(x.device), "threads": torch.get_num_threads(),
            "hadamard": hadamard_construction(width), "fit_s": round(t_fit, 4),
            "transform_s": round(t_tr, 4), "inverse_s": round(t_inv, 4),
            "transform_rows_per_s": round(n / t_tr), "per_channel_var_min": round(float(var.min()), 5),
            "per_channel_var_max": round(float(var.max()), 5),
            "roundtrip_max_abs_err": float((back - x).abs().max())}


def _warm_libraries(width: int) -> None:
    """One small float64 GEMM (torch's BLAS) and one eigh (scipy's LAPACK) at this width, so their
    one-off per-process buffers exist before a measurement starts."""
    import numpy as np
    import scipy.linalg

    out, c = torch.zeros(width, width, dtype=torch.float64), torch.randn(_CHUNK_ROWS, width, dtype=torch.float64)
    out.addmm_(c.T, c)
    m = np.random.default_rng(0).random((256, 256))
    scipy.linalg.eigh(m + m.T, driver="ev")


def run_stream_perf(n: int = 1_000_000, width: int = 1152, block: int = 16384, seed: int = 0,
                    warm_libraries: bool = False) -> dict:
    """Peak memory of a streamed fit: N x C float32 features arrive in blocks of `block` rows (as a
    teacher's batches do) and go into a PhiSAccumulator that keeps nothing but its float64 sums.
    The blocks are written into one buffer allocated before the measurement starts, so the peak-RSS
    growth is the fit's own: statistics, float64 chunk copies, BLAS buffers and the final eigh. Run it
    in a fresh process (the CLI does), so that nothing before it has raised the peak where the kernel's
    peak mark cannot be reset."""
    from distill.memory import peak_rss_mib, reset_peak_rss

    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, width)
    buf = torch.empty(block, width)
    buf.normal_(generator=g)                       # touched: its pages are resident before the baseline
    if warm_libraries:
        _warm_libraries(width)
    reset_peak_rss()
    base = peak_rss_mib()
    t0 = time.perf_counter()
    acc = PhiSAccumulator(width)
    done = 0
    while done < n:
        rows = min(block, n - done)
        x = buf[:rows]
        x.normal_(generator=g).mul_(scale).add_(3.0)
        acc.update(x)
        done += rows
    t_acc = time.perf_counter() - t0
    peak_acc = (peak_rss_mib() - base) * 2**20
    phis = acc.finish()
    t_fit = time.perf_counter() - t0
    peak_all = (peak_rss_mib() - base) * 2**20
    stats_bytes = (width * width + width) * 8          # the float64 sums: outer and sum
    return {"n": n, "width": width, "block_rows": block, "threads": torch.get_num_threads(),
            "accumulate_s": round(t_acc, 2), "fit_s": round(t_fit, 2), "fitted_n": phis.n,
            "statistics_bytes": stats_bytes, "input_block_bytes": block * width * 4,
            "peak_rss_growth_accumulate_bytes": round(peak_acc), "peak_rss_growth_with_finish_bytes": round(peak_all),
            "accumulate_peak_over_statistics": round(peak_acc / stats_bytes, 2),
            "fit_peak_over_statistics": round(peak_all / stats_bytes, 2),
            "libraries_warmed_before_baseline": warm_libraries, "goal_over_statistics": 2.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.phis", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("perf", help="fit + transform time for N x C features")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true",
                   help="peak memory of a streamed fit of --n rows arriving in blocks of --block rows")
    p.add_argument("--block", type=int, default=16384)
    p.add_argument("--warm-libraries", action="store_true",
                   help="--stream: allocate BLAS / LAPACK per-process buffers before the baseline, so the peak "
                        "is the fit's own arrays")
    h = sub.add_parser("hadamard", help="which Hadamard construction a width uses")
    h.add_argument("widths", type=int, nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "perf":
        r = (run_stream_perf(args.n, args.width, args.block, warm_libraries=args.warm_libraries) if args.stream
             else run_perf(args.n, args.width, args.repeats, device=args.device))
        print(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
        return 0
    for w in args.widths:
        try:
            print(f"{w}: {hadamard_construction(w)}")
        except NoHadamardError as e:
            print(f"{w}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
