"""`amoe teachers train|ceiling`: the mini-world teachers (their scores: `amoe bench teachers`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from distill.config import apply_overrides

from .common import TeacherError


def register(subparsers) -> None:
    p = subparsers.add_parser("teachers", help="train the mini-world SigLIP2 and DINOv3 teachers; their budget's ceiling")
    sub = p.add_subparsers(dest="teachers_command", metavar="SUBCOMMAND")
    t = sub.add_parser("train", help="train both teachers on a mini-world (resumable per teacher; "
                                     "data-parallel under torchrun)")
    t.add_argument("--world", required=True, help="mini-world folder (made by `amoe world make`)")
    t.add_argument("--out", default="runs/teachers", help="output folder (default runs/teachers)")
    t.add_argument("--fast", action="store_true", help="the < 1 min smoke recipe (tests, quickstart --fast)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--only", action="append", choices=["siglip2", "dinov3"], help="train only this teacher")
    t.add_argument("--set", action="append", default=[], metavar="TEACHER.KEY=JSON",
                   help="recipe override, e.g. --set siglip2.steps=200 --set threads=2")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("ceiling", help="raw-pixel floors and supervised ceilings in the teachers' CPU budget")
    c.add_argument("--world", required=True)
    c.add_argument("--seconds", type=float, default=240.0, help="wall seconds per supervised model (default 240)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="also write the result JSON here")
    c.set_defaults(func=cmd_ceiling)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def parse_sets(items: list[str]) -> dict:
    """`--set siglip2.steps=200 --set threads=2` -> {"siglip2": {"steps": 200}, "threads": 2}, in
    distill.config's syntax; `load_recipe` refuses unknown keys."""
    return apply_overrides({}, items)


def cmd_train(args: argparse.Namespace) -> int:
    from . import train_teachers
    try:
        report = train_teachers(args.world, args.out, fast=args.fast, seed=args.seed, only=args.only,
                                **parse_sets(args.set))
    except TeacherError as e:
        print(f"amoe teachers train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")):   # under torchrun the main rank reports
        return 0
    for name, info in report.items():
        status = info.get("status") or f"trained in {info['seconds']:.1f}s, final loss {info['losses'][-1]:.4f}"
        print(f"{name}: {status} -> {args.out}/{name}")
    return 0


def cmd_ceiling(args: argparse.Namespace) -> int:
    from distill.io import write_json_atomic

    from .ceiling import measure_ceiling
    from .data import check_world
    try:
        check_world(args.world)
    except TeacherError as e:
        print(f"amoe teachers ceiling: error: {e}", file=sys.stderr)
        return 2
    result = measure_ceiling(args.world, seconds=args.seconds, seed=args.seed)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
