"""K-means engines: faiss on one node, and a torch.distributed Lloyd k-means across ranks.

Both engines expose the same three operations the hierarchy needs:

- ``fit(x, k, niter, seed, init=None) -> centroids``  (k, d) float32
- ``assign(x, centroids) -> (labels int64, squared distances float32)``
- ``gather_rows(x)``: concatenate a per-rank array over ranks (identity on one process)

With the distributed engine every rank passes only its own slice of the points; centroid sums (float64)
and counts are all-reduced, so 1 process and N processes compute the same centroids up to summation
order. The faiss engine is single-node and never subsamples: ``max_points_per_centroid`` is raised to
the number of points (faiss otherwise silently keeps 256 points per centroid).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from distill.errors import AmoeError

# bound the (points x centroids) distance block: this many float32 entries per chunk (~64 MB)
DISTANCE_BLOCK = 1 << 24
SUM_BLOCK = 1 << 16        # rows converted to float64 at a time when summing centroids


class ClusterCountError(AmoeError, ValueError):
    """More clusters were requested than there are points to cluster."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_k(n: int, k: int, where: str) -> None:
    if k < 1:
        raise ClusterCountError(f"{where}: k must be >= 1, got {k}")
    if k > n:
        raise ClusterCountError(f"{where}: {k} clusters requested but only {n} points to cluster; "
                                f"lower k for {where} in the clustering config (at most {n})")


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, eps: float = 1.0 / 1024) -> torch.Tensor:
    """Re-seed each empty cluster by splitting the currently largest one (deterministic, same on every
    rank): both halves get the parent centroid perturbed in opposite directions."""
    centroids = centroids.clone()
    counts = counts.clone()
    for e in torch.nonzero(counts == 0).flatten().tolist():
        big = int(torch.argmax(counts))
        if counts[big] < 2:
            break   # nothing left to split: fewer distinct points than clusters
        sign = torch.ones(centroids.shape[1], dtype=centroids.dtype)
        sign[1::2] = -1
        base = centroids[big].clone()
        centroids[e] = base * (1 + eps * sign)
        centroids[big] = base * (1 - eps * sign)
        half = counts[big] // 2
        counts[e], counts[big] = half, counts[big] - half
    return centroids


def kmeanspp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on `x`: each new centre drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(len(x))]
    d2 = ((x - centres[0]) ** 2).sum(1).astype(np.float64)
    for j in range(1, k):
        total = d2.sum()
        # all remaining points coincide with centres: any point will do
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres[j] = x[i]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(1))
    return centres


def init_sample_ids(n: int, k: int, seed: int, per_centroid: int = 32) -> np.ndarray:
    """Global row ids (sorted) of the subsample k-means++ seeds from: the same draw on every rank."""
    m = min(n, max(k, per_centroid * k))
    return np.sort(np.random.default_rng(seed).permutation(n)[:m])


