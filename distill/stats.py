"""Bootstrap confidence intervals for benchmark metrics, and paired differences between two encoders.

A metric that is computed from evaluation items (images, captions, refs) is recomputed on resamples of
those items drawn with replacement; the 2.5th and 97.5th percentiles of the resampled metric are its
95 % interval (the percentile bootstrap). Every metric here is a function of *column sums* over items,
so a task hands over one row of numbers per item and a reducer name:

- ``mean``: one column (a hit, a 0/1 or any per-item score); metric = 100 * mean.
- ``class_recall``: 2 columns, [label, hit]; metric = 100 * mean over the classes present of
  hits / count (scikit-learn's balanced accuracy, the zero-shot ``mean_per_class_recall``). Kept
  compact (not one-hot) so 50,000 items of 1,000 classes stay small; summed per class sparsely.
- ``miou`` / ``aacc`` / ``macc``: 4C columns, mmseg's per-image areas [intersect | union | pred | label];
  metric as mmseg's IoUMetric computes it from the summed areas (classes with no union/label left out).

A resample is a row of counts (how often each of the N items was drawn in N draws with replacement);
column sums are then one matrix product. Resamples are seeded by (seed, number of items): two
encoders scored on the same items see the same resamples, which is what the paired bootstrap needs,
and a re-run gives the same interval. The cost is measured per result (`timings.bootstrap_s`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REDUCERS = ("mean", "class_recall", "miou", "aacc", "macc")
DEFAULTS = {"resamples": 1000, "confidence": 0.95, "seed": 0}


@dataclass
class ItemScores:
    """Per-item rows (N, F) and how a metric is computed from their column sums."""
    values: np.ndarray
    reduce: str = "mean"

    def __post_init__(self):
        v = np.asarray(self.values, dtype=np.float64)
        self.values = v[:, None] if v.ndim == 1 else v.reshape(v.shape[0], int(np.prod(v.shape[1:])))
        if self.reduce not in REDUCERS:
            raise ValueError(f"unknown reducer '{self.reduce}'; known: {', '.join(REDUCERS)}")
        width = self.values.shape[1]
        if self.reduce == "mean" and width != 1:
            raise ValueError(f"'mean' takes one value per item, got {width}")
        if self.reduce == "class_recall" and width != 2:
            raise ValueError("'class_recall' takes [label, hit] rows (2 columns)")
        if self.reduce in ("miou", "aacc", "macc") and width % 4:
            raise ValueError(f"'{self.reduce}' takes [intersect | union | pred | label] area rows (4C columns)")

    def __len__(self) -> int:
        return len(self.values)

    def metric(self) -> float:
        """The metric on all items (equal to what the task reported)."""
        return float(self.resampled(np.ones((1, len(self))))[0])

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        """(B, N) draw counts -> (B,) metric values (percent) of the B resamples."""
        return reduce_sums(self.column_sums(counts), len(self), self.reduce)

    def column_sums(self, counts: np.ndarray) -> np.ndarray:
        if self.reduce != "class_recall":
            return counts @ self.values
        from scipy import sparse
        label = self.values[:, 0].astype(np.int64)
        c, rows = int(label.max()) + 1 if len(label) else 1, np.arange(len(label))
        onehot = sparse.csr_matrix((np.ones(len(label)), (rows, label)), shape=(len(label), c))
        hits = sparse.csr_matrix((self.values[:, 1], (rows, label)), shape=(len(label), c))
        return np.hstack([(hits.T @ counts.T).T, (onehot.T @ counts.T).T])


def reduce_sums(sums: np.ndarray, n: int, reduce: str) -> np.ndarray:
    """(B, F) column sums of B resamples of n items -> (B,) metric values (percent); class_recall sums
    are [hits per class | items per class]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduce == "mean":
            return 100.0 * sums[:, 0] / n
        if reduce == "class_recall":
            c = sums.shape[1] // 2
            hits, count = sums[:, :c], sums[:, c:]
            return 100.0 * np.nanmean(np.where(count > 0, hits / count, np.nan), axis=1)
        c = sums.shape[1] // 4
        inter, union, _pred, label = (sums[:, i * c:(i + 1) * c] for i in range(4))
        if reduce == "miou":
            return 100.0 * np.nanmean(np.where(union > 0, inter / union, np.nan), axis=1)
        if reduce == "macc":
            return 100.0 * np.nanmean(np.where(label > 0, inter / label, np.nan), axis=1)
        return 100.0 * inter.sum(1) / label.sum(1)   # aacc


def resample_counts(n: int, resamples: int, seed: int, chunk: int = 100):
    """Yields (b, n) count matrices, `resamples` rows in all, fixed by (seed, n): row r counts how often
    each item was drawn in n uniform draws with replacement."""
    rng = np.random.default_rng([seed, n])
    left = resamples
    while left > 0:
        b = min(chunk, left)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        left -= b


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return math.nan, math.nan
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap: resamples must be >= 1 and 0 < confidence < 1 "
                         f"(got {resamples}, {confidence})")


