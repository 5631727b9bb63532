"""Mini-world teachers: a SigLIP2-architecture image-text model and a DINOv3-architecture SSL model.

    from distill.teachers import train_teachers, teachers_complete
    train_teachers("WORLD", "TEACHERS")            # ~10 min on 2 CPU cores; fast=True: < 1 min
    teachers_complete("TEACHERS")                   # True once both dirs carry their marker

Output, loadable exactly like hub models (offline):
    TEACHERS/siglip2/  Siglip2Model + Siglip2Processor (image processor + trained tokenizer)
    TEACHERS/dinov3/   DINOv3ViTModel + DINOv3ViTImageProcessor (ImageNet mean/std)
    TEACHERS/<name>/train_log.json, TEACHERS/<name>/COMPLETE.json (written last)
    TEACHERS/.<name>.run/checkpoints/   while training: the loop's checkpoints (removed when done)

Under torchrun (`torchrun --nproc_per_node N -m amoe.cli teachers train ...`, CPU processes over
gloo) each teacher trains data-parallel over the N ranks, one teacher after the other: every global
batch is split into N blocks and the gradients averaged (DDP through `distill.train.parallelize`),
with the contrastive losses gathering the other ranks' rows, so the run trains what one process
trains (up to float reduction order). The global batch sizes must split evenly over N.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from distill.distributed import setup, teardown
from distill.io import lock_run_folder, portable, staging_folder, write_json_atomic
from distill.train.checkpoint import writer_token

from .common import (LOG, MARKER, TEACHERS, LoopCheckpoints, Ranks, TeacherError, finish_dir, is_complete, load_recipe,
                     machine, teacher_fingerprint)
from .data import WorldData, check_world

__all__ = ["train_teachers", "teachers_complete", "load_recipe", "TeacherError", "TEACHERS", "MARKER"]


def teachers_complete(out: str | os.PathLike) -> bool:
    """True only when every teacher dir under `out` carries its completion marker."""
    return all(is_complete(Path(out) / name) for name in TEACHERS)


def train_teachers(world: str | os.PathLike, out: str | os.PathLike, fast: bool = False, seed: int = 0,
                   progress: bool = True, only: list[str] | None = None, **overrides) -> dict:
    """Train the teachers on the mini-world at `world` into `out`; returns {name: train log}.

    A teacher whose dir is complete for the same recipe, world and seed is skipped (a killed run
    resumes per teacher); one trained under other settings is retrained. `overrides` are recipe
    overrides, e.g. `siglip2={"steps": 100}` or `threads=2` (see recipes.json)."""
    world_id = check_world(world)
    recipe = load_recipe(fast=fast, **overrides)
    names = list(only or TEACHERS)
    bad = [n for n in names if n not in TEACHERS]
    if bad:
        raise TeacherError(f"unknown teacher(s) {bad}; known: {', '.join(TEACHERS)}")
    wanting = [n for n in names if recipe[n].get("use_pretrain")]
    if wanting and not (Path(world) / "pretrain").is_dir():
        readers = f"{' and '.join(wanting)} recipe" + (" reads" if len(wanting) == 1 else "s read")
        raise TeacherError(f"mini-world '{world}' has no pretrain part, which the {readers} "
                           f"(worlds made before generator 1.1, or a size config without `pretrain`); "
                           f"regenerate it with `amoe world make --out {world} --size small --force`, or train "
                           f"without it: " + " ".join(f"--set {n}.use_pretrain=false" for n in wanting))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not is_complete(out / n, teacher_fingerprint(n, recipe, world_id, seed))]
    ranks = Ranks(setup("cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    if recipe["parallel"] and len(todo) > 1 and not ranks.distributed:
        return _train_parallel(world, out, names, todo, fast, seed, progress, overrides)
    threads_before = torch.get_num_threads()
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe["threads"]))
    try:
        return _train_serial(world, out, names, recipe, world_id, fast, seed, progress and ranks.main, ranks)
    finally:
        torch.set_num_threads(threads_before)
        teardown(ranks.info)


def _train_serial(world, out: Path, names: list[str], recipe: dict, world_id: dict, fast: bool, seed: int,
                  progress: bool, ranks: Ranks) -> dict:
    data = WorldData(Path(world), progress=progress)
    report = {}
    for name in names:
        fp = teacher_fingerprint(name, recipe, world_id, seed)
        final = out / name
        if is_complete(final, fp):
            report[name] = {"status": "skipped (complete)"}
            continue
        # one writer per teacher: a second `teachers train` on this folder is refused, not interleaved;
        # under torchrun the main rank holds the lock and writes, the others compute with it
        lock = ranks.on_main(lambda: lock_run_folder(out, f"{name} teacher training", name=f".{name}.lock"))
        try:
            writer = writer_token()   # names this writer's work folders (collective: every rank asks)
            # a work folder of its own (one of a writer that died is removed: the lock says none is alive)
            partial = staging_folder(final, writer=writer) if ranks.main else None
            report[name] = _train_one(data, name, recipe, partial=partial, final=final, fp=fp, world=world,
                                      world_id=world_id, fast=fast, seed=seed, progress=progress, ranks=ranks,
                                      writer=writer)
        finally:
            if lock is not None:
                lock.release()
        ranks.barrier()   # every rank sees the finished teacher before the next one starts
    return report


def _train_one(data, name: str, recipe: dict, partial: Path | None, final: Path, fp: str, world, world_id: dict,
               fast: bool, seed: int, progress: bool, ranks: Ranks, writer: str) -> dict:
    """Train teacher `name` into `partial`, log it, and move it into place (marker last); ranks other
    than the main one (`partial` None) train alongside and write nothing."""
    t0, c0 = time.perf_counter(), time.process_time()
    if name == "siglip2":
        from . import siglip2 as trainer
    else:
        from . import dinov3 as trainer
    run = final.parent / f".{name}.run"        # mid-training checkpoints: a killed teacher resumes from them
    info = trainer.train(data, recipe[name], partial, seed=seed, progress=progress,
                         checkpoints=LoopCheckpoints(run, fp, recipe["checkpoint_every"], ranks, writer), ranks=ranks)
    if not ranks.main:
        return info
    info.update({"teacher": name, "fast": fast, "seed": seed, "recipe": recipe[name], "world": str(world),
                 "world_id": world_id, "machine": machine(), "ranks": ranks.world, "wall_seconds": round(time.perf_counter() - t0, 2),
                 "cpu_seconds": round(time.process_time() - c0, 2),  # honest under a shared CPU
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_json_atomic(partial / LOG, portable(info, final))   # paths relative to the teacher folder
    _write_metrics(partial, info)
    finish_dir(partial, final, {"teacher": name, "fingerprint": fp, "finished": info["finished"]})
    shutil.rmtree(run, ignore_errors=True)
    return info


def _write_metrics(folder: Path, info: dict) -> None:
    """The per-step losses as every trainer logs them (`metrics.jsonl`, read with
    `distill.train.metrics.read_metrics`): one line per step, one key per loss term."""
    from distill.train.metrics import MetricsWriter

    series = {("loss" if k == "losses" else k[:-len("_losses")]): v for k, v in info.items()
              if k.endswith("losses") and isinstance(v, list)}
    writer = MetricsWriter(folder, tensorboard=False)
    for i in range(max((len(v) for v in series.values()), default=0)):
        writer.write({"step": i + 1, **{k: v[i] for k, v in series.items() if i < len(v)}})
    writer.close()


def _train_parallel(world, out: Path, names: list[str], todo: list[str], fast: bool, seed: int, progress: bool,
                    overrides: dict) -> dict:
    """One spawned process per teacher, one torch thread each (distill.jobs); a failure in either is
    raised here once both have ended."""
    from distill.jobs import side_by_side

    overrides = {**overrides, "parallel": False, "threads": overrides.get("threads") or 1}
    report = {n: {"status": "skipped (complete)"} for n in names if n not in todo}
    done = side_by_side([(train_teachers, (str(world), str(out), fast, seed, progress, [n]), overrides) for n in todo],
                        workers=len(todo), threads=int(overrides["threads"]))
    for n, result in zip(todo, done):
        report[n] = result[n]
    return {n: report[n] for n in names}
