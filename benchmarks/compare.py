"""Paired comparisons: is encoder A better than encoder B on the same evaluation items?

Two results of the same (task, dataset, resolution, limit, settings) cell scored the same items, so
their difference gets a paired bootstrap interval (distill.stats.paired_difference): each resample
draws the same items for both, which cancels the items' own difficulty and gives a much tighter
interval than two separate intervals would. `amoe leaderboard compare` prints these as JSON.
"""
from __future__ import annotations

from distill import stats
from distill.errors import AmoeError
from distill.results import read_items


class CompareError(AmoeError, ValueError):
    """Two results that cannot be compared item by item; the message says why."""


def same_items(a: dict, b: dict) -> None:
    """Refuse two results that may not have scored the same items: another cell, or other data (by the
    dataset fingerprint, which every harness and grounding result records)."""
    ca, cb = a["cell"], b["cell"]
    differ = [k for k in ("task", "dataset", "resolution", "limit", "settings") if ca.get(k) != cb.get(k)]
    if differ:
        raise CompareError(f"{ca['model']} and {cb['model']} were not run on the same cell (they differ in "
                           f"{', '.join(differ)}); compare results of one task, dataset and settings")
    fa, fb = a["dataset"].get("fingerprint"), b["dataset"].get("fingerprint")
    if not (fa and fb):
        raise CompareError(f"{ca['dataset']}: a result without a dataset fingerprint cannot be paired (written by "
                           "an older amoe); re-run its cell")
    if fa != fb:
        raise CompareError(f"{ca['model']} and {cb['model']} read different files for {ca['dataset']} "
                           f"(dataset fingerprints {fa} vs {fb}); re-run both on the same data")


def paired_metrics(a: dict, b: dict, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """{metric: paired difference a - b} for every metric both results have per-item scores for;
    metrics without them are listed under "missing" with the reason."""
    same_items(a, b)
    items_a, items_b = read_items(a), read_items(b)
    out: dict = {"a": a["cell"]["model"], "b": b["cell"]["model"], "task": a["cell"]["task"],
                 "dataset": a["cell"]["dataset"], "metrics": {}, "missing": {}}
    for metric in sorted(set(a["metrics"]) & set(b["metrics"])):
        if metric in items_a and metric in items_b:
            out["metrics"][metric] = stats.paired_difference(items_a[metric], items_b[metric], resamples,
                                                             confidence, seed)
        else:
            who = [m for m, items in ((out["a"], items_a), (out["b"], items_b)) if metric not in items]
            out["missing"][metric] = f"no per-item scores in the result of {', '.join(who)}"
    return out


def compare(records: list[dict], model_a: str, model_b: str, task: str | None = None,
            dataset: str | None = None, **bootstrap) -> list[dict]:
    """Paired differences for every cell the two models share (optionally one task / dataset)."""
    def cells(model):
        return {(r["cell"]["task"], r["cell"]["dataset"], r["cell"]["resolution"], r["cell"]["limit"],
                 r["cell"]["settings"]): r for r in records
                if r["status"] == "ok" and r["cell"]["model"] == model
                and (task is None or r["cell"]["task"] == task) and (dataset is None or r["cell"]["dataset"] == dataset)}
    ca, cb = cells(model_a), cells(model_b)
    for model, found in ((model_a, ca), (model_b, cb)):
        if not found:
            known = sorted({r["cell"]["model"] for r in records})
            raise CompareError(f"no ok result of model '{model}' matches; models in the results: {', '.join(known)}")
    shared = sorted(set(ca) & set(cb), key=str)
    if not shared:
        raise CompareError(f"'{model_a}' and '{model_b}' share no cell (same task, dataset, resolution, limit "
                           "and settings)")
    return [paired_metrics(ca[k], cb[k], **bootstrap) for k in shared]
