"""`amoe distill CONFIG [--out DIR] [--set key=value ...]` and `amoe distill perf --json`.

Run under torchrun for several processes:
    torchrun --nproc_per_node 8 -m amoe.cli distill stage1 --out runs/stage1
"""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="distil teachers into a student from a recipe (or: distill perf)",
        description="Train a student from a recipe JSON (path or name in distill/recipes). "
                    "'amoe distill perf' measures packed vs padded training throughput instead.")
    p.add_argument("config", help="recipe path or name (stage1, stage2, miniworld, ...), or 'perf'")
    p.add_argument("--out", default=None, help="output directory (default runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe values: dotted keys, JSON values (optim.lr=1e-4 "
                        "teachers.0.relational=rkd world=DIR teachers=DIR)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --out")
    plan = p.add_argument_group("memory plan (amoe distill RECIPE --plan --world-size N)")
    plan.add_argument("--plan", action="store_true",
                      help="print the per-rank memory plan of the recipe instead of training (no GPU, no weights)")
    plan.add_argument("--world-size", type=int, default=1, help="plan: number of ranks")
    plan.add_argument("--pool-images", type=int, default=0, help="plan: images in the training pool")
    plan.add_argument("--gpu-gib", type=float, default=80.0, help="plan: accelerator memory per rank, GiB")
    plan.add_argument("--host-gib-per-rank", type=float, default=128.0, help="plan: host memory per rank, GiB")
    plan.add_argument("--plan-out", default=None, help="plan: also write the plan JSON to this file")
    perf = p.add_argument_group("perf options (amoe distill perf)")
    perf.add_argument("--bench", default="step", choices=["step", "inputs", "pool"],
                      help="perf: what to measure: packed vs padded training steps (step), the input pipeline "
                           "on real JPEG shards (inputs), or the pool index and sampler at scale (pool)")
    perf.add_argument("--json", action="store_true", help="perf / plan: print the result as JSON")
    perf.add_argument("--student", default="moe-cpu-small", help="perf: student config name")
    perf.add_argument("--max-tokens", type=int, default=1024, help="perf: C_max per sequence")
    perf.add_argument("--seqs", type=int, default=2, help="perf: sequences per step (token budget)")
    perf.add_argument("--steps", type=int, default=4, help="perf: timed steps per mode")
    perf.add_argument("--device", default="cpu", help="perf: cpu or cuda")
    perf.add_argument("--workers", type=int, default=2, help="perf: input-pipeline worker processes")
    perf.add_argument("--step-s", type=float, default=0.25,
                      help="perf --bench inputs: the stand-in accelerator step the workers feed, seconds")
    perf.add_argument("--images", type=int, default=None,
                      help="perf: images (--bench inputs: per side budget, default 96; --bench pool: index "
                           "size, default 20,000,000)")
    perf.add_argument("--mix", default="range", choices=["range", "paper"],
                      help="perf: image sides 64-256 px (range) or the paper's stage-2 mix 256/384/512/768 px "
                           "(paper; C_max grows to fit the largest image)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.config == "perf" and args.bench != "step":
        from distill.train.input_perf import run_input_perf, run_pool_perf

        if args.bench == "inputs":
            res = run_input_perf(images=args.images or 96, workers=args.workers, step_s=args.step_s)
        else:
            res = run_pool_perf(n=args.images or 20_000_000)
        print(json.dumps(res, indent=2 if args.json else None))
        return 0
    if args.config == "perf":
        from distill.train.perf import run_perf

        from distill.student.packing import PAPER_STAGE2_SIDES
        mix = {"sides": PAPER_STAGE2_SIDES, "grow_max_tokens": True} if args.mix == "paper" else {}
        res = run_perf(args.student, max_tokens=args.max_tokens, seqs=args.seqs, steps=args.steps,
                       device=args.device, workers=args.workers, **mix)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for mode in ("packed", "padded"):
                r = res[mode]
                print(f"{mode:7s} {r['tokens_per_s']:10.0f} tokens/s  fill {r['fill_ratio']:.3f}")
            print(f"speed-up {res['speedup_tokens_per_s']:.2f}x")
            ip = res["input_pipeline"]
            print(f"input pipeline ({ip['workers']} workers): waits {100 * ip['data_wait_fraction']:.1f} % of a "
                  f"{ip['step_s']:.2f} s step; one worker " + ", ".join(
                      f"{v['rate']:.0f} images/s at {r} px" for r, v in ip["images_per_s_per_worker"].items()))
        return 0

    from pathlib import Path

    from distill.train import run_distillation
    from distill.train.checkpoint import latest_checkpoint
    from distill.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"amoe distill: {e}", file=sys.stderr)
        return 2
    if args.plan:
        from distill.encoders.registry import UnknownEncoderError
        from distill.io import write_json_atomic
        from distill.train.memory_plan import advice, format_plan, plan_recipe

        try:
            plan = plan_recipe(cfg, args.world_size, pool_images=args.pool_images, gpu_gib=args.gpu_gib,
                               host_gib_per_rank=args.host_gib_per_rank)
        except (ValueError, UnknownEncoderError) as e:   # a KeyError: its message is args[0]
            print(f"amoe distill --plan: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        plan["advice"] = advice(plan)
        if args.plan_out:
            write_json_atomic(args.plan_out, plan)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        for line in plan["advice"]:
            print(f"amoe distill --plan: {line}", file=sys.stderr)
        return 0 if plan["fits_device"] and plan["fits_host"] else 1
    out = Path(args.out or Path("runs") / cfg.name)
    if args.no_resume and (out / "checkpoints" / "latest.json").exists():
        print(f"amoe distill: {out} already holds a run ({latest_checkpoint(out)}); "
              "drop --no-resume to continue it or choose another --out", file=sys.stderr)
        return 2
    try:
        export = run_distillation(cfg.to_json(), out)
    except ConfigError as e:
        print(f"amoe distill: {e}", file=sys.stderr)
        return 2
    print(f"exported student: {export}")
    return 0
