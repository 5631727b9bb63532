"""`amoe leaderboard build --results DIR --out leaderboards/`: tables and plots from result JSONs only."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    lb = subparsers.add_parser("leaderboard", help="build leaderboards (Markdown, CSV, LaTeX, PNG) from results")
    sub = lb.add_subparsers(dest="leaderboard_command", metavar="SUBCOMMAND")
    build = sub.add_parser("build", help="build every table from a results folder")
    build.add_argument("--results", required=True, help="folder of result JSONs (searched recursively)")
    build.add_argument("--out", default="leaderboards", help="output folder (default: leaderboards/)")
    build.add_argument("--reported", default=None,
                       help="CSV of numbers reported by the papers (default: the repository's "
                            "benchmarks/suites/reported.csv, shipped with the package); 'none' to leave the comparison out")
    build.add_argument("--mix-limited", action="store_true",
                       help="let family averages mix `--limit` cells with full ones (marked); by default such "
                            "an average is left empty")
    build.set_defaults(func=cmd_build)
    cmp = sub.add_parser("compare", help="paired-bootstrap differences between two models on the cells they share")
    cmp.add_argument("--results", required=True, help="folder of result JSONs (searched recursively)")
    cmp.add_argument("a", help="model spec as recorded in the results (row A)")
    cmp.add_argument("b", help="model spec as recorded in the results (row B); differences are A - B")
    cmp.add_argument("--task", default=None)
    cmp.add_argument("--dataset", default=None)
    cmp.add_argument("--resamples", type=int, default=1000)
    cmp.set_defaults(func=cmd_compare)
    ev = sub.add_parser("evidence", help="test the paper's claims on a results folder (evidence.md, verdicts "
                                         "from paired bootstrap intervals)")
    ev.add_argument("--results", required=True, help="folder of result JSONs (with labels.json naming the rows)")
    ev.add_argument("--out", required=True, help="where evidence.md, evidence.json and the plots go")
    ev.add_argument("--claims", default="miniworld", help="built-in claims name or a claims JSON file")
    ev.add_argument("--world", default=None, help="the mini-world folder (for tail-concept subsets)")
    ev.set_defaults(func=cmd_evidence)
    lb.set_defaults(func=lambda args: (lb.print_help(), 2)[1])


def cmd_build(args) -> int:
    from benchmarks.leaderboard import REPORTED_CSV, build

    reported = None if (args.reported or "").lower() == "none" else (args.reported or REPORTED_CSV)
    summary = build(args.results, args.out, reported_csv=reported, allow_limited=args.mix_limited)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(args) -> int:
    from benchmarks.compare import compare
    from distill.results import load_results

    out = compare(load_results(args.results, statuses=("ok",)), args.a, args.b, task=args.task,
                  dataset=args.dataset, resamples=args.resamples)
    print(json.dumps(out, indent=2))
    return 0


def cmd_evidence(args) -> int:
    from benchmarks.evidence import write_evidence

    ev = write_evidence(args.results, args.out, args.claims, world=args.world)
    print(json.dumps({c["id"]: c["verdict"] for c in ev["claims"]}, indent=2))
    return 0
