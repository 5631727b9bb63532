"""`amoe world make --out DIR --size small|medium --seed N`."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("world", help="procedural mini-world in real dataset formats")
    sub = parser.add_subparsers(dest="world_command", metavar="SUBCOMMAND")
    make = sub.add_parser("make", help="generate a mini-world (classification, retrieval, segmentation, refer, pool)")
    make.add_argument("--out", required=True, help="output folder (created; must not hold another world)")
    make.add_argument("--size", default="small", choices=["small", "medium"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--workers", type=int, default=None, help="worker processes (default: min(2, cores))")
    make.add_argument("--force", action="store_true", help="replace an existing world with different settings")
    make.add_argument("--no-progress", action="store_true")
    make.set_defaults(func=_make)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _make(args: argparse.Namespace) -> int:
    from .make import make_world
    try:
        summary = make_world(args.out, size=args.size, seed=args.seed, workers=args.workers, force=args.force,
                             progress=not args.no_progress)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}")
        return 1
    brief = {"out": args.out, "seed": summary["seed"], "size": summary["size"],
             "timing": summary["timing"], "disk_bytes": summary["disk_bytes"],
             "counts": {part: {k: v for k, v in s.items() if isinstance(v, (int, float))}
                        for part, s in summary["parts"].items()}}
    print(json.dumps(brief, indent=2))
    return 0
