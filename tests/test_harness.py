"""Harness: feature cache, results schema, cells and sweeps (skip-existing, failures, resume after kill)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.cache import CorruptCacheWarning, FeatureCache, features_to_tensors, tensors_to_features
from benchmarks.context import HarnessContext, LimitedDataset, shard_range
from distill.results import (Cell, ResultSchemaError, load_results, make_record, read_result, result_path,
                                validate, write_result)
from benchmarks.suites import SuiteError, dataset_entry, expand_vars, load_suite
from benchmarks.sweep import Harness, plan_cells, run_cells, run_sweep

from test_harness_fakes import (FakeClassification, FakeEncoder, encoded_images, fake_dataset_loader,
                                fake_encoder_loader, fake_task_lookup, write_suite)

TESTS_DIR = Path(__file__).resolve().parent


def _ctx(tmp_path, encoder=None, resolution=None, limit=None, cache=None, **cfg):
    ds_cfg = {"id": "colours", "reader": "fakecls", "root": str(tmp_path / "data"),
              "roles": {"train": "train", "test": "val"}, **cfg}
    return HarnessContext(encoder or FakeEncoder(), ds_cfg, resolution=resolution, limit=limit,
                          cache=cache if cache is not None else FeatureCache(tmp_path / "cache"),
                          batch_size=3, show_progress=False, load_dataset=fake_dataset_loader)


def _harness(tmp_path, **kw):
    return Harness(out_dir=tmp_path / "results", cache=FeatureCache(tmp_path / "cache"), batch_size=4,
                   variables={"fakeroot": str(tmp_path / "data")}, show_progress=False,
                   encoder_loader=fake_encoder_loader, task_lookup=fake_task_lookup,
                   dataset_loader=fake_dataset_loader, **kw)


# ---------------------------------------------------------------- feature cache

def test_features_roundtrip_through_flat_tensors():
    enc = FakeEncoder()
    imgs = [torch.rand(3, 32, 32), torch.rand(3, 16, 24)]
    f = enc.encode([imgs[0]])
    g = enc.encode([imgs[1]])
    both = type(f).concat([f, g])
    back = tensors_to_features(features_to_tensors(both))
    assert back.grids == [(4, 4), (2, 3)]
    for h in both.heads:
        torch.testing.assert_close(back.summary[h], both.summary[h])
        for p, q in zip(back.patches[h], both.patches[h]):
            torch.testing.assert_close(p, q)
    torch.testing.assert_close(back.registers, both.registers)


def test_cache_hit_and_miss_by_key(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    enc = FakeEncoder()
    first = _ctx(tmp_path, encoder=enc, cache=cache).features("train")
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)
    n_encoded = enc.encoded
    again = _ctx(tmp_path, encoder=enc, cache=cache).features("train")
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert enc.encoded == n_encoded  # served from disk, not re-encoded
    torch.testing.assert_close(again.summary["a"], first.summary["a"])

    # every key field makes a different entry
    _ctx(tmp_path, encoder=enc, cache=cache, resolution=16).features("train")
    _ctx(tmp_path, encoder=enc, cache=cache, limit=5).features("train")
    _ctx(tmp_path, encoder=FakeEncoder(seed=1), cache=cache).features("train")
    _ctx(tmp_path, encoder=enc, cache=cache).features("test")
    _ctx(tmp_path, encoder=enc, cache=cache, reader_kwargs={"n_per_class": 2}).features("train")
    assert (cache.stats.hits, cache.stats.misses) == (1, 6)
    ctx = _ctx(tmp_path, encoder=enc, cache=cache, limit=5)
    limited = ctx.features("train")
    assert len(limited) == 5 and cache.stats.hits == 2
    torch.testing.assert_close(limited.summary["a"], first.summary["a"][ctx.dataset("train").indices])


def test_summary_request_served_by_patch_entry(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    with_patches = _ctx(tmp_path, cache=cache).features("train", patches=True)
    assert len(with_patches.patches["b"]) == 20 and with_patches.grids[0] == (4, 4)
    summary_only = _ctx(tmp_path, cache=cache).features("train")
    assert cache.stats.misses == 1 and cache.stats.hits == 1
    assert summary_only.patches == {}
    torch.testing.assert_close(summary_only.summary["b"], with_patches.summary["b"])


def test_corrupt_cache_file_detected_and_recomputed(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    ctx = _ctx(tmp_path, cache=cache)
    good = ctx.features("train")
    path = cache.path_for(ctx.feature_key("train", False))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip one byte inside the tensor data: still loadable, wrong numbers
    path.write_bytes(bytes(data))
    enc = FakeEncoder()
    with pytest.warns(CorruptCacheWarning, match="sha256"):
        again = _ctx(tmp_path, encoder=enc, cache=cache).features("train")
    assert cache.stats.corrupt == 1 and enc.encoded == 20
    torch.testing.assert_close(again.summary["a"], good.summary["a"])
    # the entry was rewritten and is intact again
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCacheWarning)
        _ctx(tmp_path, cache=cache).features("train")
    assert cache.stats.hits == 1

    # a truncated file is caught the same way
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(CorruptCacheWarning):
        _ctx(tmp_path, cache=cache).features("train")


def test_entry_without_sidecar_is_not_trusted(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    ctx = _ctx(tmp_path, cache=cache)
    ctx.features("train")
    key = ctx.feature_key("train", False)
    cache.path_for(key).with_suffix(".json").unlink()  # as if killed between the two writes
    assert cache.lookup(key) is None


def test_text_features_cached(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    a = _ctx(tmp_path, cache=cache).text_features(["red", "blue"], "a")
    b = _ctx(tmp_path, cache=cache).text_features(["red", "blue"], "a")
    assert (cache.stats.text_misses, cache.stats.text_hits) == (1, 1)
    torch.testing.assert_close(a, b)
    _ctx(tmp_path, cache=cache).text_features(["red", "green"], "a")
    assert cache.stats.text_misses == 2


def test_limited_dataset_keeps_per_item_attributes_aligned():
    base = FakeClassification("x", "train")
    lim = LimitedDataset(base, 6)
    assert len(lim) == 6 and lim.targets == [base.targets[i] for i in lim.indices]
    assert lim.classes == base.classes and lim.indices == sorted(lim.indices)
    assert lim[0][1] == base[lim.indices[0]][1]
    with pytest.raises(IndexError):
        lim[6]
    assert len(LimitedDataset(base, 1000)) == len(base) and LimitedDataset(base, 1000).limit_rule is None


def test_limit_is_stratified_seeded_and_keeps_every_class():
    """Sorted splits hold classes in blocks: the first N items would be one class (reproduced: the
    first 5 of this split are all 'red'), a kNN bank that measures nothing."""
    base = FakeClassification("x", "train")
    assert set(base.targets[:5]) == {0}
    lim = LimitedDataset(base, 5)
    assert lim.limit_rule == "stratified" and set(lim.targets) == {0, 1, 2, 3}
    assert LimitedDataset(base, 5).indices == lim.indices            # seeded: the same items every run
    counts = np.bincount(LimitedDataset(base, 10).targets)
    assert counts.max() - counts.min() <= 1                            # classes take turns

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return i
    sample = LimitedDataset(Unlabelled(), 10)
    assert sample.limit_rule == "random" and sample.indices != list(range(10)) and len(set(sample.indices)) == 10


def test_shard_ranges_cover_in_order():
    for n in (0, 1, 7, 20):
        for world in (1, 2, 3):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))


# ---------------------------------------------------------------- suites

def test_suite_vars_and_errors(tmp_path, monkeypatch):
    suite = load_suite("paper")
    ids = [d["id"] for d in suite["datasets"] if d["tasks"] != ["grounding"]]
    assert len(ids) == 11   # the paper's encoder benchmarks; RefCOCO/+/g (8 splits) take grounding results
    assert [d["id"] for d in suite["datasets"] if d["tasks"] == ["grounding"]][:3] == \
        ["refcoco-val", "refcoco-testA", "refcoco-testB"]
    fam = {f["name"]: f for f in suite["leaderboard"]["families"]}
    assert len(fam["image-text avg"]["datasets"]) == 7 and "caltech101" not in fam["kNN avg"]["datasets"]
    monkeypatch.delenv("AMOE_DATA", raising=False)
    with pytest.raises(SuiteError, match=r"--var AMOE_DATA=PATH"):
        dataset_entry(suite, "imagenet")
    assert dataset_entry(suite, "imagenet", {"AMOE_DATA": "/d"})["root"] == "/d/imagenet"
    monkeypatch.setenv("AMOE_DATA", "/env")
    assert dataset_entry(suite, "dtd")["root"] == "/env/dtd"
    with pytest.raises(SuiteError, match="no dataset 'nope'"):
        dataset_entry(suite, "nope")
    mw = load_suite("miniworld")
    assert dataset_entry(mw, "mw-cls", {"world": "/w"})["root"] == "/w/classification"
    assert expand_vars("${a}/${b}", {"a": 1, "b": "x"}) == "1/x"


# ---------------------------------------------------------------- results

def test_result_schema_and_validation(tmp_path):
    cell = Cell("fake:0", "nn", "colours", 224)
    rec = make_record(cell, "ok", metrics={"a/top1": 50}, config={"x": 1}, model={"spec": "fake:0"},
                      dataset={"id": "colours"}, task={"name": "nn"}, timings={"total_s": 1.0})
    for f in ("schema_version", "metrics", "config", "model", "dataset", "code", "timings", "environment"):
        assert f in rec
    assert rec["code"]["package"] == "amoe" and "git_commit" in rec["code"]
    assert {"torch", "python", "device", "cpu_count"} <= set(rec["environment"])
    path = write_result(tmp_path, rec)
    assert path == result_path(tmp_path, cell) and read_result(path)["metrics"] == {"a/top1": 50.0}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary files
    with pytest.raises(ResultSchemaError, match="must say why"):
        make_record(cell, "skipped", config={}, model={}, dataset={}, task={}, timings={})
    bad = dict(rec, schema_version=99)
    with pytest.raises(ResultSchemaError, match="schema_version"):
        validate(bad)
    # other cells of other resolutions / models get other files
    assert Cell("fake:0", "nn", "colours", 512).filename() != cell.filename()
    assert Cell("a/b:c", "nn", "colours", None).filename() != Cell("a_b:c", "nn", "colours", None).filename()


# ---------------------------------------------------------------- cells and sweeps

def test_sweep_records_ok_skipped_failed_and_skips_finished(tmp_path):
    suite = load_suite(write_suite(tmp_path / "suite.json", tmp_path / "data"))
    cfg = {"suite": str(tmp_path / "suite.json"), "models": ["fake:0", "fake:1"],
           "tasks": ["nn", "textonly_b", "boom", "nn_patches"]}
    cells = plan_cells(cfg, suite)
    assert len(cells) == 2 * (4 + 1)
    h = _harness(tmp_path)
    s = run_cells(cells, suite, h)
    assert (s.ok, s.skipped, s.failed, s.already_done) == (6, 2, 2, 0)
    results = {(r["cell"]["model"], r["cell"]["task"], r["cell"]["dataset"]): r for r in load_results(h.out_dir)}
    ok = results[("fake:0", "nn", "colours")]
    assert ok["status"] == "ok" and ok["metrics"]["a/top1"] == 100.0
    assert ok["dataset"]["sizes"] == {"train": 20, "test": 20} and ok["dataset"]["fingerprint"]
    assert ok["model"]["fingerprint"] == "fake0-seed0" and ok["task"]["version"] == "1"
    # written relative to the results folder (no path of this machine), and it reads back
    from distill.io import resolve_spec
    assert not Path(ok["config"]["dataset_cfg"]["root"]).is_absolute()
    assert resolve_spec(ok["config"]["dataset_cfg"]["root"], h.out_dir) == str(tmp_path / "data" / "colours")
    assert ok["timings"]["total_s"] >= ok["timings"]["features_s"] > 0
    skipped = results[("fake:0", "textonly_b", "colours")]
    assert skipped["status"] == "skipped" and "text tower 'b'" in skipped["reason"]
    failed = results[("fake:1", "boom", "colours")]
    assert failed["status"] == "failed" and "injected failure" in failed["reason"]
    assert "Traceback" in failed["error"]

    # re-run: finished and skipped cells are kept, failed ones retried (and fail again)
    s2 = run_cells(cells, suite, h)
    assert (s2.already_done, s2.failed, s2.ok) == (8, 2, 0)


def test_encoder_that_cannot_load_fails_only_its_cells(tmp_path):
    suite = load_suite(write_suite(tmp_path / "suite.json", tmp_path / "data"))
    cfg = {"suite": str(tmp_path / "suite.json"), "models": ["nope:0", "fake:0"], "tasks": ["nn"]}
    s = run_cells(plan_cells(cfg, suite), suite, _harness(tmp_path))
    assert (s.failed, s.ok) == (2, 2)
    assert "loading the encoder failed" in s.failures[0]["reason"]


def test_adding_a_task_reuses_cached_features(tmp_path, monkeypatch):
    count = tmp_path / "count.txt"
    monkeypatch.setenv("FAKE_COUNT_FILE", str(count))
    write_suite(tmp_path / "suite.json", tmp_path / "data")
    cfg = {"suite": str(tmp_path / "suite.json"), "models": ["fake:0"], "tasks": ["nn"],
           "datasets": ["colours"]}
    run_sweep(cfg, _harness(tmp_path))
    first = encoded_images(str(count))
    assert first == 40  # train + test, once each
    h = _harness(tmp_path)
    s = run_sweep({**cfg, "tasks": ["nn", "textonly_b"]}, h)
    assert s.already_done == 1 and s.skipped == 1
    assert encoded_images(str(count)) == first and h.cache.stats.misses == 0 and h.cache.stats.hits == 2


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from benchmarks.cache import FeatureCache
from benchmarks.sweep import Harness, run_sweep
from test_harness_fakes import fake_dataset_loader, fake_encoder_loader, fake_task_lookup
tmp = Path({tmp!r})
h = Harness(out_dir=tmp / "results", cache=FeatureCache(tmp / "cache"), batch_size=4,
            variables={{"fakeroot": str(tmp / "data")}}, show_progress=False,
            encoder_loader=fake_encoder_loader, task_lookup=fake_task_lookup, dataset_loader=fake_dataset_loader)
cfg = {{"suite": str(tmp / "suite.json"), "models": ["fake:0", "fake:1"], "tasks": ["nn"]}}
s = run_sweep(cfg, h)
print("DONE", s.ok, s.already_done)
"""


