"""Procedural mini-world: synthetic scenes written in the real datasets' on-disk formats.

    from benchmarks.world import make_world
    summary = make_world("/tmp/world", size="small", seed=0)

See docs/datasets.md for the layout and what each part is for.
"""
from .make import GENERATOR_VERSION, make_world, size_configs

__all__ = ["GENERATOR_VERSION", "make_world", "size_configs"]
