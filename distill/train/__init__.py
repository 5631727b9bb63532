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
    from distill.train.config import load_config
    from distill.train.engine import Distiller

    cfg = load_config(config_path_or_dict, overrides)
    trainer = Distiller(cfg, out_dir, **kw)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["run_distillation"]
