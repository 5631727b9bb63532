"""`amoe distill RECIPE --plan --world-size N`: counted from the real classes, activations measured."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from distill.train.config import load_config
from distill.train.memory_plan import _probe, plan_recipe

PAPER_SPECS = ["siglip2:google/siglip2-so400m-patch16-naflex", "dinov3:facebook/dinov3-vitl16-pretrain-lvd1689m"]


def _recipe(parallel="fsdp", ckpt=True):
    from train_standins import TINY_STUDENT, tiny_recipe

    r = tiny_recipe("/nonexistent-world", steps=1, engine__parallel=parallel,
                    engine__activation_checkpointing=ckpt, engine__device="cuda")
    r["student"]["config"] = dict(TINY_STUDENT)
    for t, spec in zip(r["teachers"], PAPER_SPECS):
        t["spec"] = spec
    return load_config(r)


def test_saved_activations_grow_linearly_with_tokens_so_two_probes_predict_a_third():
    """The plan fits fixed + per-token bytes on 1- and 2-image probes; a 4-image probe lands on the line."""
    from distill.student import Student
    from train_standins import TINY_STUDENT

    torch.manual_seed(0)
    model = Student(dict(TINY_STUDENT), attention_backend="sdpa", expert_backend="loop").train()
    probes = {n: _probe(model, [torch.randn(3, 64, 64) for _ in range(n)], autocast_bf16=False) for n in (1, 2, 4)}
    for i in range(len(probes[1][0])):
        b1, b2, b4 = (probes[n][0][i] for n in (1, 2, 4))
        assert b2 > b1 > 0
        assert abs(b4 - (b1 + 3 * (b2 - b1))) <= 0.05 * b4, i


def test_fsdp_shards_the_student_state_and_checkpointing_cuts_activations():
    one = plan_recipe(_recipe(), 1)
    eight = plan_recipe(_recipe(), 8)
    P, blk = eight["student"]["params"], eight["student"]["largest_block_params"]
    assert one["device_bytes"]["optimizer_adamw"] == 8 * P
    assert eight["device_bytes"]["optimizer_adamw"] == int(8 * P / 8)
    assert eight["device_bytes"]["student_params"] == int(4 * P / 8 + 2 * 4 * blk)
    acts = eight["student"]["activations"]
    assert 0 < acts["with_checkpointing"] < acts["without_checkpointing"]
    assert eight["device_bytes"]["activations"] == acts["with_checkpointing"]
    no_ckpt = plan_recipe(_recipe(ckpt=False), 8)
    assert no_ckpt["device_bytes"]["activations"] == no_ckpt["student"]["activations"]["without_checkpointing"]
    ddp = plan_recipe(_recipe("ddp"), 8)
    assert ddp["device_bytes"]["student_grads"] == 8 * P        # gradients + DDP's buckets, whole
    # the paper teachers, built on the meta device from their architectures
    assert 1.0e9 < eight["teachers"]["siglip2"]["params"] < 1.3e9
    assert 2.9e8 < eight["teachers"]["dinov3"]["params"] < 3.2e8
    assert eight["per_rank_peak_bytes"] == sum(eight["device_bytes"].values())


def test_paper_stage2_fits_32_a100s_and_the_cli_writes_the_plan(tmp_path):
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "amoe.cli", "distill", "stage2", "--plan", "--world-size", "32",
                          "--pool-images", "213000000", "--json", "--plan-out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan == json.loads(run.stdout)
    assert plan["fits_device"] and plan["fits_host"]
    assert 0 < plan["per_rank_peak_bytes"] < 80 * 2 ** 30
    assert plan["host_bytes"]["pool_and_sampler"] == 26 * 213_000_000


def test_a_recipe_whose_teachers_cannot_be_planned_gets_one_line():
    run = subprocess.run([sys.executable, "-m", "amoe.cli", "distill", "miniworld", "--plan", "--world-size", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "--set teachers=DIR" in run.stderr
    run = subprocess.run([sys.executable, "-m", "amoe.cli", "distill", "stage1", "--plan", "--world-size", "2",
                          "--set", "teachers.0.spec=hf:google/siglip2-so400m-patch16-naflex"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "unknown encoder kind 'hf'" in run.stderr and "Known kinds:" in run.stderr


def test_curation_plan_counts_each_level_at_the_paper_scale():
    """The paper's level 1 (k = 20M) is split-based: its engine k-means runs at the coarse k = 200k and
    points stay on the host, so the device holds small tables. The host holds this rank's points as
    float16, its own labels (no rank gathers all 2.3B), and its share of the memory-mapped (k, d)
    table: it fits 128 GiB per rank at 32 ranks; float32 points would not."""
    from distill.curation.hierarchy import load_cluster_config
    from distill.curation.plan import plan_levels

    cfg = load_cluster_config("paper")
    plan = plan_levels(cfg, 32, 2_300_000_000, 768)
    l1 = plan["levels"][0]
    local = -(-2_300_000_000 // 32)
    assert l1["device_bytes"]["sums_float64"] == 200_000 * 768 * 8
    assert l1["host_bytes"]["level_file_pages"] == 20_000_000 * 768 * 4 // 8
    assert l1["host_bytes"]["points_slice"] == local * 768 * 2
    assert "gathered_labels_and_distances" not in l1["host_bytes"] and "fit_copy" not in l1["host_bytes"]
    assert l1["fit_points_per_rank"] == -(-1_000_000_000 // 32)
    assert [lv["n_in"] for lv in plan["levels"]] == [2_300_000_000, 20_000_000, 500_000, 50_000]
    assert plan["fits_device"] and plan["per_rank_peak_bytes"] < 8 * 2 ** 30
    assert plan["fits_host"] and plan["host_headroom_bytes"] > 5 * 2 ** 30
    cfg.point_dtype = "float32"
    assert not plan_levels(cfg, 32, 2_300_000_000, 768)["fits_host"]
    flat = load_cluster_config("paper")
    flat.levels[0].n_splits = 1                     # what a flat level 1 would need
    assert plan_levels(flat, 32, 2_300_000_000, 768)["levels"][0]["device_bytes"]["sums_float64"] \
        == 20_000_000 * 768 * 8
    small = plan_levels(load_cluster_config("miniworld"), 2, 100_000, 128)
    assert small["fits_device"] and small["fits_host"]


def test_curate_plan_cli_exit_codes(tmp_path):
    base = [sys.executable, "-m", "amoe.cli", "curate", "plan"]
    run = subprocess.run(base + ["paper", "--world-size", "32", "--points", "2300000000", "--json",
                                 "--plan-out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["fits_host"]
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(run.stdout)
    run = subprocess.run(base + ["paper", "--world-size", "8", "--points", "2300000000", "--json",
                                 "--plan-out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and not json.loads(run.stdout)["fits_host"]
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(run.stdout)
    run = subprocess.run(base + ["nosuch", "--world-size", "2", "--points", "10"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "not found" in run.stderr


def test_a_plan_that_does_not_fit_names_the_overflow_and_the_settings():
    from distill.curation.hierarchy import load_cluster_config
    from distill.curation.plan import advice as curate_advice
    from distill.curation.plan import plan_levels
    from distill.train.memory_plan import advice

    plan = plan_recipe(_recipe(ckpt=False), 2, gpu_gib=1e-3)
    assert not plan["fits_device"]
    lines = advice(plan)
    assert lines[0].startswith("device overflows by") and "activations" in lines[0]
    assert any("engine.activation_checkpointing=true" in x for x in lines)
    assert any("batching.max_tokens" in x for x in lines)
    assert advice(plan_recipe(_recipe(), 2)) == []
    cur = curate_advice(plan_levels(load_cluster_config("paper"), 8, 2_300_000_000, 768))
    assert cur[0].startswith("level 1 host overflows by") and "points_slice" in cur[0]
