"""`amoe curate plan CONFIG --world-size N --points N --dim D`: per-rank memory of each clustering level.

Counted from what `run_hierarchy` and the torch k-means engine allocate (points in the config's
`point_dtype`, float32 centroids, float64 centroid sums, int64 labels and float32 distances), for the
`torch` engine across N ranks on accelerators; sizes are exact array sizes, so the plan scales to any
configuration without running it.
- device, per level: the blocks of points in flight (points stay on the host), the centroids (current
  and next), the float64 sums and their counts, one distance block; a split level (`n_splits` > 1)
  holds the coarse tables and one group of sub-clusters at a time.
- host, per rank: its slice of the points, the fit-first order (with `fit_points`), its embedding row
  ids, its labels and distances (twice while put back in row order), the sort a split level does, the
  float64 sums copied for the all-reduce, the engine's centroid tables and initial draw, the cluster
  sizes; and its share of the page cache of the level file (the (k, d) centroid table, read back
  memory-mapped once per node, so a node's ranks share it; each rank writes its own rows with
  pwrite, fsynced).
No rank holds the labels of all points: each writes its rows of the level file.
`per_rank_peak_bytes` is the largest level's device total; `host_per_rank_peak_bytes` the host's.
"""
from __future__ import annotations

import numpy as np

from distill.curation.hierarchy import ClusterConfig
from distill.curation.kmeans import DISTANCE_BLOCK, SUM_BLOCK
from distill.curation.split import GROUP_CENTROIDS

GiB = 2 ** 30


