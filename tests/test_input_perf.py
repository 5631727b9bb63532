"""`amoe distill perf --bench inputs|pool` at small sizes: the figures they print are what they claim."""
from __future__ import annotations

import json
import subprocess
import sys

from distill.train.input_perf import run_input_perf, run_pool_perf, write_jpeg_shards


def test_input_bench_measures_the_real_pipeline_on_jpeg_shards(tmp_path):
    r = run_input_perf(resolutions=(64,), images=8, workers=1, step_s=0.01, steps=2, scratch=str(tmp_path))
    cell = r["resolutions"]["64"]
    assert r["teachers"] == ["dinov3", "siglip2"]
    assert cell["images_per_step"] > 0 and cell["images_per_s_per_worker"] > 0
    assert cell["break_even_step_s"] > 0         # one worker: the time it takes for one step's images
    assert 0.0 <= cell["wait_fraction"] <= 1.0
    assert not list(tmp_path.iterdir())          # the scratch shards are removed


def test_jpeg_shards_are_webdataset_tars_of_real_jpegs(tmp_path):
    from distill.train.pool import build_index

    write_jpeg_shards(tmp_path / "s", 5, (96, 64), per_shard=2)
    index = build_index(tmp_path / "s")
    assert len(index) == 5 and index.corrupt == 0 and len(index.shards) == 3
    assert {(int(e["width"]), int(e["height"])) for e in index.entries} == {(96, 64)}


def test_pool_bench_reports_bytes_per_item_of_the_columns(tmp_path):
    r = run_pool_perf(n=50_000, shards=4, world_size=2, steps=3, scratch=str(tmp_path))
    assert r["pool_columns_bytes_per_item"] == 18.0     # row i8 + resolution, height, width u2 + tokens i4
    assert r["sampler_bytes_per_item"] == 8.0           # int32 counts + int32 permutation
    assert r["sampler_state_json_bytes"] < 10_000       # the resume state does not grow with the pool
    assert r["example_entry_key"].isdigit()


def test_perf_bench_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "amoe.cli", "distill", "perf", "--bench", "pool", "--images", "20000",
                          "--json"], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout)["images"] == 20000
