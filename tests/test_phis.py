"""PHI-S (distill/phis.py): Hadamard constructions, standardised statistics, exact inverse, files,
2-process gloo all-reduce == 1 process, and the trainer's fit / checkpoint / resume path."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distill.phis import (NoHadamardError, PhiS, PhiSAccumulator, hadamard, hadamard_construction,
                          hadamard_signs, main)

sys.path.insert(0, str(Path(__file__).parent))


def _features(n: int, c: int, seed: int = 0, offset: float = 5.0) -> torch.Tensor:
    """Correlated (rotated principal axes), strongly anisotropic features with a large mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(-1, 0.5, c, dtype=torch.float64)
    channel = torch.logspace(-1, 1, c, dtype=torch.float64)        # per-channel scale after mixing
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    return (((z * spectrum) @ mix.T) * channel + offset).float()


# ---------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 64, 96, 128, 384, 768, 1024, 1152])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # every entry +-1/sqrt(n): this is what spreads each principal variance evenly over the channels
    assert torch.equal(hadamard_signs(n).abs(), torch.ones(n, n, dtype=torch.int8))


def test_constructions_for_teacher_widths():
    assert hadamard_construction(1024) == "sylvester(1024)"
    assert hadamard_construction(1152) == "sylvester(32)xpaley2(17)"      # 1152 = 32 x 36
    assert hadamard_construction(12) == "paley1(11)"
    assert hadamard_construction(24) == "sylvester(2)xpaley1(11)"
    assert hadamard_construction(1280) == "sylvester(64)xpaley1(19)"


@pytest.mark.parametrize("n", [3, 6, 10, 52])
def test_width_without_construction_names_the_width(n):
    with pytest.raises(NoHadamardError, match=rf"order {n}\b.*phis.enabled=false"):
        hadamard(n)
    with pytest.raises(NoHadamardError, match=rf"order {n}\b"):
        PhiS.fit(torch.randn(20, n))


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("c", [24, 32, 36])
def test_standardised_statistics_are_isotropic_with_unit_variance(c):
    x = _features(4000, c, seed=c)
    raw_var = x.double().var(0, unbiased=False)
    assert raw_var.max() / raw_var.min() > 100          # the input really is anisotropic
    phis = PhiS.fit(x)
    y = phis.transform(x).double()
    assert y.mean(0).abs().max() < 1e-4
    var = y.var(0, unbiased=False)
    torch.testing.assert_close(var, torch.ones(c, dtype=torch.float64), atol=1e-4, rtol=0)
    # the spectrum is only rescaled (no whitening): cov(y) = H diag(lambda / alpha^2) H^T
    lam = torch.linalg.eigvalsh(torch.cov(x.double().T, correction=0)).flip(0)
    torch.testing.assert_close(phis.eigvals, lam, atol=1e-6 * float(lam.max()), rtol=1e-6)
    torch.testing.assert_close(phis.alpha ** 2, lam.mean(), rtol=1e-10, atol=0)
    ev_y = torch.linalg.eigvalsh(torch.cov(y.T, correction=0)).flip(0)
    torch.testing.assert_close(ev_y, lam / lam.mean(), atol=1e-4, rtol=1e-4)


def test_matches_the_formula_computed_independently():
    """y = alpha^-1 H U^T (x - mu) with U, lambda from numpy's covariance (sign-free comparison: the
    per-sample Gram matrices of y and of the formula's output agree whatever the eigenvector signs)."""
    import numpy as np

    x = _features(600, 12, seed=3)
    xn = x.double().numpy()
    lam, u = np.linalg.eigh(np.cov(xn.T, bias=True))
    alpha = math.sqrt(lam.clip(min=0).mean())
    h = hadamard(12).numpy()
    ref = (xn - xn.mean(0)) @ u @ h.T / alpha
    y = PhiS.fit(x).transform(x.double()).numpy()
    np.testing.assert_allclose(y @ y.T, ref @ ref.T, atol=1e-8)
    np.testing.assert_allclose((y ** 2).mean(0), np.ones(12), atol=1e-9)


