"""Bootstrap intervals (distill.stats) and their path through the harness, the leaderboard and the
paired comparison: checked against hand computations, a known-coverage simulation, mmseg's and the
tasks' own metric code, and a real sweep over the scikit-learn digits in standard layouts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.compare import CompareError, compare
from benchmarks.leaderboard import build
from benchmarks.sweep import run_sweep
from benchmarks.tasks.metrics import mean_per_class_recall
from distill.seg_metrics import metrics_from_areas
from distill import stats
from distill.results import load_results, read_items

from test_trustworthy_numbers import digits_root, harness, pixel_encoder, suite_file  # noqa: F401 (fixture)


def _hand_percentiles(samples: list[float], confidence: float = 0.95) -> tuple[float, float]:
    s = sorted(samples)
    tail = (1 - confidence) / 2
    # numpy's default percentile rule (linear between order statistics), written out
    def at(q):
        pos = q * (len(s) - 1)
        lo = int(np.floor(pos))
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)
    return at(tail), at(1 - tail)


def test_mean_interval_equals_a_hand_bootstrap_over_the_same_draws():
    rng = np.random.default_rng(3)
    hits = (rng.random(60) < 0.4).astype(float)
    samples = []
    for counts in stats.resample_counts(60, 200, seed=7):
        for row in counts:
            drawn = [hits[i] for i in range(60) for _ in range(int(row[i]))]   # the resample, item by item
            assert len(drawn) == 60
            samples.append(100.0 * sum(drawn) / len(drawn))
    lo, hi = stats.bootstrap_interval(stats.hits(hits), resamples=200, seed=7)
    assert (lo, hi) == pytest.approx(_hand_percentiles(samples), abs=1e-9)
    assert lo < 100 * hits.mean() < hi


def test_reducers_reproduce_the_tasks_metrics():
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    rows = stats.class_recall_rows(pred, target)
    want = 100 * mean_per_class_recall(torch.tensor(pred), torch.tensor(target), 5)
    assert rows.metric() == pytest.approx(want)
    areas = rng.integers(0, 50, size=(30, 4, 6)).astype(float)
    areas[:, 1] += areas[:, 0]                   # union >= intersect
    areas[:, :, 2] = 0                           # class 2 absent from everything: left out, as mmseg does
    want = metrics_from_areas(*[torch.tensor(areas[:, i].sum(0)) for i in range(4)])
    for name in ("miou", "aacc", "macc"):
        assert stats.ItemScores(areas.reshape(30, -1), name).metric() == pytest.approx(want[name])


def test_interval_coverage_is_close_to_nominal():
    """A known-coverage simulation: 95 % intervals of a Bernoulli(0.3) mean over 200 items contain the
    true 30 % in about 95 % of 300 independent samples (binomial sd ~1.3 %)."""
    rng = np.random.default_rng(11)
    covered = 0
    trials = 300
    for t in range(trials):
        hits = (rng.random(200) < 0.3).astype(float)
        lo, hi = stats.bootstrap_interval(stats.hits(hits), resamples=300, seed=t)
        covered += lo <= 30.0 <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_same_seed_same_interval_and_more_items_narrower():
    hits = (np.arange(400) % 3 == 0).astype(float)
    a = stats.bootstrap_interval(stats.hits(hits), seed=0)
    assert a == stats.bootstrap_interval(stats.hits(hits), seed=0)
    small = stats.bootstrap_interval(stats.hits(hits[:100]), seed=0)
    assert a[1] - a[0] < small[1] - small[0]


def test_paired_difference():
    rng = np.random.default_rng(5)
    a = (rng.random(300) < 0.6).astype(float)
    same = stats.paired_difference(stats.hits(a), stats.hits(a))
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    b = a.copy()
    b[np.flatnonzero(a)[:20]] = 0                # b misses 20 items a gets right, and nothing else changes
    d = stats.paired_difference(stats.hits(a), stats.hits(b))
    assert d["difference"] == pytest.approx(100 * 20 / 300)
    assert 0 < d["low"] <= d["difference"] <= d["high"]
    # pairing removes the items' shared difficulty: narrower than either model's own interval (an
    # unpaired difference would be ~1.4x wider than those)
    lo_a, hi_a = stats.bootstrap_interval(stats.hits(a))
    assert d["high"] - d["low"] < 0.7 * (hi_a - lo_a)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_difference(stats.hits(a), stats.hits(a[:10]))


def test_metrics_without_item_scores_are_reported_with_the_reason():
    out = stats.metric_intervals({"h/top1": 50.0, "h/best_lr": 0.01, "h/top5": float("nan"), "h/odd": 40.0},
                                 {"h/top1": stats.hits([1, 0, 1, 0]), "h/odd": stats.hits([1, 1])})
    assert set(out["metrics"]) == {"h/top1"}
    assert "no per-item scores" in out["missing"]["h/best_lr"]
    assert "NaN" in out["missing"]["h/top5"]
    assert "not the reported" in out["missing"]["h/odd"]   # rows that do not give the number: no interval


def _sweep(tmp_path, root, out="results", **kw):
    cfg = {"suite": str(suite_file(root, tmp_path)), "models": ["pixels"],
           "tasks": ["knn", "zeroshot", "retrieval", "segmentation"]}
    h = harness(tmp_path, pixel_encoder(root), out=out, **kw)
    run_sweep(cfg, h, force=kw.get("force", False))
    return h, {r["cell"]["task"]: r for r in load_results(h.out_dir)}


def test_sweep_writes_intervals_and_item_scores_for_every_task(tmp_path, digits_root):
    h, recs = _sweep(tmp_path, digits_root)
    assert set(recs) == {"knn", "zeroshot", "retrieval", "segmentation"}
    for task, r in recs.items():
        assert r["status"] == "ok", r.get("reason")
        iv = r["intervals"]
        assert iv["resamples"] == 1000 and iv["confidence"] == 0.95
        # every metric has an interval or a reason, none is dropped
        assert set(iv["metrics"]) | set(iv["missing"]) == set(r["metrics"]), task
        items = read_items(r)
        for metric, (lo, hi) in iv["metrics"].items():
            assert lo <= r["metrics"][metric] <= hi, (task, metric)
            assert items[metric].metric() == pytest.approx(r["metrics"][metric], abs=1e-3)
        assert r["timings"]["bootstrap_s"] < 0.05 * r["timings"]["total_s"] + 0.5
    assert {"pix/top1", "pix/top5", "pix/mean_per_class_recall"} <= set(recs["zeroshot"]["intervals"]["metrics"])
    assert {"pix/t2i_r1", "pix/i2t_r1"} <= set(recs["retrieval"]["intervals"]["metrics"])
    assert {"pix/miou", "pix/aacc", "pix/macc"} <= set(recs["segmentation"]["intervals"]["metrics"])
    # retrieval items: images for i2t, captions for t2i
    items = read_items(recs["retrieval"])
    assert len(items["pix/t2i_r1"]) == 2 * len(items["pix/i2t_r1"])

    # a re-run gives the same intervals; no bootstrap -> no intervals, still the same numbers
    _, again = _sweep(tmp_path, digits_root, out="again")
    assert again["knn"]["intervals"]["metrics"] == recs["knn"]["intervals"]["metrics"]
    _, plain = _sweep(tmp_path, digits_root, out="plain", bootstrap=None)
    assert "intervals" not in plain["knn"] and plain["knn"]["metrics"] == recs["knn"]["metrics"]

    # the leaderboard shows value ± half-width; results_long.csv keeps the bounds
    summary = build(h.out_dir, tmp_path / "lb", reported_csv=None)
    md = (tmp_path / "lb" / "digits.md").read_text()
    knn = recs["knn"]["metrics"]["pix/top1"]
    lo, hi = recs["knn"]["intervals"]["metrics"]["pix/top1"]
    assert f"{knn:.2f} ± {(hi - lo) / 2:.2f}" in md
    assert "percentile-bootstrap" in md and summary["suites"] == ["digits"]
    assert "\\pm" in (tmp_path / "lb" / "digits.tex").read_text()

    # a changed sidecar is refused, not read
    side = next(h.out_dir.glob("*knn*.items.npz"))
    side.write_bytes(side.read_bytes() + b"x")
    with pytest.raises(Exception, match="changed since the result was written"):
        read_items(load_results(h.out_dir)[[r["cell"]["task"] for r in load_results(h.out_dir)].index("knn")])


def test_compare_two_models_on_shared_cells(tmp_path, digits_root):
    _sweep(tmp_path, digits_root)
    # a second "model": the same pixels recorded under another spec (kNN only)
    enc = pixel_encoder(digits_root)
    enc.name = "pixels-b"
    cfg = {"suite": str(suite_file(digits_root, tmp_path)), "models": ["pixels-b"], "tasks": ["knn"]}
    run_sweep(cfg, harness(tmp_path, enc))
    records = load_results(tmp_path / "results")
    out = compare(records, "pixels", "pixels-b", task="knn")
    assert len(out) == 1
    d = out[0]["metrics"]["pix/top1"]
    assert (d["difference"], d["low"], d["high"]) == (0.0, 0.0, 0.0)   # same features, same items
    with pytest.raises(CompareError, match="no ok result of model 'nope'"):
        compare(records, "pixels", "nope")
    without_a_knn = [r for r in records if (r["cell"]["model"], r["cell"]["task"]) != ("pixels", "knn")]
    with pytest.raises(CompareError, match="share no cell"):
        compare(without_a_knn, "pixels", "pixels-b")


def test_sweep_config_bootstrap_setting_is_checked(tmp_path):
    from benchmarks.sweep import SweepConfigError, harness_from_config
    cfg = {"suite": "miniworld", "models": ["x"], "tasks": ["knn"]}
    assert harness_from_config({**cfg, "bootstrap": False}, out=tmp_path).bootstrap is None
    assert harness_from_config({**cfg, "bootstrap": {"resamples": 200}}, out=tmp_path).bootstrap["resamples"] == 200
    with pytest.raises(SweepConfigError, match="bootstrap"):
        harness_from_config({**cfg, "bootstrap": {"resample": 200}}, out=tmp_path)
    json.dumps(harness_from_config(cfg, out=tmp_path).bootstrap)   # defaults are plain data


def test_no_items_gives_no_interval_not_a_crash():
    empty = stats.hits(np.zeros(0))
    assert np.isnan(empty.metric())
    assert all(np.isnan(v) for v in stats.bootstrap_interval(empty))
    out = stats.metric_intervals({"h/top1": 0.0}, {"h/top1": empty})
    assert out["metrics"] == {} and "too few" in out["missing"]["h/top1"]


def test_class_recall_rows_stay_compact_and_pair():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 1000, 5000)
    good = np.where(rng.random(5000) < 0.7, target, (target + 1) % 1000)
    bad = np.where(rng.random(5000) < 0.5, target, (target + 1) % 1000)
    a, b = stats.class_recall_rows(good, target), stats.class_recall_rows(bad, target)
    assert a.values.shape == (5000, 2)       # not 5000 x 2000 one-hot columns
    d = stats.paired_difference(a, b, resamples=200)
    assert d["low"] > 0 and d["difference"] == pytest.approx(a.metric() - b.metric())


def test_seeded_difference_with_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(8)
    a, b = stats.hits(rng.random(250) < 0.55), stats.hits(rng.random(250) < 0.45)
    one = stats.seeded_difference([a], [b], resamples=400, seed=3)
    paired = stats.paired_difference(a, b, resamples=400, seed=3)
    assert (one["difference"], one["low"], one["high"]) == (paired["difference"], paired["low"], paired["high"])
    assert one["seeds"] == 1 and one["seed_sd"] == 0.0


def test_seeded_difference_equals_a_hand_hierarchical_bootstrap():
    """Each resample draws the seeds with replacement and the items (the same draw for every seed);
    its value is the mean over the drawn seeds of A_s - B_s on the drawn items. A teacher's single row
    (B) is paired with every seed of A."""
    rng = np.random.default_rng(4)
    n, s, resamples = 40, 3, 60
    a = [(rng.random(n) < p).astype(float) for p in (0.5, 0.6, 0.4)]
    b = (rng.random(n) < 0.5).astype(float)
    got = stats.seeded_difference([stats.hits(x) for x in a], [stats.hits(b)], resamples=resamples, seed=9)
    seed_rng = np.random.default_rng([9, n, s])
    samples = []
    for counts in stats.resample_counts(n, resamples, seed=9):
        picks = seed_rng.integers(0, s, size=(len(counts), s))
        for row, drawn in zip(counts, picks):
            per_seed = [100 * (row @ a[k] - row @ b) / n for k in drawn]
            samples.append(sum(per_seed) / s)
    assert (got["low"], got["high"]) == pytest.approx(_hand_percentiles(samples), abs=1e-9)
    want = [100 * (x.mean() - b.mean()) for x in a]
    assert got["per_seed"] == pytest.approx(want) and got["difference"] == pytest.approx(np.mean(want))
    assert got["seed_sd"] == pytest.approx(np.std(want, ddof=1))
    with pytest.raises(ValueError, match="one or S seeds"):
        stats.seeded_difference([stats.hits(a[0])] * 2, [stats.hits(b)] * 3)


def test_seeded_interval_covers_training_noise_the_item_interval_misses():
    """A known-coverage simulation. Arm A's hit rate moves by a random offset per training seed (sd 8
    points) around B's, so the true mean difference is 0. Over 10 seeds the hierarchical interval
    contains 0 in about 95 % of trials; the item-only interval of the seed-averaged scores, blind to
    the seed offsets, in about 65 %."""
    rng = np.random.default_rng(21)
    n, s, trials = 200, 10, 200
    seeded = item_only = 0
    for t in range(trials):
        p = rng.uniform(0.2, 0.8, n)
        a = [(rng.random(n) < np.clip(p + rng.normal(0, 0.08), 0, 1)).astype(float) for _ in range(s)]
        b = [(rng.random(n) < p).astype(float) for _ in range(s)]
        d = stats.seeded_difference([stats.hits(x) for x in a], [stats.hits(x) for x in b], resamples=200, seed=t)
        seeded += d["low"] <= 0.0 <= d["high"]
        flat = stats.paired_difference(stats.hits(np.mean(a, 0)), stats.hits(np.mean(b, 0)), resamples=200, seed=t)
        item_only += flat["low"] <= 0.0 <= flat["high"]
    assert seeded / trials >= 0.88 and item_only / trials <= 0.80