def assign_torch(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of `x` (squared L2), computed in blocks to bound memory; the labels
    and distances come back on the host."""
    n, k = x.shape[0], centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64)
    dists = torch.empty(n, dtype=torch.float32)
    c = centroids.to(torch.float32)
    c_sq = (c * c).sum(1)
    step = max(1, DISTANCE_BLOCK // max(k, 1))
    for s in range(0, n, step):      # points may live on the host: each block moves to the centroids' device
        xb = x[s:s + step].to(c.device, torch.float32)
        d = (xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq[None]
        m, i = d.min(1)
        labels[s:s + step] = i
        dists[s:s + step] = m.clamp_min_(0)
    return labels, dists


def host_points(x: np.ndarray) -> torch.Tensor:
    """The points as they are held (float16 or float32, no copy); blocks are cast to float32 on use."""
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.dtype in (np.float16, np.float32) else x.astype(np.float32))


class TorchEngine:
    """Lloyd k-means in torch; distributed over the initialised process group, if any."""

    name = "torch"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    # --------------------------------------------------------------- collectives (no-ops alone)
    def _comm(self) -> torch.device:
        # NCCL only moves GPU tensors; gloo moves CPU tensors
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """SUM `t` over the ranks, in place (a no-op on one process)."""
        if _distributed():
            dev = t.to(self._comm())
            dist.all_reduce(dev)
            t.copy_(dev.cpu())
        return t

    def _sizes(self, n_local: int) -> list[int]:
        if not _distributed():
            return [n_local]
        t = torch.tensor([n_local], dtype=torch.int64, device=self._comm())
        out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return [int(v) for v in out]

    def gather_rows(self, x: np.ndarray) -> np.ndarray:
        """Concatenate every rank's rows in rank order (all ranks receive the result)."""
        if not _distributed():
            return x
        sizes = self._sizes(len(x))
        t = torch.from_numpy(np.ascontiguousarray(x))
        pad = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=self._comm())
        pad[:len(t)] = t.to(pad.device)
        out = [torch.zeros_like(pad) for _ in sizes]
        dist.all_gather(out, pad)
        return torch.cat([o[:s].cpu() for o, s in zip(out, sizes)]).numpy()

    def global_size(self, n_local: int) -> int:
        return sum(self._sizes(n_local))

    def rows_by_id(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows with these global ids (same on every rank): each rank fills the rows it owns."""
        sizes = self._sizes(len(x))
        start = sum(sizes[:dist.get_rank()]) if _distributed() else 0
        ids = torch.as_tensor(ids, dtype=torch.int64)
        mine = (ids >= start) & (ids < start + len(x))
        out = torch.zeros(len(ids), x.shape[1], dtype=torch.float64)
        out[mine] = torch.from_numpy(np.asarray(x)[(ids[mine] - start).numpy()]).double()
        return self.all_reduce(out).float().numpy()

    # --------------------------------------------------------------- k-means
    def fit(self, x: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None = None,
            where: str = "k-means", init_method: str = "random") -> np.ndarray:
        # the points stay on the host and go to the device block by block: at the paper's level 1 a rank's
        # fit points are ~89 GiB of float32, more than an accelerator holds (amoe curate plan paper)
        xt = host_points(x)
        n = self.global_size(len(x))
        _check_k(n, k, where)
        d = xt.shape[1]
        if init is None and init_method == "kmeans++":
            init = kmeanspp(self.rows_by_id(x, init_sample_ids(n, k, seed)), k, seed)
        if init is None:
            # the same seeded draw of k global row ids on every rank
            pick = np.random.default_rng(seed).permutation(n)[:k]
            c = torch.from_numpy(self.rows_by_id(x, pick))
        else:
            c = torch.from_numpy(np.asarray(init, dtype=np.float32)).clone()
        for _ in range(niter):
            labels, _ = assign_torch(xt, c.to(self.device))
            sums = torch.zeros(k, d, dtype=torch.float64, device=self.device)
            dev_labels = labels.to(self.device)
            for s in range(0, len(xt), SUM_BLOCK):   # float64 sums without a float64 copy of all points
                sums.index_add_(0, dev_labels[s:s + SUM_BLOCK], xt[s:s + SUM_BLOCK].to(self.device).double())
            counts = torch.bincount(labels, minlength=k).to(torch.int64)
            sums, counts = self.all_reduce(sums.cpu()), self.all_reduce(counts)
            nonempty = counts > 0
            new = c.clone()
            new[nonempty] = (sums[nonempty] / counts[nonempty, None]).float()
            c = _split_empty(new, counts)
        return c.numpy()

    def assign(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xt = host_points(x)
        labels, dists = assign_torch(xt, torch.from_numpy(np.asarray(centroids, dtype=np.float32)).to(self.device))
        return labels.numpy(), dists.numpy()


class FaissEngine:
    """faiss k-means on one node (GPU when faiss has GPUs, else CPU)."""

    name = "faiss"

    def __init__(self, gpu: bool | None = None):
        import faiss

        self.faiss = faiss
        self.gpu = (faiss.get_num_gpus() > 0) if gpu is None else gpu
        if _distributed():
            raise RuntimeError("the faiss engine runs on one node; under torchrun use engine 'torch' "
                               "(set \"engine\": \"torch\" in the clustering config or pass --engine torch)")

    def gather_rows(self, x: np.ndarray) -> np.ndarray:
        return x

    def global_size(self, n_local: int) -> int:
        return n_local

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t          # one node

    def fit(self, x: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None = None,
            where: str = "k-means", init_method: str = "random") -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        _check_k(len(x), k, where)
        if init is None and init_method == "kmeans++":
            init = kmeanspp(x[init_sample_ids(len(x), k, seed)], k, seed)
        if init is not None and niter == 0:
            return np.asarray(init, dtype=np.float32)
        km = self.faiss.Kmeans(x.shape[1], k, niter=max(niter, 1), seed=seed, gpu=self.gpu, verbose=False,
                               spherical=False, min_points_per_centroid=1,
                               # faiss keeps only 256 points per centroid unless told otherwise
                               max_points_per_centroid=int(math.ceil(len(x) / k)) + 1)
        km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
        return np.asarray(km.centroids, dtype=np.float32)

    def assign(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = self.faiss.IndexFlatL2(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        d, i = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return i[:, 0].astype(np.int64), np.maximum(d[:, 0], 0).astype(np.float32)


ENGINES = ("faiss", "torch")
INIT_METHODS = ("random", "kmeans++")


def make_engine(name: str, device: str | None = None):
    """'faiss' (one node) or 'torch' (torch.distributed across ranks, or one process)."""
    if name == "faiss":
        return FaissEngine()
    if name == "torch":
        return TorchEngine(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    raise ValueError(f"unknown k-means engine {name!r}; choose one of {ENGINES}")
