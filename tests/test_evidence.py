"""The evidence page's verdict rule, and the page built from a real sweep of two encoders on the
scikit-learn digits (one of them degraded), so each verdict is known in advance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.evidence import (EvidenceError, claim_verdict, load_claims, pool_tail_classes, verdict,
                                 write_evidence)
from benchmarks.sweep import run_sweep
from distill.features import Features

from test_trustworthy_numbers import PixelEncoder, digits_root, harness, pixel_encoder, suite_file  # noqa: F401


@pytest.mark.parametrize("low, high, expect, want", [
    (0.5, 3.0, "better", "reproduced"), (-3.0, -0.5, "better", "contradicted"), (-1.0, 2.0, "better", "inconclusive"),
    (0.0, 0.0, "better", "inconclusive"),          # identical predictions show no gain
    (-0.5, 2.0, "not_worse", "reproduced"), (-4.0, -1.5, "not_worse", "contradicted"),
    (-2.0, 1.0, "not_worse", "inconclusive"), (float("nan"), 1.0, "better", "inconclusive")])
def test_verdict_rule(low, high, expect, want):
    assert verdict(low, high, expect, margin=1.0) == want


def test_claim_verdict_combines_its_comparisons():
    assert claim_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert claim_verdict(["reproduced", "inconclusive"]) == "inconclusive"
    assert claim_verdict(["reproduced", "contradicted"]) == "contradicted"
    assert claim_verdict(["reproduced", "not run"]) == "not run"
    assert claim_verdict([]) == "not run"


def test_builtin_claims_name_the_five_claims_and_bad_files_are_refused(tmp_path):
    claims = load_claims("miniworld")
    assert [c["id"] for c in claims["claims"]] == ["arkd", "curation", "packing", "agglomerative", "grounding"]
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"suite": "miniworld", "claims": [{"id": "x", "tests": [{"a": "A", "b": "B"}]}]}))
    with pytest.raises(EvidenceError, match="lacks task, dataset, metric, expect"):
        load_claims(bad)
    with pytest.raises(EvidenceError, match="not found"):
        load_claims("no-such-claims")


def test_pool_tail_classes_are_the_rarest_pool_concepts(tmp_path):
    counts = [0] * 80
    counts[0], counts[1], counts[8] = 50, 3, 7          # red circle, green circle, red square (concept ids)
    (tmp_path / "world.json").write_text(json.dumps({"parts": {"pool": {"object_counts_per_concept": counts}}}))
    classes = ["red circle", "green circle", "red square", "green square"]
    assert pool_tail_classes(tmp_path, classes, 0.5) == [1, 3]   # green square: 0 objects, green circle: 3


class _Degraded(PixelEncoder):
    """The pixel encoder with most of its image summary replaced by noise: a clearly worse model."""

    def fingerprint(self):   # other weights: the feature cache must not serve the good encoder's features
        return "pixels-noisy-v1"

    def encode(self, images):
        f = super().encode(images)
        g = torch.Generator().manual_seed(len(images))
        s = f.summary["pix"]
        return Features(summary={"pix": 0.2 * s + torch.randn(s.shape, generator=g)}, patches=f.patches, grids=f.grids)


def test_evidence_page_from_a_real_sweep(tmp_path, digits_root):
    good = pixel_encoder(digits_root)
    bad = _Degraded(good.prototypes)
    cfg = {"suite": str(suite_file(digits_root, tmp_path)), "tasks": ["knn"], "datasets": ["digits"]}
    for spec, enc in (("pixels", good), ("noisy", bad)):
        run_sweep({**cfg, "models": [spec]}, harness(tmp_path, enc))
    results = tmp_path / "results"
    (results / "labels.json").write_text(json.dumps([{"spec": "pixels", "name": "good"},
                                                     {"spec": "noisy", "name": "bad"}]))
    test = {"task": "knn", "dataset": "digits", "metric": "top1"}
    claims = {"name": "t", "suite": str(suite_file(digits_root, tmp_path)), "margin": 1.0, "claims": [
        {"id": "up", "title": "good beats bad", "paper": "-", "tests": [{**test, "a": "good", "b": "bad", "expect": "better"}]},
        {"id": "down", "title": "bad beats good", "paper": "-", "tests": [{**test, "a": "bad", "b": "good", "expect": "better"}]},
        {"id": "same", "title": "good not worse than good", "paper": "-",
         "tests": [{**test, "a": "good", "b": "good", "expect": "not_worse"}]},
        {"id": "tie", "title": "good beats good", "paper": "-", "tests": [{**test, "a": "good", "b": "good", "expect": "better"}]},
        {"id": "gone", "title": "needs a row that is not there", "paper": "-",
         "tests": [{**test, "a": "good", "b": "absent", "expect": "better"}]}]}
    ev = write_evidence(results, tmp_path / "lb", claims)
    got = {c["id"]: c["verdict"] for c in ev["claims"]}
    assert got == {"up": "reproduced", "down": "contradicted", "same": "reproduced", "tie": "inconclusive",
                   "gone": "not run"}
    up = ev["claims"][0]["tests"][0]
    assert up["difference"] == pytest.approx(up["a_value"] - up["b_value"]) and up["low"] > 0
    md = (tmp_path / "lb" / "evidence.md").read_text()
    assert "| good beats bad | **reproduced** |" in md and "no knn digits result of absent" in md
    assert (tmp_path / "lb" / "evidence_up.png").stat().st_size > 0
    assert str(tmp_path) not in md      # the results folder is named relative to the page
    assert np.isfinite(json.loads((tmp_path / "lb" / "evidence.json").read_text())["claims"][0]["tests"][0]["low"])


class _NoisyRun(_Degraded):
    """The degraded encoder as one training seed of an arm: other noise for every seed."""

    def __init__(self, prototypes, seed: int):
        super().__init__(prototypes)
        self.seed = seed

    def fingerprint(self):
        return f"pixels-noisy-seed{self.seed}"

    def encode(self, images):
        f = PixelEncoder.encode(self, images)
        g = torch.Generator().manual_seed(1000 * self.seed + len(images))
        s = f.summary["pix"]
        return Features(summary={"pix": 0.2 * s + torch.randn(s.shape, generator=g)}, patches=f.patches, grids=f.grids)


def test_an_arm_of_several_seeds_is_read_together(tmp_path, digits_root):
    """labels.json names the seeds of an arm; the comparison pairs the arm's seeds with a single row
    (a teacher's), reports the mean, the spread and each seed's difference, and its interval resamples
    the seeds too."""
    good = pixel_encoder(digits_root)
    cfg = {"suite": str(suite_file(digits_root, tmp_path)), "tasks": ["knn"], "datasets": ["digits"]}
    run_sweep({**cfg, "models": ["pixels"]}, harness(tmp_path, good))
    labels = [{"spec": "pixels", "name": "good"}]
    for seed in range(3):
        spec = f"noisy{seed}"
        run_sweep({**cfg, "models": [spec]}, harness(tmp_path, _NoisyRun(good.prototypes, seed)))
        labels.append({"spec": spec, "name": "bad"} if seed == 0 else
                      {"spec": spec, "name": f"bad · seed {seed}", "arm": "bad", "seed": seed})
    results = tmp_path / "results"
    (results / "labels.json").write_text(json.dumps(labels))
    test = {"task": "knn", "dataset": "digits", "metric": "top1"}
    claims = {"name": "t", "suite": str(suite_file(digits_root, tmp_path)), "margin": 1.0, "claims": [
        {"id": "up", "title": "good beats bad", "paper": "-", "tests": [{**test, "a": "good", "b": "bad", "expect": "better"}]}]}
    ev = write_evidence(results, tmp_path / "lb", claims)
    t = ev["claims"][0]["tests"][0]
    assert t["seeds"] == 3 and t["a_seeds"] == 1 and t["b_seeds"] == 3 and len(t["per_seed"]) == 3
    assert t["difference"] == pytest.approx(np.mean(t["per_seed"])) and t["b_seed_sd"] > 0 and t["a_seed_sd"] is None
    assert t["low"] > 0 and t["verdict"] == "reproduced"
    row = [line for line in (tmp_path / "lb" / "evidence.md").read_text().splitlines() if line.startswith("| good | bad")]
    assert len(row) == 1 and f", sd {t['b_seed_sd']:.2f}" in row[0] and " | 3 | " in row[0]
