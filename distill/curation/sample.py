"""Balanced hierarchical sampling (top-down water-filling) and the parquet manifest it writes.

The tree: the root's children are the top-level clusters; a level-l cluster's children are the level-(l-1)
clusters assigned to it; a level-1 cluster's children are points. At every node the budget is split as
evenly as possible among the children; a child smaller than its share takes all it has and the surplus is
shared among the others (water-filling). At the leaves the points are the ones closest to the centroid,
or a seeded random subset.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distill.io import atomic_path, write_json_atomic

STRATEGIES = ("closest", "random")


def water_fill(budget: int, sizes) -> np.ndarray:
    """Split `budget` among children of the given sizes: as even as possible, capped by each size.

    The integer remainder goes one unit each to the largest uncapped children (ties: lower index), so the
    result is deterministic. Raises if the budget exceeds the total size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if budget > total:
        raise ValueError(f"budget {budget} exceeds the {total} items available")
    take = np.zeros(len(sizes), dtype=np.int64)
    if budget <= 0 or len(sizes) == 0:
        return take
    order = np.argsort(sizes, kind="stable")          # smallest first
    remaining, left = int(budget), len(sizes)
    for pos, child in enumerate(order):
        share = remaining // left
        if sizes[child] <= share:
            take[child] = sizes[child]
            remaining -= int(sizes[child])
            left -= 1
            continue
        # every child from here on is larger than the even share: give each `share`, then the remainder
        rest = order[pos:]
        take[rest] = share
        extra = remaining - share * len(rest)
        if extra:
            # largest first, ties broken by lower index
            by_size = sorted(rest.tolist(), key=lambda c: (-sizes[c], c))
            take[by_size[:extra]] += 1
        break
    return take


def _children(parent_of: np.ndarray, n_parents: int) -> list[np.ndarray]:
    order = np.argsort(parent_of, kind="stable")
    bounds = np.searchsorted(parent_of[order], np.arange(n_parents + 1))
    return [order[bounds[p]:bounds[p + 1]] for p in range(n_parents)]