def plan_levels(cfg: ClusterConfig, world_size: int, points: int, dim: int, device_gib: float = 80.0,
                host_gib_per_rank: float = 128.0, ranks_per_node: int = 8) -> dict:
    if world_size < 1 or points < 1 or dim < 1 or ranks_per_node < 1:
        raise ValueError("--world-size, --points, --dim and --ranks-per-node must be >= 1")
    N, d = world_size, dim
    sharing = min(N, ranks_per_node)                # ranks that share one node's page cache
    point_bytes = np.dtype(cfg.point_dtype).itemsize
    levels, n_in = [], points
    for i, lv in enumerate(cfg.levels, 1):
        local = -(-n_in // N)                                   # this rank's slice of the level's input
        subsampled = i == 1 and cfg.fit_points is not None and cfg.fit_points < n_in
        fit = -(-cfg.fit_points // N) if subsampled else local
        k = lv.k
        table = -(-k // lv.n_splits)         # a split level's engine k-means runs at the coarse k
        rows = min(local, DISTANCE_BLOCK // max(table, 1))      # rows of one distance block
        # a block of points cast to float32 and one of the sums' float64 rows; the distance block and the
        # two temporaries of its expression (|x|^2 - 2 x c^T + |c|^2)
        device = {"point_blocks": (rows * 4 + min(local, SUM_BLOCK) * 8) * d, "centroids": 2 * table * d * 4,
                  "sums_float64": table * d * 8, "counts": 2 * table * 8, "distance_block": 3 * rows * table * 4,
                  "fit_labels": fit * 8}
        host = {"points_slice": local * d * point_bytes,
                "labels_and_distances": local * 12 * (2 if subsampled else 1),
                "fit_labels_and_distances": fit * 12,
                # the engine's current and next centroids, and the float64 draw of its initial rows
                "engine_centroids": 2 * table * d * 4, "initial_rows": table * d * 12,
                "sums_for_all_reduce": table * d * 8, "cluster_sizes": 2 * k * 8,
                "level_file_pages": k * d * 4 // sharing}
        if i == 1:
            host["embedding_rows"] = local * 8
            host["load_ids"] = local * 8            # this rank's row ids while its points load
        if subsampled:
            host["fit_first_order"] = local * 8
        if lv.n_splits > 1:   # one group of sub-clusters at a time: float64 sums and init, float32 centroids
            group = min(k, GROUP_CENTROIDS)
            device["split_group"] = group * d * (8 + 4) + group * 8
            host["split_group_all_reduce"] = group * d * 8 * 2
            host["split_sort"] = local * 20          # coarse labels and distances, and their argsort
            host["member_counts"] = N * table * 8
        dev, hst = sum(device.values()), sum(host.values())
        levels.append({"level": i, "k": k, "n_in": n_in, "points_per_rank": local, "fit_points_per_rank": fit,
                       "device_bytes": device, "device_total_bytes": dev, "host_bytes": host,
                       "host_total_bytes": hst, "fits_device": dev <= device_gib * GiB,
                       "fits_host": hst <= host_gib_per_rank * GiB})
        n_in = k
    peak = max(lv["device_total_bytes"] for lv in levels)
    host_peak = max(lv["host_total_bytes"] for lv in levels)
    return {"config": cfg.name, "engine": "torch", "world_size": N, "ranks_per_node": sharing, "points": points,
            "dim": d, "point_dtype": cfg.point_dtype,
            "levels": levels, "per_rank_peak_bytes": int(peak), "host_per_rank_peak_bytes": int(host_peak),
            "device_budget_bytes": int(device_gib * GiB), "device_headroom_bytes": int(device_gib * GiB - peak),
            "host_budget_bytes": int(host_gib_per_rank * GiB),
            "host_headroom_bytes": int(host_gib_per_rank * GiB - host_peak),
            "fits_device": peak <= device_gib * GiB, "fits_host": host_peak <= host_gib_per_rank * GiB,
            "advice": []}


def advice(plan: dict) -> list[str]:
    """Which level overflows where, by how much, its largest terms, and what to change."""
    out = []
    for lv in plan["levels"]:
        for side, budget in (("device", plan["device_budget_bytes"]), ("host", plan["host_budget_bytes"])):
            if lv[f"fits_{side}"]:
                continue
            terms = sorted(lv[f"{side}_bytes"].items(), key=lambda kv: -kv[1])[:3]
            out.append(f"level {lv['level']} {side} overflows by {(lv[f'{side}_total_bytes'] - budget) / GiB:.1f} GiB "
                       f"per rank; largest: " + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in terms))
    if out:
        out.append("more ranks (--world-size) shrink the point slices; \"point_dtype\": \"float16\" halves "
                   "them; n_splits on a large-k level keeps its k-means tables at k / n_splits")
    return out


def format_plan(plan: dict) -> str:
    g = lambda v: f"{v / GiB:10.1f} GiB"  # noqa: E731
    out = [f"curation memory plan: {plan['config']} on {plan['world_size']} ranks, {plan['points']:,} points of "
           f"dim {plan['dim']}"]
    for lv in plan["levels"]:
        out.append(f"level {lv['level']}: k={lv['k']:,}  n_in={lv['n_in']:,}  device {g(lv['device_total_bytes'])}"
                   f"{'' if lv['fits_device'] else ' (DOES NOT FIT)'}  host {g(lv['host_total_bytes'])}"
                   f"{'' if lv['fits_host'] else ' (DOES NOT FIT)'}")
        biggest = max(lv["device_bytes"].items(), key=lambda kv: kv[1])
        out.append(f"  largest on the device: {biggest[0]} {g(biggest[1]).strip()}")
    out.append(f"points held as {plan['point_dtype']}; level files shared by {plan['ranks_per_node']} ranks per node")
    out.append(f"peak per rank: device {g(plan['per_rank_peak_bytes']).strip()} of "
               f"{g(plan['device_budget_bytes']).strip()}, host {g(plan['host_per_rank_peak_bytes']).strip()} of "
               f"{g(plan['host_budget_bytes']).strip()}: "
               + ("fits" if plan["fits_device"] and plan["fits_host"] else "DOES NOT FIT"))
    return "\n".join(out)