def test_rank_deficient_fit_stays_invertible():
    x = _features(10, 32, seed=1).double()             # fewer samples than channels
    phis = PhiS.fit(x)
    y = phis.transform(x)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(32, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(phis.inverse(y), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("c", [24, 1152])
def test_inverse_of_transform_is_identity(c):
    x = _features(64 if c > 100 else 500, c, seed=2).double()
    phis = PhiS.fit(x)
    torch.testing.assert_close(phis.inverse(phis.transform(x)), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(phis.transform(phis.inverse(x)), x, atol=1e-10, rtol=0)
    x32 = x.float()
    torch.testing.assert_close(phis.inverse(phis.transform(x32)), x32, atol=1e-4, rtol=1e-5)


def test_shapes_dtypes_and_width_errors():
    x = _features(200, 16, seed=4)
    phis = PhiS.fit(x.reshape(10, 20, 16))              # leading dims are flattened
    y = phis.transform(x.reshape(4, 50, 16))
    assert y.shape == (4, 50, 16) and y.dtype == torch.float32
    yb = phis.transform(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), phis.transform(x.bfloat16().float()), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="width 16, got features of width 8"):
        phis.transform(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="at least 2"):
        PhiS.fit(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="zero variance"):
        PhiS.fit(torch.ones(5, 16))
    with pytest.raises(ValueError, match="NaN"):
        PhiS.fit(torch.full((5, 16), float("nan")))


def test_streaming_accumulator_equals_one_shot_fit():
    x = _features(1000, 24, seed=5)
    acc = PhiSAccumulator()
    for chunk in torch.split(x, [1, 300, 699]):
        acc.update(chunk)
    a, b = acc.finish(), PhiS.fit(x)
    assert a.n == b.n == 1000
    for name in ("mean", "eigvecs", "eigvals", "alpha"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_is_exact(tmp_path):
    x = _features(300, 36, seed=6)
    phis = PhiS.fit(x)
    f = tmp_path / "t.phis.safetensors"
    phis.save(f)
    back = PhiS.load(f)
    assert back.n == 300 and back.width == 36
    for name in ("mean", "eigvecs", "eigvals", "alpha", "hadamard_signs"):
        assert torch.equal(getattr(back, name), getattr(phis, name)), name
    assert torch.equal(back.transform(x), phis.transform(x))
    assert [p.name for p in tmp_path.iterdir()] == ["t.phis.safetensors"]       # no temp files left


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    from distill.io import load_tensors, save_tensors_atomic

    other = tmp_path / "model.safetensors"
    save_tensors_atomic(other, {"w": torch.zeros(2)}, metadata={"format": "amoe-student"})
    with pytest.raises(ValueError, match="not a PHI-S file"):
        PhiS.load(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PhiS.load(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    PhiS.fit(_features(50, 8)).save(good)
    t = load_tensors(good)
    t["hadamard"][0, 0] = -t["hadamard"][0, 0]
    bad = tmp_path / "bad.safetensors"
    save_tensors_atomic(bad, t, metadata={"format": "amoe-phis", "version": "1", "n": "50"})
    with pytest.raises(ValueError, match="not orthogonal"):
        PhiS.load(bad)


def test_cli_hadamard_and_perf(capsys):
    assert main(["hadamard", "1152", "6"]) == 0
    out = capsys.readouterr().out
    assert "1152: sylvester(32)xpaley2(17)" in out and "order 6" in out
    assert main(["perf", "--n", "256", "--width", "24", "--repeats", "1", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["width"] == 24 and r["fit_s"] > 0 and abs(r["per_channel_var_max"] - 1) < 1e-3
    assert r["roundtrip_max_abs_err"] < 1e-3


# ---------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = _features(500, 24, seed=7)
        shard = x[:320] if rank == 0 else x[320:]                  # unequal shards
        acc = PhiSAccumulator()
        for chunk in torch.split(shard, 64):
            acc.update(chunk)
        acc.all_reduce().finish().save(Path(out) / f"rank{rank}.safetensors")
        # a rank that saw no data still takes part when it knows the width
        empty = PhiSAccumulator(width=24)
        if rank == 0:
            empty.update(x)
        empty.all_reduce().finish().save(Path(out) / f"empty{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_all_reduce_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    single = PhiS.fit(_features(500, 24, seed=7))
    for f in ("rank0", "rank1", "empty0", "empty1"):
        got = PhiS.load(tmp_path / f"{f}.safetensors")
        assert got.n == 500, f
        for name in ("mean", "eigvals", "alpha", "eigvecs"):
            torch.testing.assert_close(getattr(got, name), getattr(single, name), atol=1e-9, rtol=1e-9)


def test_all_reduce_without_process_group_is_a_no_op():
    x = _features(40, 8)
    acc = PhiSAccumulator().update(x)
    assert acc.all_reduce() is acc and acc.n == 40


# ---------------------------------------------------------------------------- trainer integration
def test_trainer_fits_standardises_and_resume_restores_phis_exactly(tmp_path):
    """The trainer runs with phis.enabled through PhiS; a resumed run standardises with the statistics
    stored in the checkpoint (not whatever OUT/phis holds by then) and matches an uninterrupted run."""
    from train_standins import make_teachers, tiny_recipe, write_pool

    from distill.io import load_tensors
    from distill.train import run_distillation
    from distill.train.metrics import read_metrics

    world = tmp_path / "world"
    write_pool(world, n_images=48, corrupt=(5,))
    # constant lr: a 4-step run then resumed to 6 steps follows the same schedule as 6 steps at once
    recipe = lambda steps: tiny_recipe(world, steps=steps, phis__enabled=True,  # noqa: E731
                                       checkpoint__every_steps=2, optim__schedule="constant")
    run_distillation(recipe(6), tmp_path / "full", teachers=make_teachers())
    out = tmp_path / "resumed"
    run_distillation(recipe(4), out, teachers=make_teachers())
    files = sorted(p.name for p in (out / "phis").iterdir())
    assert files == [f"{t}.{k}.safetensors" for t, k in
                     (("dinov3", "patches"), ("dinov3", "registers"), ("dinov3", "summary"),
                      ("siglip2", "patches"), ("siglip2", "summary"))]
    teachers = make_teachers()
    p = PhiS.load(out / "phis" / "siglip2.patches.safetensors")
    assert p.width == 32 and p.n > 100
    fitted = {f: load_tensors(out / "phis" / f) for f in files}
    # replace OUT/phis with different statistics: only the checkpoint's copy can give equal losses
    for f in files:
        w = load_tensors(out / "phis" / f)["mean"].shape[0]
        PhiS.fit(_features(64, w, seed=11, offset=-3.0)).save(out / "phis" / f)
    run_distillation(recipe(6), out, teachers=teachers)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-6, abs=1e-7), a["step"]
    ck = sorted((out / "checkpoints").glob("step_*"))[-1]
    for f in files:
        for src in (ck / "phis" / f, out / "export" / "phis" / f):
            got = load_tensors(src)
            for k, v in fitted[f].items():
                assert torch.equal(got[k], v), (src, k)


def _ddp_trainer_worker(rank: int, port: int, recipe: dict, out: str) -> None:
    from train_standins import make_teachers

    from distill.train import run_distillation

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    run_distillation(recipe, out, teachers=make_teachers())


@pytest.mark.distributed
def test_two_rank_trainer_standardises_like_one_rank(tmp_path):
    """Each rank streams its half of the fit images, the sums are all-reduced, rank 0 writes the files
    and both ranks load them: the statistics equal one rank's fit (to float64 round-off: the sums add
    in another order), so the losses and gradient norms of 2 ranks equal those of 1 rank on the same
    global batch."""
    from train_standins import make_teachers, tiny_recipe, write_pool

    from distill.train import run_distillation
    from distill.train.metrics import read_metrics

    world = tmp_path / "world"
    write_pool(world, n_images=48, corrupt=(5,))
    one = tiny_recipe(world, steps=2, phis__enabled=True, batching__seqs_per_rank=4)
    two = tiny_recipe(world, steps=2, phis__enabled=True, batching__seqs_per_rank=2)
    run_distillation(one, tmp_path / "one", teachers=make_teachers())
    mp.start_processes(_ddp_trainer_worker, args=(_free_port(), two, str(tmp_path / "two")), nprocs=2,
                       join=True, start_method="spawn")
    for f in (tmp_path / "one" / "phis").iterdir():
        a, b = PhiS.load(f), PhiS.load(tmp_path / "two" / "phis" / f.name)
        assert a.n == b.n, f.name
        for name in ("mean", "eigvals", "alpha"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-9, rtol=1e-9)
        # eigenvectors of (near-)equal eigenvalues may rotate among themselves: compare the maps
        x = _features(16, a.width, seed=3)
        torch.testing.assert_close(a.transform(x.double()), b.transform(x.double()), atol=1e-6, rtol=1e-6)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        for k in ("loss/total", "loss/siglip2/patch", "loss/dinov3/register", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_the_streamed_fit_equals_a_fit_on_every_teacher_output(tmp_path):
    """The trainer never holds the raw outputs: its streamed, accumulated fit equals PhiS.fit on the
    concatenated outputs of the same images, computed here by hand."""
    from train_standins import make_teachers, tiny_recipe, write_pool

    from distill.train.config import load_config
    from distill.train.engine import Distiller
    from distill.train.phis_fit import fit_order
    from distill.train.pool import read_image

    world = tmp_path / "world"
    write_pool(world, n_images=40)
    cfg = load_config(tiny_recipe(world, phis__enabled=True, phis__fit_images=20))
    trainer = Distiller(cfg, tmp_path / "run", teachers=make_teachers())
    items = [trainer.pool.item(i) for i in fit_order(trainer)]
    assert len(items) == 20
    runner = trainer.teachers["dinov3"]
    raws = runner.raw([read_image(it.entry) for it in items], [it.entry.key for it in items],
                      [it.resolution for it in items])
    by_hand = {"summary": torch.stack([r.summary for r in raws]), "patches": torch.cat([r.patches for r in raws]),
               "registers": torch.cat([r.registers[[0, 2, 3]] for r in raws])}   # register 1 stays raw
    for kind, x in by_hand.items():
        got, want = runner.standardizers[kind], PhiS.fit(x)
        assert got.n == want.n == x.shape[0], kind
        torch.testing.assert_close(got.mean, want.mean, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(got.eigvals, want.eigvals, atol=1e-9, rtol=1e-9)
    trainer.close()


def test_stage2_carries_the_stage1_phis_unless_told_to_refit(tmp_path):
    """A run started from an export (student.init_from) standardises with the export's PHI-S: its heads
    were trained against that basis. phis.refit=true fits afresh (here: on another seed's sample)."""
    from train_standins import make_teachers, tiny_recipe, write_pool

    from distill.io import load_tensors
    from distill.train import run_distillation

    world = tmp_path / "world"
    write_pool(world, n_images=40)
    run_distillation(tiny_recipe(world, steps=2, phis__enabled=True), tmp_path / "s1", teachers=make_teachers())
    export = tmp_path / "s1" / "export"
    stage2 = lambda **kw: tiny_recipe(world, steps=1, seed=5, phis__enabled=True,  # noqa: E731
                                      student__init_from=str(export), **kw)
    run_distillation(stage2(), tmp_path / "s2", teachers=make_teachers())
    files = sorted(p.name for p in (export / "phis").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "s2" / "phis").iterdir())
    for f in files:
        a, b = load_tensors(export / "phis" / f), load_tensors(tmp_path / "s2" / "phis" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    events = [json.loads(line) for line in (tmp_path / "s2" / "events.jsonl").read_text().splitlines()]
    origin = next(e["origin"] for e in events if e.get("event") == "phis")
    assert origin == {"siglip2": "carried from student.init_from", "dinov3": "carried from student.init_from"}
    run_distillation(stage2(phis__refit=True), tmp_path / "refit", teachers=make_teachers())
    a = load_tensors(export / "phis" / "siglip2.patches.safetensors")
    b = load_tensors(tmp_path / "refit" / "phis" / "siglip2.patches.safetensors")
    assert not torch.equal(a["mean"], b["mean"])
