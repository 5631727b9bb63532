"""`amoe curate plan CONFIG --world-size N --points N --dim D`: per-rank memory of each clustering level.

Counted from what `run_hierarchy` and the torch k-means engine allocate today (float32 points, float32
centroids, float64 centroid sums, int64 labels and float32 distances), for the `torch` engine across
N ranks on accelerators; sizes are exact array sizes, so the plan scales to any configuration without
running it. Per level, device: the blocks of points in flight (points stay on the host), the centroids (current
and next), the float64 sums and their counts, and one distance block; host: this rank's slice of the
points (float32), the fit subsample's copy, this rank's labels and distances, the
float64 sums copied to the host for the all-reduce, and the labels and distances of *all* points,
which every rank gathers after each level. A split level (`n_splits` > 1) holds the coarse tables on
the device, one group of sub-clusters at a time, and the final (k, d) table on the host.
`per_rank_peak_bytes` is the largest level's device total.
"""
from __future__ import annotations

from distill.curation.hierarchy import ClusterConfig
from distill.curation.kmeans import DISTANCE_BLOCK, SUM_BLOCK
from distill.curation.split import GROUP_CENTROIDS

GiB = 2 ** 30


def plan_levels(cfg: ClusterConfig, world_size: int, points: int, dim: int, device_gib: float = 80.0,
                host_gib_per_rank: float = 128.0) -> dict:
    if world_size < 1 or points < 1 or dim < 1:
        raise ValueError("--world-size, --points and --dim must be >= 1")
    N, d = world_size, dim
    levels, n_in = [], points
    for i, lv in enumerate(cfg.levels, 1):
        local = -(-n_in // N)                                   # this rank's slice of the level's input
        fit = local if i > 1 or not cfg.fit_points or cfg.fit_points >= n_in else -(-cfg.fit_points // N)
        k = lv.k
        table = -(-k // lv.n_splits)         # a split level's engine k-means runs at the coarse k
        device = {"point_blocks": (DISTANCE_BLOCK // max(table, 1) + SUM_BLOCK) * d * 12, "centroids": 2 * table * d * 4, "sums_float64": table * d * 8,
                  "counts": 2 * table * 8, "distance_block": DISTANCE_BLOCK * 4}
        host = {"points_slice": local * d * 4, "fit_copy": fit * d * 4 if fit != local else 0,
                "labels_and_distances": local * 12,
                "sums_for_all_reduce": table * d * 8, "gathered_labels_and_distances": n_in * 12}
        if lv.n_splits > 1:   # one group of sub-clusters at a time: float64 sums and init, float32 centroids
            group = min(k, GROUP_CENTROIDS)
            device["split_group"] = group * d * (8 + 4) + group * 8
            host["split_group_all_reduce"] = group * d * 8 * 2
            host["centroid_table"] = k * d * 4
        dev, hst = sum(device.values()), sum(host.values())
        levels.append({"level": i, "k": k, "n_in": n_in, "points_per_rank": local, "fit_points_per_rank": fit,
                       "device_bytes": device, "device_total_bytes": dev, "host_bytes": host,
                       "host_total_bytes": hst, "fits_device": dev <= device_gib * GiB,
                       "fits_host": hst <= host_gib_per_rank * GiB})
        n_in = k
    peak = max(lv["device_total_bytes"] for lv in levels)
    host_peak = max(lv["host_total_bytes"] for lv in levels)
    return {"config": cfg.name, "engine": "torch", "world_size": N, "points": points, "dim": d,
            "levels": levels, "per_rank_peak_bytes": int(peak), "host_per_rank_peak_bytes": int(host_peak),
            "device_budget_bytes": int(device_gib * GiB), "device_headroom_bytes": int(device_gib * GiB - peak),
            "host_budget_bytes": int(host_gib_per_rank * GiB),
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
        out.append("more ranks (--world-size) shrink the point slices; a lower fit_points shrinks the fit copy; "
                   "n_splits on a large-k level keeps its k-means tables at k / n_splits")
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
    out.append(f"peak per rank: device {g(plan['per_rank_peak_bytes']).strip()} of "
               f"{g(plan['device_budget_bytes']).strip()}, host {g(plan['host_per_rank_peak_bytes']).strip()} of "
               f"{g(plan['host_budget_bytes']).strip()}: "
               + ("fits" if plan["fits_device"] and plan["fits_host"] else "DOES NOT FIT"))
    return "\n".join(out)
