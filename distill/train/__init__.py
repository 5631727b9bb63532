"""Distillation trainer: losses live in distill.losses; here batching, recipes, engine, checkpoints.

    from distill.train import run_distillation
    export_dir = run_distillation("distill/recipes/miniworld.json", "runs/mw",
                                  {"world": "WORLD", "teachers": "TEACHERS"})
"""
from __future__ import annotations

import os
from pathlib import Path


def run_distillation(config_path_or_dict, out_dir: str | os.PathLike,
                     overrides: dict | list[str] | None = None, **kw) -> Path:
    """Train (resuming from OUT/checkpoints if present) and export; returns the export directory.

    Works in one process or under torchrun (every rank calls it with the same arguments)."""
    from distill.io import lock_run_folder
    from distill.train.config import load_config
    from distill.train.engine import Distiller

    cfg = load_config(config_path_or_dict, overrides)
    # one writer per run folder: a second distillation on the same --out is refused, not interleaved
    lock = lock_run_folder(out_dir, "distillation") if os.environ.get("RANK", "0") == "0" else None
    try:
        trainer = Distiller(cfg, out_dir, **kw)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        if lock is not None:
            lock.release()


__all__ = ["run_distillation"]