def bootstrap_interval(items: ItemScores, resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the metric over the items (percent)."""
    _check(resamples, confidence)
    n = len(items)
    if n == 0:
        return math.nan, math.nan
    samples = np.concatenate([items.resampled(counts) for counts in resample_counts(n, resamples, seed)])
    return _percentiles(samples, confidence)


def paired_difference(a: ItemScores, b: ItemScores, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """Metric(a) - metric(b) on the same items, with the interval of the difference over shared resamples."""
    _check(resamples, confidence)
    if len(a) != len(b) or a.reduce != b.reduce or (a.reduce != "class_recall" and a.values.shape[1] != b.values.shape[1]):
        raise ValueError(f"paired bootstrap needs scores of the same items and metric: {len(a)} vs {len(b)} "
                         f"items, '{a.reduce}' vs '{b.reduce}'")
    n = len(a)
    diffs = np.concatenate([a.resampled(counts) - b.resampled(counts) for counts in resample_counts(n, resamples, seed)])
    lo, hi = _percentiles(diffs, confidence)
    return {"difference": a.metric() - b.metric(), "low": lo, "high": hi, "items": n,
            "resamples": resamples, "confidence": confidence}


def seeded_difference(a: list[ItemScores], b: list[ItemScores], resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """Mean over training seeds of metric(a_s) - metric(b_s), on the same items, with a hierarchical
    bootstrap interval that covers training noise as well as item noise.

    `a[s]` and `b[s]` are the two arms trained with seed s (paired: the same seed gives both arms the
    same data order and init draws). A side with one entry (a teacher, trained once) is paired with
    every seed of the other. Each resample draws the seeds with replacement and, independently, the
    items (the same item draws for every seed, as in `paired_difference`); its value is the mean of the
    drawn seeds' differences on the drawn items. With one seed this is `paired_difference`, draw for
    draw. With few seeds (3) the seed draw under-covers (the bootstrap of a mean of 3 values is
    narrower than a t interval), which is why the per-seed spread is reported beside it."""
    _check(resamples, confidence)
    if not a or not b or (len(a) > 1 and len(b) > 1 and len(a) != len(b)):
        raise ValueError(f"seeded difference needs one or S seeds on each side, got {len(a)} and {len(b)}")
    s = max(len(a), len(b))
    a, b = (a * s if len(a) == 1 else a), (b * s if len(b) == 1 else b)
    n = len(a[0])
    for x, y in zip(a, b):
        if len(x) != n or len(y) != n or x.reduce != y.reduce:
            raise ValueError(f"seeded difference needs scores of the same {n} items and metric on every seed")
    per_seed = np.array([x.metric() - y.metric() for x, y in zip(a, b)])
    seed_rng = np.random.default_rng([seed, n, s])
    diffs = []
    for counts in resample_counts(n, resamples, seed):
        d = np.stack([x.resampled(counts) - y.resampled(counts) for x, y in zip(a, b)], axis=1)   # (B, S)
        if s == 1:
            diffs.append(d[:, 0])
            continue
        picks = seed_rng.integers(0, s, size=(len(d), s))
        diffs.append(np.take_along_axis(d, picks, axis=1).mean(axis=1))
    lo, hi = _percentiles(np.concatenate(diffs), confidence)
    return {"difference": float(per_seed.mean()), "low": lo, "high": hi, "items": n, "seeds": s,
            "per_seed": [float(v) for v in per_seed], "seed_sd": float(per_seed.std(ddof=1)) if s > 1 else 0.0,
            "resamples": resamples, "confidence": confidence}


# ---------------------------------------------------------------- per-item rows the tasks build

def hits(correct) -> ItemScores:
    return ItemScores(np.asarray(correct, dtype=np.float64).reshape(-1, 1), "mean")


def class_recall_rows(pred, targets) -> ItemScores:
    pred, targets = np.asarray(pred).astype(int), np.asarray(targets).astype(int)
    return ItemScores(np.stack([targets, (pred == targets)], axis=1).astype(np.float64), "class_recall")


def metric_intervals(metrics: dict[str, float], items: dict[str, ItemScores], resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """The `intervals` block of a result: an interval for every metric with per-item scores, and for
    every other metric the reason it has none (it is reported without one, never dropped). Metrics
    over the same number of items share one set of resamples (drawn once: the costly part)."""
    _check(resamples, confidence)
    out: dict = {"method": "percentile bootstrap over evaluation items", "resamples": resamples,
                 "confidence": confidence, "seed": seed, "metrics": {}, "missing": {}}
    by_size: dict[int, list[str]] = {}
    for name, value in metrics.items():
        scores = items.get(name)
        if not math.isfinite(value):
            out["missing"][name] = "the metric is undefined here (NaN)"
        elif scores is None:
            out["missing"][name] = "the task gives no per-item scores for it (not an average over items)"
        elif len(scores) < 2:
            out["missing"][name] = f"{len(scores)} item(s): too few to resample"
        elif not abs(scores.metric() - value) <= 1e-3:   # percent; float32 means differ in the 6th digit
            # per-item rows that do not reproduce the reported number would give a wrong interval
            out["missing"][name] = f"its per-item scores give {scores.metric():.4f}, not the reported {value:.4f}"
        else:
            by_size.setdefault(len(scores), []).append(name)
    for n, names in by_size.items():
        samples: dict[str, list] = {name: [] for name in names}
        failed: dict[str, str] = {}
        for counts in resample_counts(n, resamples, seed):
            for name in names:
                if name in failed:
                    continue
                try:
                    samples[name].append(items[name].resampled(counts))
                except Exception as e:   # an interval that cannot be computed must not cost the cell its numbers
                    failed[name] = f"bootstrap failed: {type(e).__name__}: {e}"
        out["missing"].update(failed)
        for name in names:
            if name not in failed:
                out["metrics"][name] = list(_percentiles(np.concatenate(samples[name]), confidence))
    return out
