"""`amoe world make --out DIR --size small|medium --seed N`; `amoe world ceiling --world DIR --model cnn|vit`."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("world", help="procedural mini-world in real dataset formats")
    sub = parser.add_subparsers(dest="world_command", metavar="SUBCOMMAND")
    make = sub.add_parser("make", help="generate a mini-world (classification, retrieval, segmentation, refer, "
                                       "pool, and the teachers' pretrain set)")
    make.add_argument("--out", required=True, help="output folder (created; must not hold another world)")
    make.add_argument("--size", default="small", choices=["small", "medium"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--workers", type=int, default=None, help="worker processes (default: min(2, cores))")
    make.add_argument("--force", action="store_true", help="replace an existing world with different settings")
    make.add_argument("--no-progress", action="store_true")
    make.set_defaults(func=_make)
    ceil = sub.add_parser("ceiling", help="shape accuracy a supervised CNN or ViT reaches from fresh scenes in a "
                                          "CPU budget (the world's learnability without the data limit)")
    ceil.add_argument("--world", required=True, help="a finished mini-world (its classification val split is scored)")
    ceil.add_argument("--model", default="cnn", choices=["cnn", "vit"])
    ceil.add_argument("--seconds", type=float, default=240.0, help="wall seconds of training (default 240)")
    ceil.add_argument("--scenes", type=int, default=20000, help="fresh training scenes rendered (default 20000)")
    ceil.add_argument("--side", type=int, default=48, help="input side in pixels (default 48)")
    ceil.add_argument("--patch", type=int, default=8, help="ViT patch size (default 8)")
    ceil.add_argument("--width", type=int, default=64, help="CNN last width / ViT hidden size (default 64)")
    ceil.add_argument("--init-range", type=float, default=None,
                      help="ViT weight init std (DINOv3ViTConfig.initializer_range; default: the DINOv3 teacher "
                           "recipe's, 0.125). About 1/sqrt(width) removes the early plateau at small widths; HF's own "
                           "default is 0.02")
    ceil.add_argument("--seed", type=int, default=0)
    ceil.add_argument("--out", default=None, help="also write the result JSON here")
    ceil.add_argument("--no-progress", action="store_true")
    ceil.set_defaults(func=_ceiling)
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


def _ceiling(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distill.errors import AmoeError
    from distill.io import write_json_atomic

    from .ceiling import shape_ceiling
    if not (Path(args.world) / "world.json").is_file():
        raise AmoeError(f"{args.world} is not a finished mini-world (no world.json); make one with "
                        "`amoe world make --out DIR`")
    if args.scenes < 1 or args.seconds <= 0:
        raise AmoeError(f"--scenes {args.scenes} / --seconds {args.seconds}: both must be positive "
                        "(defaults 20000 scenes, 240 s)")
    if args.side % args.patch and args.model == "vit":
        raise AmoeError(f"--side {args.side} is not a multiple of --patch {args.patch}; pick sides like "
                        f"{args.patch * max(1, args.side // args.patch)}")
    if args.init_range is not None and not args.init_range > 0:
        raise AmoeError(f"--init-range {args.init_range}: must be a positive std (e.g. 0.125 for width 64)")
    result = shape_ceiling(args.world, model=args.model, seconds=args.seconds, scenes=args.scenes, side=args.side,
                           patch=args.patch, width=args.width, init_range=args.init_range, seed=args.seed,
                           progress=not args.no_progress)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
