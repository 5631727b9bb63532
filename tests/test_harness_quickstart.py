"""Quickstart step runner: ordered named steps, skip-if-complete, resume after a failure, settings."""
from __future__ import annotations

import json

import pytest

from amoe.quickstart import STEPS, Run, Step, load_settings, run_steps


def _steps(calls, fail_on=None):
    def make(name):
        def done(r):
            return (r.out / f"{name}.ok").exists()

        def run(r):
            calls.append(name)
            if name == fail_on:
                raise RuntimeError(f"{name} broke")
            (r.out / f"{name}.ok").write_text("x")
            return {"made": name}
        return Step(name, f"make {name}", done, run)
    return [make(n) for n in ("a", "b", "c")]


def test_steps_run_in_order_skip_when_complete_and_resume(tmp_path):
    calls = []
    run = Run(tmp_path, {}, log=lambda m: None)
    with pytest.raises(RuntimeError, match="b broke"):
        run_steps(run, _steps(calls, fail_on="b"))
    state = json.loads((tmp_path / "quickstart.json").read_text())
    assert state["steps"]["a"]["status"] == "done" and state["steps"]["b"]["status"] == "failed"
    assert calls == ["a", "b"]
    report = run_steps(run, _steps(calls))          # resume: a is complete, b and c run
    assert calls == ["a", "b", "b", "c"]
    assert [r["status"] for r in report] == ["skipped", "done", "done"]
    report = run_steps(run, _steps(calls))          # everything complete: nothing runs
    assert calls == ["a", "b", "b", "c"] and all(r["status"] == "skipped" for r in report)


def test_step_that_leaves_incomplete_outputs_is_an_error(tmp_path):
    bad = Step("bad", "never completes", lambda r: False, lambda r: None)
    with pytest.raises(RuntimeError, match="outputs are not complete"):
        run_steps(Run(tmp_path, {}, log=lambda m: None), [bad])


def test_only_unknown_step_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown step"):
        run_steps(Run(tmp_path, {}, log=lambda m: None), _steps([]), only=["zzz"])


def test_pipeline_shape_and_settings(tmp_path):
    assert [s.name for s in STEPS] == ["world", "teachers", "random-student", "distill", "ablation-targets", "ablation-relational",
                                       "ablation-curation", "ablation-packing", "ablation-single-teacher", "grounding",
                                       "bench", "leaderboard"]
    fast, full = load_settings(fast=True), load_settings()
    assert fast["sweep"]["limit"] and full["sweep"]["limit"] is None
    assert fast["sweep"]["tasks"] == full["sweep"]["tasks"]   # fast overrides only what it names
    run = Run(tmp_path / "qs", full)
    cfg = run.sweep_config()
    assert cfg["vars"]["world"] == str(tmp_path / "qs" / "world")
    # without ablations: raw pixels, teachers, random-init student and the distilled student
    assert [m.split(":")[0] for m in cfg["models"]] == ["pixels", "siglip2", "dinov3", "student", "student"]
    assert cfg["models"][4].endswith("students/distilled/export")
    assert not full["ablations"] and fast["ablations"]
    ablating = Run(tmp_path / "qs", {**full, "ablations": True})
    assert ablating.relational_variants() == ["arkd", "none", "rkd"]   # the main student's term comes first
    assert ablating.seeds == 3 and Run(tmp_path, full).seeds == 1      # seeds per arm only with ablations
    models = ablating.sweep_config()["models"]
    # the main student, then 6 arms x 3 seeds (the ARKD arm is the ablations' own, at their recipe)
    assert models[4] == f"student:{ablating.export(ablating.main_arm)}" and len(models) == 5 + 6 * 3
    assert ablating.base_arm == ablating.arms("relational")[0] != ablating.main_arm
    assert f"student:{tmp_path / 'qs/students/distilled-padded-seed2/export'}" in models
    labels = {e["spec"]: e for e in ablating.labels()}
    seed1 = labels[f"student:{tmp_path / 'qs/students/data-curated-seed1/export'}"]
    assert seed1 == {"spec": seed1["spec"], "name": "student (curated data) · seed 1", "arm": "student (curated data)",
                     "seed": 1}
    assert labels["grounding-vlm:miniworld-student-dinov3-only-seed2"]["arm"] == "grounding (DINOv3-only student)"
    # the stand-in LM arm tests no claim: trained, and listed, with seed 0 only
    assert "grounding-vlm:miniworld-student-lm" in labels and "grounding-vlm:miniworld-student-lm-seed1" not in labels


def test_ablation_steps_run_only_when_selected(tmp_path):
    calls = []
    steps = _steps(calls) + [Step("abl", "an ablation", lambda r: False, lambda r: calls.append("abl"), ablation=True)]
    report = run_steps(Run(tmp_path, {}, log=lambda m: None), steps)
    assert calls == ["a", "b", "c"] and report[-1]["status"] == "not selected"


