"""`amoe` command line: one entry point, subcommands owned by the packages.

Each package exposes `register(subparsers)` in its own `cli` module; a subcommand's handler is
stored as `func` on its parser. Packages are imported lazily per command group so `amoe --help`
stays fast and a broken optional dependency only affects its own commands.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command group -> the module that owns it (its `register(subparsers)` adds exactly that group)
GROUPS = {
    "student": "distill.student.cli",        # amoe student perf
    "encoders": "distill.encoders.cli",      # amoe encoders list
    "teachers": "distill.teachers.cli",      # amoe teachers train
    "distill": "distill.train.cli",          # amoe distill CONFIG / amoe distill perf
    "curate": "distill.curation.cli",        # amoe curate embed|cluster|sample|perf
    "world": "benchmarks.world.cli",         # amoe world make
    "bench": "benchmarks.cli",               # amoe bench run|sweep|perf
    "leaderboard": "benchmarks.leaderboard_cli",  # amoe leaderboard build
    "quickstart": "amoe.quickstart",         # amoe quickstart (the application: every package in one run)
    "ground": "grounding_vlm.cli",           # amoe ground train|eval
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amoe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"amoe {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    parser.add_argument("--import", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: its encoders, datasets and tasks register themselves "
                             "(repeatable; see docs/encoders.md, 'Plugins')")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = GROUPS if only is None else {only: GROUPS[only]}
    for name in groups.values():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a group whose module is not installed: leave it out
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("amoe")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (an `AmoeError`, or a file named on the command line that does not
    exist) prints one line naming the problem and the fix and returns 2; anything else is a bug and
    keeps its traceback. `--debug` shows the traceback of user errors too."""
    from distill.errors import AmoeError, message

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    rest, plugins = _take_imports([a for a in argv if a != "--debug"])
    only = next((a for a in rest[:1] if a in GROUPS), None)
    parser = build_parser(only)
    args = parser.parse_args(rest)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if plugins:
            from distill.plugins import add_plugin_modules, load_plugins
            add_plugin_modules(plugins)
            load_plugins()
        return int(args.func(args) or 0)
    except (AmoeError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"amoe {args.command}: error: {message(e)}", file=sys.stderr)
        return 2


def _take_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split the global `--import MODULE` options (before the command) from the rest."""
    rest, plugins, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--import" and i + 1 < len(argv) and not rest:
            plugins.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--import=") and not rest:
            plugins.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest, plugins


if __name__ == "__main__":
    sys.exit(main())
