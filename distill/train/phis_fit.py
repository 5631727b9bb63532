"""Fit (or reload) the PHI-S standardisers of every teacher before training starts.

Per teacher three standardisers are fitted from teacher outputs on the first `phis.fit_images`
images of a fixed permutation of the pool: summary vectors, patch tokens and register tokens (the
registers listed in `phis.exclude_registers` are left raw -- the paper skips DINOv3's multimodal
second register). Rank 0 fits and saves them to OUT/phis/; the other ranks wait and load the files,
so every rank standardises with identical statistics. They are also stored in every checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from distill.distributed import barrier
from distill.train.pool import read_image

KINDS = ("summary", "patches", "registers")


def _phis_class():
    try:
        from distill.phis import PhiS
    except ImportError as e:
        raise RuntimeError("phis.enabled=true needs distill.phis (PHI-S); it is not importable here. "
                           "Set --set phis.enabled=false to train on raw teacher targets") from e
    return PhiS


def _file(folder: Path, teacher: str, kind: str) -> Path:
    return folder / f"{teacher}.{kind}.safetensors"


@torch.no_grad()
def _collect(trainer, runner, n_images: int) -> dict[str, torch.Tensor]:
    """Raw teacher outputs of the first n images of a seeded permutation (corrupt images skipped)."""
    pool = trainer.pool
    g = torch.Generator().manual_seed(trainer.cfg.seed + 4242)
    order = torch.randperm(len(pool), generator=g).tolist()[:n_images]
    buf: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    excl = set(trainer.cfg.phis.exclude_registers)
    chunk = 16
    for s in range(0, len(order), chunk):
        items, imgs = [], []
        for i in order[s:s + chunk]:
            try:
                imgs.append(read_image(pool.items[i].entry))
                items.append(pool.items[i])
            except Exception:
                trainer.counters["corrupt_images"] += 1
        if not items:
            continue
        raws = runner.raw(imgs, [it.entry.key for it in items], [it.resolution for it in items])
        for r in raws:
            buf["summary"].append(r.summary[None])
            buf["patches"].append(r.patches)
            if r.registers is not None:
                keep = [j for j in range(r.registers.shape[0]) if j not in excl]
                if keep:
                    buf["registers"].append(r.registers[keep])
    return {k: torch.cat(v) for k, v in buf.items() if v}


def fit_or_load_phis(trainer) -> None:
    PhiS = _phis_class()
    folder = trainer.out / "phis"
    if trainer.info.is_main:
        for name, runner in trainer.teachers.items():
            if all(_file(folder, name, k).exists() for k in KINDS[:2]):
                continue
            data = _collect(trainer, runner, trainer.cfg.phis.fit_images)
            for kind, x in data.items():
                if kind == "summary" and x.shape[0] < 2:
                    continue
                PhiS.fit(x).save(_file(folder, name, kind))
    barrier()
    load_phis(trainer, folder)


def load_phis(trainer, folder: Path) -> None:
    PhiS = _phis_class()
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
