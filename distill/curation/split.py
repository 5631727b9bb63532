"""The split-based first level (Vo et al. 2024's trick for k in the tens of millions).

A flat k-means at k = 20M keeps (k, d) float32 centroids and float64 sums on every rank (~230 GB at
d = 768, `amoe curate plan paper`). Instead, with `n_splits` = s:
1. k-means at the coarse k_c = ceil(k / s), with the engine (distributed as usual; small tables);
2. each coarse cluster c is split by its own k-means into s_c sub-clusters, s_c proportional to its
   global size (largest-remainder rounding, at least 1, at most its size), so that the s_c sum to k;
3. a point's label is its coarse cluster's offset plus its nearest sub-centroid *within* that cluster
   (the approximation of the method: the nearest of all k centroids may lie in a neighbouring cluster).

Step 2 runs for groups of coarse clusters whose sub-centroids number at most `group_centroids`, so the
float64 sums all-reduced per iteration are (group_centroids, d), never (k, d): every rank processes only
its own points of the group, sums and counts are all-reduced, all ranks compute the same centroids.
Initial sub-centroids are seeded draws of each cluster's members (by global row id). The final (k, d)
float32 table is assembled on the host (it is the level's output and is saved).
"""
from __future__ import annotations

import numpy as np
import torch

from distill.curation.kmeans import assign_torch, host_points

GROUP_CENTROIDS = 1 << 18     # sub-centroids fitted together: sums of 256k x d float64 (1.5 GB at d = 768)


def split_sizes(counts: np.ndarray, k: int) -> np.ndarray:
    """Sub-clusters per coarse cluster: proportional to `counts`, >= 1 for non-empty clusters, <= the
    count, summing to k (largest remainder). Raises if k exceeds the points or is below the clusters."""
    counts = np.asarray(counts, dtype=np.int64)
    nonempty = counts > 0
    if k > counts.sum():
        raise ValueError(f"k={k} exceeds the {int(counts.sum())} points to cluster")
    if k < int(nonempty.sum()):
        raise ValueError(f"k={k} is below the {int(nonempty.sum())} non-empty coarse clusters; lower n_splits")
    share = counts * (k / counts.sum())
    sizes = np.where(nonempty, np.maximum(1, np.floor(share)), 0).astype(np.int64)
    sizes = np.minimum(sizes, counts)
    # hand out the rest by largest remainder among clusters with room, repeating until k is reached
    while sizes.sum() < k:
        room = sizes < counts
        rem = np.where(room, share - sizes, -np.inf)
        need = int(k - sizes.sum())
        top = np.argsort(-rem, kind="stable")[:min(need, int(room.sum()))]
        sizes[top] += 1
    while sizes.sum() > k:      # the floor of 1 may overshoot: take back from the largest shares
        over = int(sizes.sum() - k)
        can = np.flatnonzero(sizes > 1)
        take = can[np.argsort(-(sizes[can] - share[can]), kind="stable")[:over]]
        sizes[take] -= 1
    return sizes


def split_fit(engine, x: np.ndarray, k: int, n_splits: int, niter: int, seed: int, where: str = "k-means",
              group_centroids: int = GROUP_CENTROIDS, out: np.ndarray | None = None,
              write: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids (k, d), coarse centroids (k_c, d), offsets (k_c + 1,)) fitted on this rank's `x`.
    The (k, d) table goes into `out` when given (anything taking `out[a:b] = rows`, e.g. the level
    file's row sink: at k = 20M the table is 57 GiB, which no rank should hold in its own memory),
    written only where `write` (every rank computes the same groups; one writes them)."""
    k_c = -(-k // n_splits)
    coarse = engine.fit(x, k_c, niter, seed, where=f"{where} (coarse)")
    labels, _ = engine.assign(x, coarse)
    # every rank's count per cluster: the global sizes, and the global member ids of the seeded draws
    per_rank = engine.gather_rows(np.bincount(labels, minlength=k_c)[None].astype(np.int64))   # (N, k_c)
    counts = per_rank.sum(0)
    sizes = split_sizes(counts, k)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    before = per_rank[:rank].sum(0)                    # members of each cluster held by lower ranks
    device = getattr(engine, "device", torch.device("cpu"))
    xt = host_points(x)
    order = np.argsort(labels, kind="stable")                # this rank's members of each cluster, in order
    starts = np.searchsorted(labels[order], np.arange(k_c + 1))
    d = x.shape[1]
    centroids = np.zeros((k, d), np.float32) if out is None else out
    lo = 0
    while lo < k_c:                                     # groups of clusters: at most group_centroids rows
        hi = lo + 1
        while hi < k_c and offsets[hi + 1] - offsets[lo] <= group_centroids:
            hi += 1
        g0, g1 = int(offsets[lo]), int(offsets[hi])
        # seeded initial sub-centroids: members of each cluster by global rank (the same draw everywhere)
        init = torch.zeros(g1 - g0, d, dtype=torch.float64)
        for c in range(lo, hi):
            s = int(sizes[c])
            if not s:
                continue
            pick = np.random.default_rng([seed, c]).choice(int(counts[c]), s, replace=False)
            own = (pick >= before[c]) & (pick < before[c] + per_rank[rank, c])
            members = order[starts[c]:starts[c + 1]]
            init[int(offsets[c]) - g0 + np.flatnonzero(own)] = xt[members[pick[own] - before[c]]].double()
        cent = engine.all_reduce(init).float().to(device)
        for _ in range(niter):
            sums = torch.zeros(g1 - g0, d, dtype=torch.float64, device=device)
            cnt = torch.zeros(g1 - g0, dtype=torch.int64, device=device)
            for c in range(lo, hi):
                members = order[starts[c]:starts[c + 1]]
                if not len(members) or not sizes[c]:
                    continue
                a, b = int(offsets[c]) - g0, int(offsets[c + 1]) - g0
                xm = xt[members]
                j = assign_torch(xm, cent[a:b])[0].to(device) + a
                sums.index_add_(0, j, xm.to(device).double())
                cnt += torch.bincount(j, minlength=g1 - g0)
            sums, cnt = engine.all_reduce(sums.cpu()), engine.all_reduce(cnt.cpu())
            keep = cnt > 0                                  # an empty sub-cluster keeps its centroid
            cent[keep.to(device)] = (sums[keep] / cnt[keep, None]).float().to(device)
        if write:
            centroids[g0:g1] = cent.cpu().numpy()
        lo = hi
    used = sizes > 0                                        # coarse clusters left empty get no label
    return centroids, coarse[used], np.concatenate([[0], np.cumsum(sizes[used])])


def split_assign(x: np.ndarray, coarse: np.ndarray, centroids: np.ndarray, offsets: np.ndarray,
                 engine) -> tuple[np.ndarray, np.ndarray]:
    """Labels and squared distances: the nearest sub-centroid within each point's coarse cluster."""
    coarse_labels, _ = engine.assign(x, coarse)
    xt = host_points(x)
    labels = np.empty(len(x), np.int64)
    dists = np.empty(len(x), np.float32)
    order = np.argsort(coarse_labels, kind="stable")
    starts = np.searchsorted(coarse_labels[order], np.arange(len(coarse) + 1))
    for c in np.flatnonzero(np.diff(starts)):
        members = order[starts[c]:starts[c + 1]]
        a, b = int(offsets[c]), int(offsets[c + 1])
        # a small copy per cluster: the table may be a read-only map of the level file
        j, m = assign_torch(xt[members], torch.from_numpy(np.array(centroids[a:b], dtype=np.float32)))
        labels[members] = j.numpy() + a
        dists[members] = m.numpy()
    return labels, dists
