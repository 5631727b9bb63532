"""`amoe bench run | sweep | teachers | perf`: benchmark cells, resumable sweeps, the mini-world teachers'
scores, harness performance figures."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.results import Cell, read_result, result_path


def _parse_vars(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--var expects NAME=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v
    return out


def _resolution(text: str | None) -> int | None:
    if text is None or str(text).lower() in ("none", "native", "default"):
        return None
    return int(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None,
                   help="at most N images per dataset role: stratified by class where there are labels, else a "
                        "seeded sample; a limited cell is its own cell and is marked 'limited' in every table")
    p.add_argument("--var", action="append", metavar="NAME=VALUE",
                   help="fill ${NAME} in suite roots (repeatable), e.g. --var world=runs/quickstart/world")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default $AMOE_CACHE or "
                                                     "~/.cache/amoe/features)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--force", action="store_true",
                   help="re-run cells that already have a result, recomputing their features (cache not read)")
    p.add_argument("--content-hash", action="store_true",
                   help="feature-cache keys hash every image's bytes (default: path, size, mtime, inode)")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark encoders: single cells, sweeps, harness perf")
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="run one (model, task, dataset, resolution) cell")
    run.add_argument("--model", required=True, help="encoder spec, e.g. siglip2:DIR (see `amoe encoders list`)")
    run.add_argument("--task", required=True, help="zeroshot | knn | retrieval | segmentation")
    run.add_argument("--dataset", required=True, help="dataset id within the suite, e.g. mw-cls")
    run.add_argument("--suite", default="miniworld", help="built-in suite name or suite JSON path")
    run.add_argument("--resolution", default=None, help="pixel budget side (e.g. 512); default: suite's")
    run.add_argument("--out", default="results", help="results folder (one JSON per cell)")
    run.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--task-cfg", default=None, help="JSON object overriding the task's defaults")
    _common(run)
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", help="run a sweep config (models x tasks x datasets x resolutions)")
    sweep.add_argument("config", help="sweep config JSON (see docs/benchmarks.md)")
    sweep.add_argument("--out", default=None, help="results folder (default: the config's 'out' or results/)")
    sweep.add_argument("--workers", type=int, default=1,
                       help="processes side by side, one torch thread each, a model's cells in one process "
                            "(default 1: this process, torch's threads)")
    _common(sweep)
    sweep.set_defaults(func=cmd_sweep)

    teachers = sub.add_parser("teachers", help="the mini-world teachers through the benchmark tasks: zero-shot, "
                                               "kNN, retrieval, segmentation probe (prints JSON)")
    teachers.add_argument("--world", required=True, help="mini-world folder (made by `amoe world make`)")
    teachers.add_argument("--teachers", required=True, help="folder holding siglip2/ and dinov3/")
    teachers.add_argument("--out", default=None, help="results folder (default: TEACHERS/eval)")
    teachers.add_argument("--json", default=None, help="also write the metrics JSON here")
    _common(teachers)
    teachers.set_defaults(func=cmd_teachers)

    perf = sub.add_parser("perf", help="measure harness overhead and cache effectiveness (prints JSON)")
    perf.add_argument("--json", action="store_true", help="print only the JSON figures")
    perf.add_argument("--model", default=None, help="encoder spec to time (default: a random-init student)")
    perf.add_argument("--world", default=None, help="mini-world folder (default: make a small one in --work)")
    perf.add_argument("--work", default="runs/bench-perf", help="scratch folder for results and cache")
    perf.add_argument("--limit", type=int, default=None, help="at most N images per role")
    perf.add_argument("--batch-size", type=int, default=32)
    perf.set_defaults(func=cmd_perf)

    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def _quiet_unless_rank0(rank: int, payload: dict) -> None:
    if rank == 0:
        print(json.dumps(payload, indent=2))


def cmd_run(args) -> int:
    from benchmarks.suites import load_suite
    from distill.distributed import setup

    rank = setup().rank   # joins the torchrun process group when WORLD_SIZE > 1
    from benchmarks.sweep import harness_from_config, run_cells

    suite = load_suite(args.suite)
    resolution = _resolution(args.resolution) if args.resolution is not None else suite.get("resolution")
    cfg = {"device": args.device, "batch_size": args.batch_size,
           "task_cfg": {args.task: json.loads(args.task_cfg)} if args.task_cfg else {}}
    h = harness_from_config(cfg, out=args.out, limit=args.limit, cache_dir=args.cache_dir,
                            variables=_parse_vars(args.var), show_progress=not args.no_progress,
                            content_hash=args.content_hash)
    cell = h.identify(Cell(args.model, args.task, args.dataset, resolution), suite)
    # validate the dataset id and task pairing before loading a model
    from benchmarks.suites import dataset_entry
    entry = dataset_entry(suite, args.dataset, h.variables)
    if args.task not in entry["tasks"]:
        print(f"warning: suite '{suite['name']}' does not list task '{args.task}' for dataset "
              f"'{args.dataset}' (listed: {entry['tasks']})", file=sys.stderr)
    summary = run_cells([cell], suite, h, force=args.force)
    if rank != 0:
        return 0
    path = result_path(h.out_dir, cell)
    record = read_result(path)
    _quiet_unless_rank0(rank, {"result": str(path), "status": record["status"], "reason": record.get("reason"),
                               "metrics": record["metrics"], "already_done": bool(summary.already_done)})
    return 0 if record["status"] != "failed" else 1


def cmd_sweep(args) -> int:
    from benchmarks.sweep import SweepConfigError, harness_from_config, load_sweep_config, run_sweep
    from distill.distributed import setup

    rank = setup().rank

    cfg = load_sweep_config(args.config)
    h = harness_from_config(cfg, out=args.out, limit=args.limit, cache_dir=args.cache_dir,
                            variables=_parse_vars(args.var), show_progress=not args.no_progress,
                            content_hash=args.content_hash)
    if args.workers < 1:
        raise SweepConfigError(f"--workers must be 1 or more, got {args.workers}")
    summary = run_sweep(cfg, h, force=args.force, workers=args.workers)
    _quiet_unless_rank0(rank, {"out": str(h.out_dir), **summary.as_dict()})
    return 0 if summary.failed == 0 else 1


TEACHER_TASKS = ["zeroshot", "knn", "linear", "retrieval", "segmentation"]


def cmd_teachers(args) -> int:
    """A sweep of the two teachers on the miniworld suite: the same cells, protocols and result files
    as every other encoder's (the teachers are registry encoders), then their metrics per teacher."""
    from benchmarks.sweep import harness_from_config, run_sweep
    from distill.errors import AmoeError
    from distill.io import write_json_atomic
    from distill.results import load_results

    from distill.teachers.common import TEACHERS, is_complete

    teachers = Path(args.teachers)
    missing = [n for n in TEACHERS if not is_complete(teachers / n)]
    if missing:
        raise AmoeError(f"{teachers} has no complete {' or '.join(missing)} teacher; train them with "
                        f"`amoe teachers train --world WORLD --out {teachers}`")
    models = {f"{n}:{teachers / n}": n for n in TEACHERS}   # encoder kinds are the teachers' names
    cfg = {"suite": "miniworld", "vars": {"world": str(args.world)}, "models": list(models),
           "tasks": TEACHER_TASKS, "datasets": ["mw-cls", "mw-ret", "mw-seg"]}
    h = harness_from_config(cfg, out=args.out or teachers / "eval", limit=args.limit, cache_dir=args.cache_dir,
                            variables=_parse_vars(args.var), show_progress=not args.no_progress,
                            content_hash=args.content_hash)
    summary = run_sweep(cfg, h, force=args.force)
    metrics: dict = {name: {} for name in models.values()}
    for r in load_results(h.out_dir):
        name = models.get(r["cell"]["model"])
        if name is not None and r["cell"]["limit"] == h.limit:
            cell = f"{r['cell']['task']}/{r['cell']['dataset']}"
            metrics[name][cell] = r["metrics"] if r["status"] == "ok" else {"status": r["status"],
                                                                          "reason": r.get("reason")}
    payload = {"results": str(h.out_dir), **metrics, "failed": summary.failed}
    if args.json:
        write_json_atomic(args.json, payload)
    print(json.dumps(payload, indent=2))
    return 0 if summary.failed == 0 else 1


def cmd_perf(args) -> int:
    from benchmarks.perf import measure

    figures = measure(model=args.model, world=args.world, work=Path(args.work), limit=args.limit,
                      batch_size=args.batch_size, show_progress=not args.json)
    print(json.dumps(figures, indent=2))
    return 0