def hierarchical_sample(assignments: list[np.ndarray], distances: np.ndarray, target: int,
                        strategy: str = "random", seed: int = 0) -> np.ndarray:
    """Indices of the chosen level-1 points, sorted.

    assignments[0]: level-1 cluster of every point; assignments[l]: level-(l+1) cluster of every level-l
    centroid. distances: each point's distance to its level-1 centroid (used by 'closest')."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown leaf strategy {strategy!r}; choose one of {STRATEGIES}")
    n_points = len(assignments[0])
    if target < 0 or target > n_points:
        raise ValueError(f"target {target} must be between 0 and the {n_points} clustered points")
    # sizes of every node, bottom-up: points per level-1 cluster, then summed up the tree
    n_nodes = [int(assignments[l].max()) + 1 if len(assignments[l]) else 0 for l in range(len(assignments))]
    for l in range(1, len(assignments)):
        n_nodes[l - 1] = max(n_nodes[l - 1], len(assignments[l]))
    sizes = [np.bincount(assignments[0], minlength=n_nodes[0]).astype(np.int64)]
    for l in range(1, len(assignments)):
        sizes.append(np.bincount(assignments[l], weights=sizes[-1], minlength=n_nodes[l]).astype(np.int64))
    # top-down: the root splits the target among the top-level clusters, each node among its children
    budget = water_fill(target, sizes[-1])
    for l in range(len(assignments) - 1, 0, -1):
        child_budget = np.zeros(len(sizes[l - 1]), dtype=np.int64)
        for parent, kids in enumerate(_children(assignments[l], len(sizes[l]))):
            if budget[parent]:
                child_budget[kids] = water_fill(int(budget[parent]), sizes[l - 1][kids])
        budget = child_budget
    # leaves, vectorised over all level-1 clusters (there are millions at paper scale): order the points
    # by (cluster, key) and keep each cluster's first `budget` -- key = distance for 'closest', a uniform
    # random number for 'random' (the first b of a random order are a uniform random subset)
    a = assignments[0]
    key = distances if strategy == "closest" else np.random.default_rng(seed).random(n_points)
    order = np.lexsort((np.arange(n_points), key, a))
    a_sorted = a[order]
    starts = np.searchsorted(a_sorted, np.arange(len(sizes[0])))
    rank_in_cluster = np.arange(n_points) - starts[a_sorted]
    return np.sort(order[rank_in_cluster < budget[a_sorted]])


def cluster_paths(assignments: list[np.ndarray], points: np.ndarray) -> np.ndarray:
    """(len(points), levels) cluster id of each point at every level (level 1 first)."""
    cols = [assignments[0][points]]
    for l in range(1, len(assignments)):
        cols.append(assignments[l][cols[-1]])
    return np.stack(cols, 1)


def sample_manifest(clusters: str | os.PathLike, target: int, out: str | os.PathLike,
                    strategy: str = "random", seed: int = 0):
    """`amoe curate sample`: a saved hierarchy -> a parquet manifest of `target` samples.

    Columns: key, shard, row (embedding row), level_1..level_L (cluster path), distance (to the level-1
    centroid). A JSON sidecar (<out>.json) records how it was made."""
    import pandas as pd

    from distill.curation.embed import EmbeddingSet
    from distill.curation.hierarchy import load_hierarchy

    h = load_hierarchy(clusters)
    assignments = [l.assignments for l in h.levels]
    points = hierarchical_sample(assignments, h.levels[0].distances, target, strategy, seed)
    paths = cluster_paths(assignments, points)
    emb = EmbeddingSet(h.meta["source"]["embeddings"])
    rows = h.rows[points]
    idx = emb.index.set_index("row").loc[rows]
    df = pd.DataFrame({"key": idx["key"].to_numpy(), "shard": idx["shard"].to_numpy(), "row": rows})
    for l in range(paths.shape[1]):
        df[f"level_{l + 1}"] = paths[:, l].astype(np.int64)
    df["distance"] = h.levels[0].distances[points].astype(np.float32)
    out = Path(out)
    with atomic_path(out) as tmp:
        df.to_parquet(tmp, index=False)
    write_json_atomic(out.with_suffix(out.suffix + ".json"), {
        "clusters": _relative_to(clusters, out), "target": int(target), "strategy": strategy, "seed": seed,
        "samples": int(len(df)), "shards": int(df["shard"].nunique()),
        "top_level_clusters_used": int(df[f"level_{paths.shape[1]}"].nunique()),
        "level1_clusters_used": int(df["level_1"].nunique())})
    return df


def _relative_to(path, manifest) -> str:
    """`path` relative to the manifest's folder: a sidecar names its inputs without this machine's paths."""
    return os.path.relpath(Path(path).resolve(), Path(manifest).resolve().parent)


def random_manifest(embeddings: str | os.PathLike, target: int, out: str | os.PathLike, seed: int = 0):
    """The baseline of the curation ablation: `target` samples drawn uniformly from the embedded pool.

    Same columns as `sample_manifest` needs for training (key, shard, row), so the two manifests are
    interchangeable in a recipe's `data.sources[i].manifest`."""
    import pandas as pd

    from distill.curation.embed import EmbeddingSet

    index = EmbeddingSet(embeddings).index
    valid = index[index["valid"]] if "valid" in index.columns else index
    if target > len(valid):
        raise ValueError(f"random manifest: target {target} exceeds the {len(valid)} embedded samples")
    picked = valid.sample(n=int(target), random_state=seed).sort_values("row")
    df = pd.DataFrame({"key": picked["key"].to_numpy(), "shard": picked["shard"].to_numpy(),
                       "row": picked["row"].to_numpy()})
    out = Path(out)
    with atomic_path(out) as tmp:
        df.to_parquet(tmp, index=False)
    write_json_atomic(out.with_suffix(out.suffix + ".json"), {
        "embeddings": _relative_to(embeddings, out), "target": int(target), "strategy": "uniform-random",
        "seed": seed, "samples": int(len(df)), "shards": int(df["shard"].nunique())})
    return df
