"""Fit, carry over or reload the PHI-S standardisers of every teacher before training starts.

Per teacher three standardisers: summary vectors, patch tokens and register tokens (the registers
listed in `phis.exclude_registers` are left raw -- the paper skips DINOv3's multimodal second
register). They are fitted on teacher outputs of the first `phis.fit_images` images of a fixed
permutation of the pool, **streamed**: each rank runs its share of those images through the teacher
and adds them to float64 sums (`PhiSAccumulator`), the sums are all-reduced, and rank 0 writes the
files to OUT/phis/ that every rank then loads. Memory is O(C^2) per teacher and kind, whatever the
number of images (the paper's 100k images would be ~118 GB of raw SigLIP2 patches if kept).

A run that starts from an exported student (`student.init_from`, stage 2 from stage 1) carries the
statistics stored in that export by default (`phis.refit: false`): its heads were trained against
that target basis, and a fresh fit on another sample would rotate it. Teachers the export lacks are
fitted. The statistics are also stored in every checkpoint, so a resume reuses them exactly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distill.distributed import barrier
from distill.io import atomic_path
from distill.train.pool import read_image

KINDS = ("summary", "patches", "registers")
_CHUNK = 16          # images per teacher forward


def _phis_classes():
    try:
        from distill.phis import PhiS, PhiSAccumulator
    except ImportError as e:
        raise RuntimeError("phis.enabled=true needs distill.phis (PHI-S); it is not importable here. "
                           "Set --set phis.enabled=false to train on raw teacher targets") from e
    return PhiS, PhiSAccumulator


def _file(folder: Path, teacher: str, kind: str) -> Path:
    return folder / f"{teacher}.{kind}.safetensors"


def _complete(folder: Path, teacher: str) -> bool:
    return all(_file(folder, teacher, k).exists() for k in KINDS[:2])


def fit_order(trainer) -> list[int]:
    """The pool indices PHI-S is fitted on: a seeded permutation's first `fit_images` (every rank
    computes the same list and takes every world_size-th entry from its rank on). Drawn without
    permuting the whole pool, which at the paper's 213M images would be gigabytes."""
    import numpy as np

    n = len(trainer.pool)
    rng = np.random.default_rng(trainer.cfg.seed + 4242)
    return rng.choice(n, size=min(trainer.cfg.phis.fit_images, n), replace=False).tolist()


@torch.no_grad()
def _accumulate(trainer, runner, indices: list[int], progress) -> dict:
    """Float64 sums of this rank's share of the teacher's outputs (corrupt images skipped, counted)."""
    _, PhiSAccumulator = _phis_classes()
    pool = trainer.pool
    accs = {k: PhiSAccumulator() for k in KINDS}
    excl = set(trainer.cfg.phis.exclude_registers)
    for s in range(0, len(indices), _CHUNK):
        items, imgs = [], []
        for i in indices[s:s + _CHUNK]:
            item = pool.item(i)
            try:
                imgs.append(read_image(item.entry))
                items.append(item)
            except Exception:
                trainer.counters["corrupt_images"] += 1
        progress(len(indices[s:s + _CHUNK]))
        if not items:
            continue
        raws = runner.raw(imgs, [it.entry.key for it in items], [it.resolution for it in items])
        for r in raws:
            accs["summary"].update(r.summary[None])
            accs["patches"].update(r.patches)
            if r.registers is not None:
                keep = [j for j in range(r.registers.shape[0]) if j not in excl]
                if keep:
                    accs["registers"].update(r.registers[keep])
    return accs


def _all_reduce(accs: dict) -> dict:
    """SUM every kind's sums over the ranks. A rank that saw no rows of a kind (its share was all
    corrupt) still takes part: the widths are agreed first (a MAX over ranks; 0 = no rank saw it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return accs
    _, PhiSAccumulator = _phis_classes()
    widths = torch.tensor([acc.width or 0 for acc in accs.values()], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        widths = widths.cuda()
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)
    out = {}
    for (kind, acc), width in zip(accs.items(), widths.tolist()):
        if width:
            out[kind] = (acc if acc.width is not None else PhiSAccumulator(width=width)).all_reduce()
    return out


def _carry_from_init(trainer, folder: Path, names: list[str]) -> list[str]:
    """Copy the init export's PHI-S files of those `names` it has into OUT/phis (rank 0; each file
    atomically, so a kill mid-copy never leaves a file that looks complete); -> the names carried."""
    src = Path(trainer.cfg.student.init_from) / "phis"
    carried = []
    for name in names:
        if _complete(src, name):
            folder.mkdir(parents=True, exist_ok=True)
            for kind in KINDS:
                if _file(src, name, kind).exists():
                    with atomic_path(_file(folder, name, kind)) as tmp:
                        shutil.copyfile(_file(src, name, kind), tmp)
            carried.append(name)
    return carried


def fit_or_load_phis(trainer) -> None:
    """Every rank calls this. Rank 0 decides per teacher (already in OUT/phis, carried from the init
    export, or to fit) and broadcasts the decision; all ranks fit together; every rank loads."""
    import torch.distributed as dist
    from tqdm import tqdm

    folder = trainer.out / "phis"
    plan = [None]
    if trainer.info.is_main:
        todo = [n for n in trainer.teachers if not _complete(folder, n)]
        carried = []
        if todo and trainer.cfg.student.init_from and not trainer.cfg.phis.refit:
            carried = _carry_from_init(trainer, folder, todo)
        plan = [{"fit": [n for n in todo if n not in carried], "carried": carried}]
    if trainer.info.distributed:
        dist.broadcast_object_list(plan, src=0)
    plan = plan[0]
    trainer.phis_origin = {n: "carried from student.init_from" if n in plan["carried"] else
                           "fitted" if n in plan["fit"] else "reused from OUT/phis" for n in trainer.teachers}
    if plan["fit"]:
        rank, world = trainer.info.rank, trainer.info.world_size
        mine = fit_order(trainer)[rank::world]
        bar = tqdm(total=len(mine) * len(plan["fit"]), desc="PHI-S fit", unit="img", dynamic_ncols=True,
                   disable=not (trainer.cfg.logging.progress and trainer.info.is_main))
        for name in plan["fit"]:
            accs = _all_reduce(_accumulate(trainer, trainer.teachers[name], mine, bar.update))
            if trainer.info.is_main:
                for kind, acc in accs.items():
                    if acc.n >= 2:
                        acc.finish().save(_file(folder, name, kind))
        bar.close()
    barrier()
    load_phis(trainer, folder)


def load_phis(trainer, folder: Path) -> None:
    PhiS, _ = _phis_classes()
    state = {}
    for name, runner in trainer.teachers.items():
        runner.standardizers = {}
        for kind in KINDS:
            f = _file(Path(folder), name, kind)
            if f.exists():
                runner.standardizers[kind] = PhiS.load(f)
                state[f"{name}.{kind}"] = str(f)
    trainer.phis_state = state


def save_phis(trainer, folder: Path) -> None:
    for name, runner in trainer.teachers.items():
        for kind, s in runner.standardizers.items():
            s.save(_file(Path(folder), name, kind))