@pytest.mark.slow
def test_fast_quickstart_runs_every_step_end_to_end(tmp_path):
    """The whole pipeline on the smoke settings: real world, teachers, distillation, grounding, sweep."""
    run = Run(tmp_path / "qs", load_settings(fast=True), log=lambda m: None)
    report = run_steps(run)
    assert [r["status"] for r in report] == ["done"] * len(STEPS)
    table = (run.leaderboard / "miniworld.csv").read_text()
    for k in ("distilled", "distilled-arkd", "distilled-none", "distilled-rkd", "data-curated", "data-random", "distilled-padded"):
        assert f"{k}/export" in table
    evidence = json.loads((run.curation / "evidence.json").read_text())
    assert set(evidence) == {"curated", "random"}
    for name in ("miniworld-scratch", "miniworld-student", "miniworld-student-gram", "miniworld-student-lm"):
        assert f"grounding-vlm:{name}" in table
    assert "grounding-baseline:constant-box" in table          # the floor every init is read against
    # the arms read every teacher output from the reference arm's cache, filled before them
    for t in ("siglip2", "dinov3"):
        assert json.loads((run.export(run.base_arm).parent / "target_cache" / f"filled-{t}.json").read_text())["encoded"] > 0
    assert not list((run.students / "distilled-none-seed1" / "target_cache").rglob("*.safetensors"))
    # the ablations' evidence page: every claim gets a verdict; the measured ones have intervals
    claims = json.loads((run.leaderboard / "evidence.json").read_text())["claims"]
    assert [c["id"] for c in claims] == ["arkd", "curation", "packing", "agglomerative", "grounding"]
    assert {c["verdict"] for c in claims} <= {"reproduced", "contradicted", "inconclusive", "not run"}
    measured = [t for c in claims for t in c["tests"] if "difference" in t]
    assert len(measured) == sum(len(c["tests"]) for c in claims) and all(t["low"] <= t["difference"] <= t["high"] for t in measured)
    assert "± " in (run.leaderboard / "miniworld.md").read_text()
    # what each encoder knows of the class names' two factors, beside the class-level scores
    header = table.splitlines()[0]
    assert "linear top1_colour" in header and "linear top1_shape" in header
    # image-text scores per text head and for their ensemble, zero-shot and retrieval alike
    for head in ("siglip2", "dinotxt", "ensemble"):
        assert all(f"{col} ({head})" in header for col in ("zero-shot top1", "retrieval t2i_r1", "retrieval i2t_r1"))
    # records and tables carry no path of this machine (paths relative to the folder they are in); kept
    # absolute: the feature cache (a machine-local store keyed by where the data is), the re-runnable
    # sweep.json, and the model specs that are a result cell's identity (the sweep's names for them)
    here = str(tmp_path)
    for f in sorted(run.out.rglob("*")):
        rel = f.relative_to(run.out)
        if f.suffix not in (".json", ".jsonl", ".md", ".csv") or rel.parts[0] == "cache" or rel.name == "sweep.json":
            continue
        text = f.read_text()
        if rel.parts[0] == "results":
            record = json.loads(text)
            if rel.name == "labels.json":
                continue
            text = json.dumps({k: v for k, v in record.items() if k not in ("cell", "model")})
        assert here not in text, f"{rel} holds an absolute path"
    # a second run finds every step complete and does nothing
    assert all(r["status"] == "skipped" for r in run_steps(run))


def test_a_student_folder_of_another_recipe_is_refused_naming_the_keys(tmp_path):
    """A re-run with a changed recipe in the same folder must not mix its seeds with the old ones."""
    from amoe.quickstart import SeedConfigMismatch, _arm_config, _arm_done
    from distill.io import portable

    run = Run(tmp_path / "qs", {**load_settings(), "ablations": True}, log=lambda m: None)
    arm = run.arms("relational")[1]                                    # no relational term
    folder = run.export(arm, 2).parent
    folder.mkdir(parents=True)
    cfg = _arm_config(run, arm, 2)
    assert cfg.seed == 2 and cfg.teachers[0].relational == "none"
    recorded = portable(cfg.resolve_paths(folder).to_json(), folder)
    (folder / "config.json").write_text(json.dumps(recorded))
    assert _arm_done(run, arm, 2) is False                              # same recipe, not exported yet
    recorded["optim"]["weight_decay"] = 0.1
    recorded["logging"]["every_steps"] = 50                             # how it reports may differ
    (folder / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(SeedConfigMismatch, match=r"optim\.weight_decay differ from the planned student "
                                                 r"\(no relational\), seed 2"):
        _arm_done(run, arm, 2)


def test_the_main_student_and_the_ablation_arms_have_their_own_recipes(tmp_path):
    """The quickstart's student is distilled with `distill.recipe` on the pretraining scenes; every ablation
    arm with `distill.ablation_recipe` on the pool (the curation arms' samples are of the pool), reading the
    reference arm's teacher outputs; without an ablation recipe the arms use the main one."""
    from amoe.quickstart import _arm_config

    run = Run(tmp_path / "qs", {**load_settings(), "ablations": True}, log=lambda m: None)
    main = _arm_config(run, run.main_arm, 0)
    assert main.name == "miniworld-pretrain-distilled" and main.data.sources[0].path.endswith("pretrain/shards")
    assert main.target_cache.shared is None
    base = _arm_config(run, run.base_arm, 0)
    assert base.name == "miniworld-distilled-arkd" and base.data.sources[0].path.endswith("pool/shards")
    assert base.target_cache.shared is None and base.steps < main.steps
    curated = _arm_config(run, run.arms("curation")[0], 1)
    assert curated.data.sources[0].manifest.endswith("curation/curated.parquet") and curated.seed == 1
    assert curated.target_cache.shared == str(run.export(run.base_arm).parent / "target_cache")
    same = Run(tmp_path / "qs2", {**run.settings, "distill": {**run.settings["distill"], "ablation_recipe": None}})
    assert _arm_config(same, same.base_arm, 0).name == "miniworld-pretrain-distilled-arkd"


def test_seeds_below_one_are_refused_in_one_line(tmp_path, capsys):
    from amoe.cli import main
    assert main(["quickstart", "--ablations", "--seeds", "0", "--out", str(tmp_path / "qs"), "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds must be >= 1" in err[0]
