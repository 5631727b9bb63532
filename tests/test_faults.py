"""The fault suite: what a bad day does to a run, and that nothing is lost or saved broken.

Each test reproduces a case that once lost work, shipped broken weights or ended in a traceback, and
asserts the outcome now: skipped and counted, refused with a message naming the fix, or resumed.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_standins import make_teachers, tiny_recipe, write_pool  # noqa: E402
from test_trustworthy_numbers import digits_root  # noqa: E402,F401 (fixture)

from distill.data.safe_pickle import UnsafePickleError, safe_loads  # noqa: E402
from distill.io import load_tensors  # noqa: E402
from distill.train import run_distillation  # noqa: E402
from distill.train.guard import (NonFiniteWeightsError, StepGuard, TrainingAborted, guarded_step,  # noqa: E402
                                 require_finite)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-world")
    write_pool(root, n_images=48, corrupt=(5,))
    return root


# ---------------------------------------------------------------- guarded optimisation

def test_the_guard_skips_nonfinite_and_spiking_steps():
    g = StepGuard(max_in_a_row=2, spike_factor=10.0, min_history=3)
    for norm in (1.0, 1.2, 0.9):
        assert g.verdict(1.0, norm) is None
        g.record(None, norm)
    assert "non-finite loss" in g.verdict(float("nan"), 1.0)
    assert "non-finite gradient norm" in g.verdict(1.0, float("inf"))
    assert "over 10 x the running median 1" in g.verdict(1.0, 50.0)    # a finite loss, a destructive update
    assert g.verdict(1.0, 5.0) is None
    g.record("spike", 50.0)
    g.record("spike", 50.0)
    assert g.exhausted and g.skipped == 2
    restored = StepGuard()
    restored.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert restored.state_dict() == g.state_dict()


def test_a_skipped_step_leaves_the_weights_untouched():
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(torch.randn(4, 3)).sum() * float("nan")).backward()
    reason, norm = guarded_step(opt, model.parameters(), float("nan"), 1.0, StepGuard())
    assert reason and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_with_nan_or_inf_are_never_written():
    with pytest.raises(NonFiniteWeightsError, match=r"1 tensor\(s\) hold NaN .*first: w.*last good checkpoint is X"):
        require_finite({"w": torch.tensor([1.0, float("inf")]), "ok": torch.ones(2)}, "the export", "X")
    require_finite({"w": torch.ones(2), "steps": torch.tensor([3])}, "the export")


def test_a_diverging_run_stops_naming_its_last_good_checkpoint_and_resumes_with_a_lower_lr(world, tmp_path):
    """Reproduced: with a diverging learning rate the distiller wrote checkpoints during the NaN steps
    (weights up to 1e30); the abort said "lower optim.lr" but the resume then refused the changed
    recipe, after overwriting config.json."""
    out = tmp_path / "run"
    run_distillation(tiny_recipe(world, steps=4), out, teachers=make_teachers())
    diverging = tiny_recipe(world, steps=10, optim__lr=1e4, optim__grad_clip=0.0,
                            robustness__max_skipped_in_a_row=2)
    with pytest.raises(TrainingAborted, match=r"2 skipped steps in a row .*last good checkpoint is .*step_00000004"
                                              r".*--set optim.lr="):
        run_distillation(diverging, out, teachers=make_teachers())
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4   # nothing saved mid-streak
    for folder in (out / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(v).all() for v in load_tensors(folder / "model.safetensors").values())
    # the suggested fix: the same command with a lower learning rate resumes from the good checkpoint
    export = run_distillation(tiny_recipe(world, steps=10, optim__lr=1e-3, optim__grad_clip=0.0,
                                          robustness__max_skipped_in_a_row=2), out, teachers=make_teachers())
    assert all(torch.isfinite(v).all() for v in load_tensors(export / "model.safetensors").values())
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [(h["event"], h["step"]) for h in history] == [("resumed_with_changes", 4)] * 2
    assert [h["changed"]["optim.lr"] for h in history] == [[3e-3, 1e4], [3e-3, 1e-3]]
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-3


def test_a_refused_resume_leaves_config_json_as_it_was(world, tmp_path):
    from distill.train.engine import ResumeRefused

    out = tmp_path / "run"
    run_distillation(tiny_recipe(world, steps=2), out, teachers=make_teachers())
    before = (out / "config.json").read_bytes()
    with pytest.raises(ResumeRefused, match="different recipe"):
        run_distillation(tiny_recipe(world, steps=4, loss__channel_reduction="sum"), out, teachers=make_teachers())
    assert (out / "config.json").read_bytes() == before


def test_a_resume_with_another_world_size_is_a_one_line_user_error(world, tmp_path):
    """Reproduced: a resume on another number of ranks was refused correctly, but as a traceback. It is
    now a `ResumeRefused` (an AmoeError, which the CLI prints as one line with exit code 2)."""
    from distill.errors import AmoeError, message
    from distill.train.engine import ResumeRefused

    out = tmp_path / "run"
    run_distillation(tiny_recipe(world, steps=2), out, teachers=make_teachers())
    trainer = sorted((out / "checkpoints").glob("step_*"))[-1] / "trainer.json"
    state = json.loads(trainer.read_text())
    state["world_size"] = 2       # as if written by a 2-rank run; this process is one rank
    trainer.write_text(json.dumps(state))
    with pytest.raises(ResumeRefused) as refused:
        run_distillation(tiny_recipe(world, steps=4), out, teachers=make_teachers())
    assert isinstance(refused.value, AmoeError)
    line = message(refused.value)
    assert "\n" not in line and "written with 2 ranks, this run has 1" in line and "use a new --out" in line


# ---------------------------------------------------------------- untrusted pickles

def test_a_tiny_pickle_cannot_allocate_memory_it_does_not_hold():
    """Reproduced: `bytearray` was an allowed global, so a 33-byte pickle allocated 256 MiB."""
    bomb = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x10\x85R."
    assert len(bomb) == 33
    with pytest.raises(UnsafePickleError, match="would allocate memory the file does not hold"):
        safe_loads(bomb)
    assert safe_loads(pickle.dumps([bytearray(b"ok")], protocol=2)) == ["ok"]   # py2-era data still loads


def test_deep_nesting_is_refused_not_a_recursion_error():
    """Reproduced: 100k nested lists gave a RecursionError."""
    n = 100_000
    deep = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    for decode in (True, False):
        with pytest.raises(UnsafePickleError, match="nested deeper than 200 levels"):
            safe_loads(deep, decode_bytes=decode)


def test_a_truncated_pickle_is_named_not_a_bare_eof(tmp_path):
    from distill.data.safe_pickle import safe_load

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": []}] * 50)[:-20])
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: not a readable pickle"):
        safe_load(path)


# ---------------------------------------------------------------- locks

def _hold(path: Path, kind: str = "run"):
    """A separate live process holding a lock, until the returned Popen is killed."""
    import subprocess

    code = ("import sys, time; from distill.io import FileLock, lock_run_folder\n"
            "l = lock_run_folder(sys.argv[1], 'test') if sys.argv[2] == 'run' else FileLock(sys.argv[1])\n"
            "assert l is not None and (sys.argv[2] == 'run' or l.acquire())\n"
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    """Reproduced: a trainer killed with SIGKILL left its DataLoader workers alive for a few seconds,
    and their inherited descriptor kept the run folder locked: the resume was refused."""
    import subprocess

    code = ("import os, sys, time; from distill.io import lock_run_folder\n"
            "l = lock_run_folder(sys.argv[1], 'test')\n"
            "if os.fork() == 0:\n"
            "    time.sleep(120); os._exit(0)\n"
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        from distill.io import FileLock
        assert not FileLock(tmp_path / ".lock").acquire()     # the parent holds it
        proc.kill()
        proc.wait()                                            # the forked child lives on
        assert FileLock(tmp_path / ".lock").acquire()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_two_distillations_on_one_folder_the_second_is_refused(world, tmp_path):
    """Reproduced: two distillations on one --out: the second resumed from the first's checkpoint,
    then crashed, and metrics.jsonl held steps 8-10 twice."""
    from distill.io import LockHeld

    out = tmp_path / "run"
    holder = _hold(out)
    try:
        with pytest.raises(LockHeld, match=rf"{out.name} is in use by a test \(pid {holder.pid} on "):
            run_distillation(tiny_recipe(world, steps=2), out, teachers=make_teachers())
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock file is still there, and is taken over
    assert (out / ".lock").exists()
    run_distillation(tiny_recipe(world, steps=2), out, teachers=make_teachers())
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_a_second_sweep_leaves_the_cells_another_sweep_holds(tmp_path):
    """Reproduced: two identical sweeps on one results folder both computed every cell."""
    from benchmarks.cache import FeatureCache
    from distill.results import Cell, result_path
    from benchmarks.sweep import Harness, run_cells
    from test_harness_fakes import fake_dataset_loader, fake_encoder_loader, fake_task_lookup, write_suite

    from benchmarks.suites import load_suite

    suite = load_suite(str(write_suite(tmp_path / "suite.json", tmp_path)))
    h = Harness(out_dir=tmp_path / "results", cache=FeatureCache(tmp_path / "cache"), show_progress=False,
                encoder_loader=fake_encoder_loader, task_lookup=fake_task_lookup, dataset_loader=fake_dataset_loader,
                variables={"fakeroot": str(tmp_path)})
    cells = [h.identify(Cell("fake:0", "nn", d)) for d in ("colours", "colours-big")]
    holder = _hold(h.out_dir / ".claims" / (cells[0].filename() + ".lock"), kind="cell")
    try:
        summary = run_cells(cells, suite, h)
    finally:
        holder.kill()
        holder.wait()
    assert (summary.busy, summary.ok) == (1, 1)
    assert not result_path(h.out_dir, cells[0]).exists() and result_path(h.out_dir, cells[1]).exists()
    summary = run_cells(cells, suite, h)          # the other sweep died: its cell is picked up now
    assert (summary.already_done, summary.ok, summary.busy) == (1, 1, 0)


# ---------------------------------------------------------------- failures that heal

def test_a_skip_caused_by_this_machine_is_retried_and_a_real_one_is_not(tmp_path):
    """Reproduced: a student whose teacher folder could not be found from the working directory had
    its zero-shot cells recorded `skipped`, and `skipped` counted as done: never retried."""
    import shutil

    from benchmarks.cache import FeatureCache
    from distill.results import Cell, existing_status, read_result, result_path
    from benchmarks.suites import load_suite
    from benchmarks.sweep import Harness, run_cells
    from distill.encoders.student import export_random_student
    from test_encoders_standins import make_dinov3_dir, make_siglip2_dir
    from test_harness_fakes import fake_dataset_loader

    run = tmp_path / "run"
    make_siglip2_dir(run / "teachers" / "siglip2", width=32)
    make_dinov3_dir(run / "teachers" / "dinov3", width=48)
    student = export_random_student(run / "student", config="tiny-moe", teachers=run / "teachers")
    suite_file = tmp_path / "suite.json"
    suite_file.write_text(json.dumps({"name": "s", "datasets": [
        {"id": "colours", "reader": "fakecls", "root": str(tmp_path), "roles": {"test": "val"},
         "tasks": ["zeroshot"]}]}))
    suite = load_suite(str(suite_file))
    h = Harness(out_dir=tmp_path / "results", cache=FeatureCache(tmp_path / "cache"), show_progress=False,
                dataset_loader=fake_dataset_loader)
    (cell,) = [h.identify(Cell(f"student:{student}", "zeroshot", "colours"))]
    shutil.move(str(run / "teachers"), str(tmp_path / "elsewhere"))
    with pytest.warns(UserWarning, match="could not be loaded"):
        run_cells([cell], suite, h)
    rec = read_result(result_path(h.out_dir, cell))
    assert rec["status"] == "skipped" and rec["retry"] and "retried next run" in rec["reason"]
    assert existing_status(h.out_dir, cell) is None
    shutil.move(str(tmp_path / "elsewhere"), str(run / "teachers"))
    summary = run_cells([cell], suite, h)
    assert summary.ok == 1 and read_result(result_path(h.out_dir, cell))["status"] == "ok"
    # a student without teachers lacks text by design: that skip is final
    bare = export_random_student(run / "bare", config="tiny-moe")
    (bare_cell,) = [h.identify(Cell(f"student:{bare}", "zeroshot", "colours"))]
    run_cells([bare_cell], suite, h)
    assert existing_status(h.out_dir, bare_cell) == "skipped"


def test_an_export_records_teacher_paths_that_resolve_from_anywhere(tmp_path, monkeypatch):
    """Reproduced: exports recorded the trainer's working-directory-relative teacher paths, so from
    another directory the text towers could not load."""
    from distill.io import relative_spec, resolve_spec

    (tmp_path / "teachers" / "siglip2").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = relative_spec("siglip2:teachers/siglip2?x=1", tmp_path / "runs" / "a" / "export", existing=True)
    assert spec == "siglip2:../../../teachers/siglip2?x=1"
    monkeypatch.chdir(tmp_path / "runs")
    assert resolve_spec(spec, tmp_path / "runs" / "a" / "export") == f"siglip2:{tmp_path / 'teachers' / 'siglip2'}?x=1"
    assert relative_spec("siglip2:google/siglip2-base", tmp_path, existing=True) == "siglip2:google/siglip2-base"   # a hub id


def test_events_are_truncated_on_resume_like_the_metrics(tmp_path):
    """Reproduced: events.jsonl was not truncated on resume, so a resumed run logged steps twice."""
    from distill.train.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        w.write({"step": step, "loss": 1.0})
        w.event({"step": step, "event": "step_skipped"})
    w.truncate_after(3)
    for name in ("metrics.jsonl", "events.jsonl"):
        assert [json.loads(x)["step"] for x in (tmp_path / name).read_text().splitlines()] == [1, 2, 3]


# ---------------------------------------------------------------- one error surface

@pytest.mark.parametrize("override, message", [
    ("teachers.5.relational=rkd", r"--set teachers.5.relational: teachers is a list of 2; '5' is not an index"),
    ("optim.lr.x=1", r"--set optim.lr.x: optim.lr is the value 0.002, which has no key 'x'"),
    ("data.patch_size=0", r"data.patch_size must be a positive int"),
])
def test_bad_overrides_are_one_line_not_a_traceback(override, message, tmp_path, capsys):
    """Reproduced: these ended in IndexError, TypeError and ZeroDivisionError tracebacks."""
    from amoe.cli import main

    assert main(["distill", "miniworld", "--out", str(tmp_path / "o"), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_a_damaged_latest_pointer_resumes_from_the_newest_complete_checkpoint(world, tmp_path):
    """Reproduced: an empty latest.json stopped the resume with a bare JSONDecodeError."""
    out = tmp_path / "run"
    run_distillation(tiny_recipe(world, steps=4), out, teachers=make_teachers())
    (out / "checkpoints" / "latest.json").write_text("")
    with pytest.warns(UserWarning, match=r"latest.json is unreadable .* resuming from .* step_00000004"):
        run_distillation(tiny_recipe(world, steps=6), out, teachers=make_teachers())
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


# ---------------------------------------------------------------- bad data is data, not a crash

def _pool_copy(world: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(world / "pool", tmp_path / "w" / "pool")
    return tmp_path / "w"


def _rewrite_first_image(shard: Path, make) -> None:
    """Replace the shard's first image member by make(original bytes)."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for m in tar:
            members.append((m.name, tar.extractfile(m).read()))
    first = next(i for i, (n, _) in enumerate(members) if n.endswith(".jpg"))
    members[first] = (members[first][0], make(members[first][1]))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_truncated_first_image_is_skipped_and_counted(world, tmp_path):
    """Reproduced: a truncated JPEG as the first pool image stopped the run (`OSError: image file is
    truncated`, from the teacher-width probe)."""
    w = _pool_copy(world, tmp_path)
    _rewrite_first_image(sorted((w / "pool" / "shards").glob("*.tar"))[0], lambda data: data[: len(data) // 2])
    run_distillation(tiny_recipe(w, steps=2), tmp_path / "run", teachers=make_teachers())
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["count/corrupt_images"] >= 2    # the generated corrupt image 5, and the truncated first one


def test_a_shard_cut_mid_member_gives_its_good_members(world, tmp_path):
    """Reproduced: a tar shard cut mid-member stopped distillation and `curate embed` with
    `tarfile.ReadError`."""
    from distill.curation.embed import pool_units, unit_images, unit_keys
    from distill.data.pool import TruncatedShardWarning
    from distill.train.pool import build_index

    w = _pool_copy(world, tmp_path)
    shard = sorted((w / "pool" / "shards").glob("*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.warns(TruncatedShardWarning, match=rf"{shard.name}: the shard ends early"):
        index = build_index(w / "pool" / "shards")
    assert 32 < len(index) < 48      # two whole shards and the first part of the cut one
    unit = next(u for u in pool_units(str(w / "pool" / "shards")) if u.path == str(shard))
    with pytest.warns(TruncatedShardWarning):
        keys, images = unit_keys(unit), [k for k, _ in unit_images(unit)]
    assert keys == images and 0 < len(keys) < 16
    with pytest.warns(TruncatedShardWarning):
        run_distillation(tiny_recipe(w, steps=2), tmp_path / "run", teachers=make_teachers())


def test_an_image_too_long_for_the_token_budget_is_narrowed_not_refused(world, tmp_path):
    """Reproduced: one extreme-aspect image whose clamped size exceeded max_tokens refused the whole
    run without naming it."""
    import io

    import numpy as np
    from PIL import Image

    from distill.train.config import load_config
    from distill.train.pool import TrainingPool

    def banner(_):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 4000, 3), 128, np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    w = _pool_copy(world, tmp_path)
    _rewrite_first_image(sorted((w / "pool" / "shards").glob("*.tar"))[0], banner)
    cfg = load_config(tiny_recipe(w, steps=2)).resolve_paths(tmp_path / "run")
    pool = TrainingPool(cfg.data.sources, cfg.data.patch_size, cfg.seed)
    wide = [it for it in map(pool.item, range(len(pool))) if it.entry.width == 4000]
    assert wide and all(it.tokens <= (it.resolution // 16) ** 2 for it in wide)
    run_distillation(tiny_recipe(w, steps=2), tmp_path / "run", teachers=make_teachers())


def test_teacher_training_and_world_generation_take_a_lock(tmp_path):
    """A second writer of the same world or teacher is refused naming the holder, never interleaved."""
    from benchmarks.world import make_world
    from distill.io import LockHeld, lock_run_folder
    from distill.teachers import train_teachers
    from test_tasks_e2e import WORLD

    held = lock_run_folder(tmp_path, "test", name=".w.lock")
    with pytest.raises(LockHeld, match="in use by a test"):
        make_world(tmp_path / "w", size=WORLD, workers=1, progress=False)
    held.release()
    make_world(tmp_path / "w", size=WORLD, workers=1, progress=False)   # free again: it runs
    held = lock_run_folder(tmp_path / "t", "test", name=".siglip2.lock")
    with pytest.raises(LockHeld, match="in use by a test"):
        train_teachers(tmp_path / "w", tmp_path / "t", fast=True, only=["siglip2"], progress=False,
                       siglip2={"use_pretrain": False})   # this tiny world has no pretrain part
    held.release()
    assert not list((tmp_path / "t").glob(".siglip2.*partial"))   # refused before touching the folder


# ---------------------------------------------------------------- benchmarks: bad data is data

def test_unreadable_evaluation_images_are_left_out_named_and_noted(tmp_path, capsys, digits_root):
    """Before: one undecodable image failed every cell of its dataset. Now the harness names the files,
    leaves their items out (every later cell on that dataset too, without another failed pass), records
    them in the result and the leaderboard notes them; the numbers equal those of the data without them."""
    import shutil

    from test_trustworthy_numbers import pixel_encoder, sweep
    from benchmarks.leaderboard import build

    clean, broken = tmp_path / "clean", tmp_path / "broken"
    shutil.copytree(digits_root, clean)
    shutil.copytree(digits_root, broken)
    val = broken / "folder" / "val"
    truncated, garbage = sorted((val / "3").glob("*.png"))[0], sorted((val / "7").glob("*.png"))[1]
    truncated.write_bytes(truncated.read_bytes()[:40])
    garbage.write_bytes(b"not an image")
    ade_val = sorted((broken / "ade" / "ADEChallengeData2016" / "images" / "validation").iterdir())[0]
    ade_val.write_bytes(ade_val.read_bytes()[:30])
    # the reference: the same data with those files removed
    for f in (truncated, garbage, ade_val):
        (clean / f.relative_to(broken)).unlink()
    (clean / "ade" / "ADEChallengeData2016" / "annotations" / "validation" / (ade_val.stem + ".png")).unlink()
    tasks = ["knn", "zeroshot", "segmentation"]
    enc = pixel_encoder(clean)
    for run in ("ref", "got"):
        (tmp_path / run).mkdir()
    _, _, ref = sweep(tmp_path / "ref", enc, tasks, root=clean)
    _, _, got = sweep(tmp_path / "got", enc, tasks, root=broken)
    for key in ref:
        assert got[key]["status"] == "ok", got[key].get("reason")
        assert got[key]["metrics"] == pytest.approx(ref[key]["metrics"], abs=1e-9), key
    assert got[("knn", "digits")]["dataset"]["unreadable"] == {"test": ["val/3/" + truncated.name,
                                                                        "val/7/" + garbage.name]}
    assert got[("segmentation", "digit-strokes")]["dataset"]["unreadable"] == {
        "test": ["ADEChallengeData2016/images/validation/" + ade_val.name]}
    # found once per dataset: the zero-shot cell left them out up front
    assert capsys.readouterr().err.count("[amoe bench] digits: 2 unreadable image(s) left out") == 1
    build(tmp_path / "got" / "results", tmp_path / "lb", reported_csv=None)
    notes = (tmp_path / "lb" / "digits.md").read_text()
    assert "2 unreadable test image(s) left out (val/3/" in notes


def test_a_limited_segmentation_split_reads_the_labels_of_its_own_items(digits_root):
    """Found with the case above: `LimitedDataset` forwarded `load_label(i)` to the whole split with the
    subset's index, so a `--limit` segmentation cell scored its images against other images' labels."""
    import numpy as np

    from benchmarks.context import LimitedDataset
    from distill.data import load_dataset

    full = load_dataset("ade20k", str(digits_root / "ade"), "validation")
    subset = LimitedDataset(full, 7)
    assert subset.indices != list(range(7))
    for i in range(len(subset)):
        assert np.array_equal(subset.load_label(i), subset[i][1])
        assert np.array_equal(subset.load_label(i), full.load_label(subset.indices[i]))


def test_the_teachers_skip_and_count_an_unreadable_training_image(tmp_path, capsys):
    """Before: one undecodable classification-train image stopped teacher training
    (`UnreadableImageError` from the imagefolder reader)."""
    from PIL import Image

    from distill.teachers.data import WorldData

    train = tmp_path / "classification" / "train"
    for c, colour in (("red_circle", (200, 30, 30)), ("blue_square", (30, 30, 200))):
        (train / c).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (16, 16), colour).save(train / c / f"{k}.jpg")
    (train / "blue_square" / "1.jpg").write_bytes(b"\xff\xd8 cut short")
    data = WorldData(tmp_path, progress=False)
    pairs = data.pairs(use_pool=False)
    assert len(pairs) == 5 and [Path(f).name for f in data.unreadable] == ["1.jpg"]
    assert "1 unreadable image(s) skipped" in capsys.readouterr().err


def test_one_staging_rule_for_every_folder_writer(tmp_path):
    """`distill.io.staging_folder` / `publish_folder` (world generation, the teachers, the stand-in LM):
    work happens in a hidden `.NAME[.WRITER].partial` beside the target; a killed writer's work is
    reused only for the same identity; publishing is one rename that replaces an older target."""
    from distill.io import publish_folder, staging_folder

    target = tmp_path / "world"
    work = staging_folder(target, {"seed": 1})
    assert work == tmp_path / ".world.partial" and not target.exists()
    (work / "part-a").write_text("done")
    again = staging_folder(target, {"seed": 1})                 # killed, restarted with the same identity
    assert again == work and (again / "part-a").read_text() == "done"
    other = staging_folder(target, {"seed": 2})                 # another identity: start over
    assert other == work and not (other / "part-a").exists()
    (other / "world.json").write_text("{}")
    target.mkdir()
    (target / "old.txt").write_text("stale")
    publish_folder(other, target)
    assert sorted(p.name for p in target.iterdir()) == ["world.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]     # no work folder nor stamp left
    # per-writer work folders: a dead writer's is removed when the next one starts
    dead = staging_folder(tmp_path / "siglip2", writer="111-aa")
    live = staging_folder(tmp_path / "siglip2", writer="222-bb")
    assert live.name == ".siglip2.222-bb.partial" and not dead.exists()
