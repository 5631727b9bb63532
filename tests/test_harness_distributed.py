"""Feature extraction sharded over 2 gloo ranks on CPU: each rank encodes a slice, gathered in order,
rank 0 writes the cache entry; the result equals a single-process extraction."""
from __future__ import annotations

from pathlib import Path

import pytest
from ranks import run_two_ranks
import torch

TESTS_DIR = Path(__file__).resolve().parent

_WORKER = """
import os, sys, json
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from pathlib import Path
from benchmarks.cache import FeatureCache
from benchmarks.context import HarnessContext
from test_harness_fakes import FakeEncoder, fake_dataset_loader

tmp = Path({tmp!r})
dist.init_process_group("gloo", init_method="file://" + str(tmp / "rendezvous"), rank=int(sys.argv[1]), world_size=2)
rank = dist.get_rank()
enc = FakeEncoder(count_file=str(tmp / f"count{{rank}}.txt"))
cfg = {{"id": "colours", "reader": "fakecls", "root": str(tmp / "data"), "roles": {{"train": "train"}},
       "reader_kwargs": {{"n_per_class": 5}}}}
ctx = HarnessContext(enc, cfg, cache=FeatureCache(tmp / "cache"), batch_size=4, show_progress=False,
                     load_dataset=fake_dataset_loader, limit=19)
f = ctx.features("train", patches=True)
torch.save({{"summary": f.summary["a"], "patch0": f.patches["b"][0], "n": len(f)}}, tmp / f"out{{rank}}.pt")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_sharded_extraction_matches_single_process(tmp_path):
    from benchmarks.context import HarnessContext
    from benchmarks.cache import FeatureCache
    from test_harness_fakes import FakeEncoder, fake_dataset_loader

    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(TESTS_DIR), tmp=str(tmp_path)))
    run_two_ranks(script)
    # each rank encoded its own slice of the 19 images: 10 + 9
    counts = [sum(int(x) for x in (tmp_path / f"count{r}.txt").read_text().split()) for r in range(2)]
    assert counts == [10, 9]
    cfg = {"id": "colours", "reader": "fakecls", "root": str(tmp_path / "data"), "roles": {"train": "train"},
           "reader_kwargs": {"n_per_class": 5}}
    single = HarnessContext(FakeEncoder(), cfg, cache=FeatureCache(enabled=False), batch_size=7,
                            show_progress=False, load_dataset=fake_dataset_loader, limit=19).features("train", True)
    for r in range(2):
        got = torch.load(tmp_path / f"out{r}.pt")
        assert got["n"] == 19
        torch.testing.assert_close(got["summary"], single.summary["a"])
        torch.testing.assert_close(got["patch0"], single.patches["b"][0])
    # rank 0 wrote exactly one entry, and it serves a later single-process run
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 1
    cache = FeatureCache(tmp_path / "cache")
    again = HarnessContext(FakeEncoder(), cfg, cache=cache, show_progress=False,
                           load_dataset=fake_dataset_loader, limit=19).features("train", True)
    assert cache.stats.hits == 1
    torch.testing.assert_close(again.summary["a"], single.summary["a"])


_SWEEP_WORKER = """
import os, sys, json
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from pathlib import Path
from benchmarks.cache import FeatureCache
from benchmarks.sweep import Harness, run_sweep
from test_harness_fakes import fake_dataset_loader, fake_encoder_loader, fake_task_lookup

tmp = Path({tmp!r})
dist.init_process_group("gloo", init_method="file://" + str(tmp / "rendezvous2"), rank=int(sys.argv[1]), world_size=2)
h = Harness(out_dir=tmp / "results", cache=FeatureCache(tmp / "cache"), batch_size=4,
            variables={{"fakeroot": str(tmp / "data")}}, show_progress=False,
            encoder_loader=fake_encoder_loader, task_lookup=fake_task_lookup, dataset_loader=fake_dataset_loader)
s = run_sweep({{"suite": str(tmp / "suite.json"), "models": ["fake:0"], "tasks": ["nn", "nn_patches", "boom"]}}, h)
print(json.dumps(s.as_dict()))
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_sweep_under_two_ranks_writes_each_result_once(tmp_path):
    from distill.results import load_results
    from test_harness_fakes import write_suite

    write_suite(tmp_path / "suite.json", tmp_path / "data")
    script = tmp_path / "sweep_worker.py"
    script.write_text(_SWEEP_WORKER.format(tests=str(TESTS_DIR), tmp=str(tmp_path)))
    outs = run_two_ranks(script)
    results = {(r["cell"]["task"], r["cell"]["dataset"]): r for r in load_results(tmp_path / "results")}
    assert len(results) == 4   # nn on both datasets, nn_patches and boom on "colours"
    assert results[("nn", "colours")]["metrics"]["a/top1"] == 100.0
    assert results[("nn", "colours")]["environment"]["world_size"] == 2
    assert results[("boom", "colours")]["status"] == "failed"
