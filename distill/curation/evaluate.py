"""Does curation balance concepts? Score a manifest against the pool's ground-truth concept ids.

The mini-world pool writes ``metadata["concepts"]`` (concept ids present in each image) into every
sample's ``.json`` member, drawn from a long-tailed (Zipf) distribution. For a set of samples we count
concept occurrences (one per image that shows the concept) and report

- ``entropy``: normalised Shannon entropy of those counts (1 = every pool concept equally often),
- ``covered``: concepts seen at least once, and ``covered_min5``: seen at least 5 times,
- ``tail_share``: share of occurrences that belong to the tail concepts (the rarer half of the pool's
  concepts by image count; the head half holds most of the pool),
- ``max_over_median``: how much more often the most frequent concept appears than the median one.

A curated manifest is compared with random samples of the same size from the same samples (several
seeds; mean and standard deviation).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def pool_concepts(pool: str | os.PathLike) -> dict[tuple[str, str], list[int]]:
    """(shard name, key) -> concept ids, read from the ``.json`` members (images are not decoded)."""
    from distill.data.pool import resolve_shards, sample_key, tar_members

    out: dict[tuple[str, str], list[int]] = {}
    for shard in resolve_shards(pool):
        name = Path(shard).name
        for m, data in tar_members(shard, (".json",)):
            meta = json.loads(data)
            if "concepts" in meta:
                out[(name, sample_key(m.name))] = [int(c) for c in meta["concepts"]]
    if not out:
        raise ValueError(f"no sample of {pool} has metadata['concepts']; concept scores need ground-truth "
                         f"concept ids (the mini-world pool has them: amoe world make)")
    return out


def concept_stats(samples: list[list[int]], n_concepts: int, tail: np.ndarray) -> dict:
    counts = np.zeros(n_concepts, dtype=np.int64)
    for cs in samples:
        counts[cs] += 1
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum() / np.log(n_concepts)) if n_concepts > 1 else 0.0
    med = float(np.median(counts))
    return {"images": len(samples), "entropy": round(entropy, 4), "covered": int((counts > 0).sum()),
            "covered_min5": int((counts >= 5).sum()),
            "tail_share": round(float(counts[tail].sum() / max(total, 1)), 4),
            "max_over_median": round(float(counts.max() / med), 2) if med > 0 else None}


def _mean_std(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if r[k] is not None]
        if vals:
            out[k] = round(float(np.mean(vals)), 4)
            out[k + "_std"] = round(float(np.std(vals)), 4)
    return out


def evaluate_manifest(manifest: str | os.PathLike, pool: str | os.PathLike, seeds: int = 5,
                      universe: list[tuple[str, str]] | None = None) -> dict:
    """Concept scores of a manifest vs random samples of equal size (drawn from `universe`, default: every
    pool sample with concepts) and vs the whole pool."""
    from distill.curation.manifest import read_manifest

    concepts = pool_concepts(pool)
    ids = list(concepts) if universe is None else [tuple(u) for u in universe]
    df = read_manifest(manifest)
    chosen = list(zip(df["shard"].astype(str), df["key"].astype(str)))
    unknown = [c for c in chosen if c not in concepts]
    if unknown:
        raise ValueError(f"{len(unknown)} manifest sample(s) have no concept metadata in {pool}: {unknown[:5]}")
    n_concepts = 1 + max(max(cs) for cs in concepts.values() if cs)
    # tail = the rarer half of the concepts present in the pool, by the number of images showing them
    freq = np.zeros(n_concepts, dtype=np.int64)
    for cs in concepts.values():
        freq[cs] += 1
    present = np.nonzero(freq)[0]
    ranked = present[np.argsort(-freq[present], kind="stable")]
    tail = np.zeros(n_concepts, dtype=bool)
    tail[ranked[len(ranked) // 2:]] = True
    curated = concept_stats([concepts[c] for c in chosen], n_concepts, tail)
    rng = np.random.default_rng(0)
    randoms = []
    for _ in range(seeds):
        pick = rng.choice(len(ids), size=len(chosen), replace=False)
        randoms.append(concept_stats([concepts[ids[i]] for i in pick], n_concepts, tail))
    return {"manifest": str(manifest), "pool": str(pool), "concepts_in_pool": int(len(present)),
            "tail_concepts": int(tail.sum()), "pool_images": len(concepts),
            "curated": curated, "random": _mean_std(randoms), "random_seeds": seeds,
            "whole_pool": concept_stats(list(concepts.values()), n_concepts, tail)}


def write_concept_embeddings(pool: str | os.PathLike, out_dir: str | os.PathLike, noise: float = 0.05,
                             seed: int = 0) -> Path:
    """An embeddings directory whose vectors are the samples' ground-truth concept multi-hots (+ Gaussian
    noise, so ties do not decide the clustering): the upper bound any encoder can give the curation, which
    separates the clustering/sampling algorithm from the encoder's quality. Same layout as `embed_pool`."""
    from distill.curation.embed import finalize, pool_units, unit_keys
    from distill.io import atomic_path, write_json_atomic

    out = Path(out_dir)
    concepts = pool_concepts(pool)
    n_concepts = 1 + max(max(cs) for cs in concepts.values() if cs)
    write_json_atomic(out / "settings.json", {"encoder": f"oracle-concepts-{n_concepts}", "head": "concepts",
                                              "resolution": None, "preprocess": {"noise": noise, "seed": seed}})
    rng = np.random.default_rng(seed)
    units = pool_units(pool)
    for unit in units:
        keys = unit_keys(unit)
        x = noise * rng.standard_normal((len(keys), n_concepts)).astype(np.float32)
        valid = [(unit.shard, k) in concepts for k in keys]
        for i, k in enumerate(keys):
            x[i, concepts.get((unit.shard, k), [])] += 1.0
        with atomic_path(out / "units" / f"{unit.name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, x)
        write_json_atomic(out / "units" / f"{unit.name}.done.json", {
            "unit": unit.name, "shard": unit.shard, "path": unit.path, "rows": len(keys), "dim": n_concepts,
            "keys": keys, "valid": valid, "corrupt": int(len(keys) - sum(valid))})
    finalize(out, units)
    return out
