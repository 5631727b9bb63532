"""Plugins: encoders, datasets and tasks registered from outside the package, without editing it.

A plugin is a Python module whose import registers things with the usual calls
(`distill.encoders.registry.register_loader`, `distill.data.registry.register_dataset`,
`benchmarks.tasks.base.register_task`). It is found in two ways:
- installed packages declaring an entry point in the group `amoe.plugins`
  (pyproject: `[project.entry-points."amoe.plugins"] mine = "my_pkg.amoe_plugin"`);
- module names in `AMOE_PLUGINS` (comma-separated), which `amoe --import MODULE` sets, so worker
  processes and torchrun ranks import the same plugins.
Every registry calls `load_plugins()` before it answers, so a plugin's kinds work everywhere a
built-in one does (specs in sweep files, `amoe encoders list`, the harness).
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from distill.errors import AmoeError

GROUP = "amoe.plugins"
ENV = "AMOE_PLUGINS"
_loaded: set[str] = set()
_entry_point_modules: list[str] | None = None   # installed plugins do not change while we run


class PluginError(AmoeError, ImportError):
    """A plugin module that cannot be imported."""


def plugin_modules() -> list[str]:
    global _entry_point_modules
    if _entry_point_modules is None:
        _entry_point_modules = [ep.value.split(":")[0] for ep in entry_points(group=GROUP)]
    names = list(_entry_point_modules)
    names += [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]
    return list(dict.fromkeys(names))


def load_plugins() -> list[str]:
    """Import every plugin module not imported yet; returns the ones imported now."""
    new = []
    for name in plugin_modules():
        if name in _loaded:
            continue
        _loaded.add(name)   # before the import: a plugin that imports a registry must not recurse
        try:
            importlib.import_module(name)
        except ImportError as e:
            _loaded.discard(name)
            raise PluginError(f"plugin module '{name}' cannot be imported ({e}); check `amoe --import` / "
                              f"${ENV} or the '{GROUP}' entry point, and that the module is on PYTHONPATH") from e
        except BaseException:
            _loaded.discard(name)   # a plugin that fails is retried (and fails loudly) next time, never skipped
            raise
        new.append(name)
    return new


def add_plugin_modules(names: list[str]) -> None:
    """Make `names` plugins of this process and of the processes it starts."""
    current = [m for m in os.environ.get(ENV, "").split(",") if m]
    os.environ[ENV] = ",".join(dict.fromkeys(current + list(names)))