def test_killed_sweep_resumes_only_missing_cells(tmp_path):
    write_suite(tmp_path / "suite.json", tmp_path / "data")
    script = tmp_path / "sweep.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(TESTS_DIR), tmp=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_COUNT_FILE": str(tmp_path / "count.txt")}
    # cells in order: fake:0/colours, fake:0/colours-big, fake:1/colours, ... : killed on the 2nd cell
    killed = subprocess.run([sys.executable, str(script)], env={**env, "FAKE_KILL_AT": "colours-big"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    done = load_results(tmp_path / "results")
    assert [(r["cell"]["model"], r["cell"]["dataset"]) for r in done] == [("fake:0", "colours")]
    assert not list((tmp_path / "results").glob(".*.tmp"))
    before = encoded_images(str(tmp_path / "count.txt"))

    resumed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "DONE 3 1" in resumed.stdout
    assert len(load_results(tmp_path / "results", statuses=("ok",))) == 4
    # the killed cell's features were cached before the kill; only fake:1's features are new
    assert encoded_images(str(tmp_path / "count.txt")) - before == 40 + 56


# ---------------------------------------------------------------- CLI over a real on-disk dataset

def _imagefolder(root: Path) -> None:
    """A real ImageFolder tree (read by distill.data's 'imagefolder' reader)."""
    from test_harness_fakes import COLOURS
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3)):
        for name, colour in zip(("red", "green", "blue", "yellow"), COLOURS):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (24, 24, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.jpg")


def test_cli_run_and_sweep_on_real_imagefolder(tmp_path, monkeypatch, capsys):
    import benchmarks.sweep as sweep_mod
    from amoe.cli import main as amoe_main

    _imagefolder(tmp_path / "world" / "classification")
    monkeypatch.setattr(sweep_mod, "default_encoder_loader", fake_encoder_loader)
    monkeypatch.setattr(sweep_mod, "default_task_lookup", fake_task_lookup)
    monkeypatch.setenv("FAKE_COUNT_FILE", str(tmp_path / "count.txt"))
    common = ["--var", f"world={tmp_path / 'world'}", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    rc = amoe_main(["bench", "run", "--model", "fake:0", "--task", "nn", "--dataset", "mw-cls",
                    "--suite", "miniworld", "--out", str(tmp_path / "res"), "--limit", "10", *common])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "ok" and out["metrics"]["a/top1"] > 50
    rec = read_result(out["result"])
    assert rec["dataset"]["sizes"] == {"train": 10, "test": 10} and rec["config"]["limit"] == 10
    assert encoded_images(str(tmp_path / "count.txt")) == 20

    suite = load_suite("miniworld")   # the built-in suite, with the fake task added to mw-cls
    suite["datasets"][0]["tasks"].append("nn")
    (tmp_path / "mw.json").write_text(json.dumps(suite))
    sweep_cfg = tmp_path / "sweep.json"
    sweep_cfg.write_text(json.dumps({"suite": str(tmp_path / "mw.json"), "models": ["fake:0", "fake:1"], "tasks": ["nn"],
                                     "datasets": ["mw-cls"], "batch_size": 5}))
    rc = amoe_main(["bench", "sweep", str(sweep_cfg), "--out", str(tmp_path / "res2"), *common])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["ok"] == 2 and summary["total"] == 2
    assert encoded_images(str(tmp_path / "count.txt")) == 20 + 2 * 28   # no --limit: a new cache key
    rc = amoe_main(["bench", "sweep", str(sweep_cfg), "--out", str(tmp_path / "res2"), *common])
    assert json.loads(capsys.readouterr().out)["already_done"] == 2

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"suite": "miniworld", "models": ["fake:0"], "tasks": ["nn"], "modles": []}))
    assert amoe_main(["bench", "sweep", str(bad)]) == 2      # one line naming the field, no traceback
    err = capsys.readouterr().err
    assert "unknown key 'modles'" in err and "did you mean 'models'" in err and err.count("\n") == 1


def test_suites_use_registered_readers():
    from distill.data import list_datasets
    from benchmarks.suites import list_suites
    for name in list_suites():
        for ds in load_suite(name)["datasets"]:
            assert ds["reader"] in list_datasets(), (name, ds["id"])
