"""`amoe ground train|eval|perf|baseline|plan|lm-pretrain|ablation`."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("ground", help="grounding VLM: train, evaluate (Acc@0.5), mini-world ablation")
    g = p.add_subparsers(dest="ground_command", metavar="ACTION")

    t = g.add_parser("train", help="train a grounding VLM (runs under torchrun too)")
    t.add_argument("config", help="config JSON path or built-in name (grounding_vlm/configs)")
    t.add_argument("--out", required=True, help="run folder (resumes from its latest checkpoint)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 --set data.root=WORLD/refer")
    t.set_defaults(func=_train)

    e = g.add_parser("eval", help="Acc@0.5 of a trained run on a split (writes a result JSON)")
    e.add_argument("--run", required=True, help="run folder written by `amoe ground train`")
    e.add_argument("--split", default="val", help="split name (val/testA/testB; umd: val/test), or 'all' "
                   "for the config's eval_splits")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N expressions")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--results", default=None, help="results folder (default RUN/results)")
    e.add_argument("--model-name", default=None,
                   help="leaderboard row name (default grounding-vlm:<run folder name>)")
    e.add_argument("--suite", default=None,
                   help="suite the result is filed under (default: the config's eval.suite, else 'miniworld' for "
                        "a mini-world and 'paper' for any other RefCOCO-layout data)")
    e.add_argument("--dataset-id", default=None,
                   help="dataset id in that suite; '{split}' is replaced by the split (default: the config's "
                        "eval.dataset_id, else '<dataset>-{split}', e.g. refcoco-val)")
    e.set_defaults(func=_eval)

    f = g.add_parser("perf", help="evaluation speed of box decoding with and without the KV cache (JSON)")
    f.add_argument("--vision", default="moe-cpu-small", help="student architecture of the vision experts")
    f.add_argument("--expressions", type=int, default=64)
    f.add_argument("--batch", type=int, default=32)
    f.add_argument("--side", type=int, default=128, help="image side in pixels (a multiple of the patch size)")
    f.add_argument("--words", type=int, default=8, help="words per expression")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--lm", default=None, help="text experts from this causal LM folder (e.g. the stand-in LM)")
    f.add_argument("--train-steps", type=int, default=0, help="also time this many training steps")
    f.add_argument("--train-batch", type=int, default=8, help="expressions per timed training step")
    f.add_argument("--json", action="store_true", help="accepted like the other perf commands (JSON is the output)")
    f.set_defaults(func=_perf)

    b = g.add_parser("baseline", help="the constant-box baseline (the mean training box) on a config's data")
    b.add_argument("config", help="config JSON path or built-in name: its data section is read")
    b.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.root=WORLD/refer")
    b.add_argument("--split", default="all", help="split name, or 'all' for the config's eval_splits")
    b.add_argument("--limit", type=int, default=None, help="score only the first N expressions")
    b.add_argument("--results", required=True, help="results folder")
    b.set_defaults(func=_baseline)

    pl = g.add_parser("plan", help="per-rank device memory of a grounding config with an LM (no GPU, no weights)")
    pl.add_argument("config", help="config JSON path or built-in name")
    pl.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--world-size", type=int, default=1)
    pl.add_argument("--gpu-gib", type=float, default=80.0, help="accelerator memory per rank, GiB")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_plan)

    lm = g.add_parser("lm-pretrain", help="the mini-world stand-in LM: a tiny Qwen2 causal LM pretrained on "
                                          "the pool captions, saved in hub format")
    lm.add_argument("--world", required=True)
    lm.add_argument("--out", required=True, help="folder for the model and tokenizer (kept when complete)")
    lm.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of grounding_vlm.standin_lm.SETTINGS, e.g. --set steps=100")
    lm.set_defaults(func=_lm_pretrain)

    a = g.add_parser("ablation", help="mini-world ablation: scratch / student / student + Gram / student + LM "
                                      "[/ single-teacher students], and the constant box")
    a.add_argument("--world", required=True)
    a.add_argument("--student", required=True, action="append",
                   help="student export folder (model.safetensors + config.json); repeat it to train every arm "
                        "with one seed per student (the i-th student is seed i)")
    a.add_argument("--single-teacher", action="append", default=[], metavar="TEACHER=EXPORT",
                   help="a student distilled from TEACHER alone as another init (repeat per seed, in seed order)")
    a.add_argument("--out", required=True)
    a.add_argument("--fast", action="store_true", help="smoke setting: a few steps, capped eval")
    a.add_argument("--steps", type=int, default=None, help="override the training steps of every arm")
    a.add_argument("--workers", type=int, default=1, help="arms trained side by side, one thread each (default 1)")
    a.set_defaults(func=_ablation)


def _train(args) -> int:
    from .train import train

    import os

    summary = train(args.config, args.out, args.sets)
    if os.environ.get("RANK", "0") != "0":   # under torchrun, one summary line (rank 0's)
        return 0
    print(json.dumps({k: summary[k] for k in ("run", "steps", "last", "wall_s")}))
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate

    from distill.errors import AmoeError

    if args.split == "all":
        from .train import load_run_config
        splits = load_run_config(args.run)["data"]["eval_splits"]
    else:
        splits = [args.split]
    if args.dataset_id and len(splits) > 1 and "{split}" not in args.dataset_id:
        raise AmoeError(f"--dataset-id {args.dataset_id!r} would file all {len(splits)} splits under one id; "
                        "put {split} in it, e.g. --dataset-id 'my-refcoco-{split}'")
    for split in splits:
        rec = evaluate(args.run, split, limit=args.limit, batch_size=args.batch_size, results_dir=args.results,
                       model_name=args.model_name, suite=args.suite, dataset_id=args.dataset_id)
        print(json.dumps({"split": split, "metrics": rec["metrics"], "result": rec["_path"]}))
    return 0


def _perf(args) -> int:
    from .perf import run_decode_perf

    print(json.dumps(run_decode_perf(args.vision, args.expressions, args.batch, args.side, args.words,
                                     repeats=args.repeats, lm=args.lm, train_steps=args.train_steps,
                                     train_batch=args.train_batch), indent=2))
    return 0


def _baseline(args) -> int:
    from .baseline import evaluate_constant_box
    from .data import require_data_root
    from .train import load_config

    cfg = load_config(args.config, args.sets)
    require_data_root(cfg["data"])
    for split in cfg["data"]["eval_splits"] if args.split == "all" else [args.split]:
        rec = evaluate_constant_box(cfg, split, args.results, limit=args.limit)
        print(json.dumps({"split": split, "metrics": rec["metrics"], "result": rec["_path"]}))
    return 0


def _plan(args) -> int:
    from .plan import format_plan, plan_grounding
    from .train import load_config

    plan = plan_grounding(load_config(args.config, args.sets), args.world_size, args.gpu_gib)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["fits_device"] else 1


def _lm_pretrain(args) -> int:
    from distill.config import apply_overrides

    from .standin_lm import SETTINGS, pretrain_standin_lm

    sets = apply_overrides(SETTINGS, args.sets, strict=True, where="the stand-in LM settings")
    log = pretrain_standin_lm(args.world, args.out, sets)
    print(json.dumps({k: v for k, v in log.items() if k != "losses"}))
    return 0


def _ablation(args) -> int:
    from distill.errors import AmoeError

    from .ablation import run_ablation

    single: dict[str, list[str]] = {}
    for item in args.single_teacher:
        teacher, sep, export = item.partition("=")
        if not sep or not export:
            raise AmoeError(f"--single-teacher {item!r}: write TEACHER=EXPORT, e.g. siglip2=runs/siglip2-only/export")
        single.setdefault(teacher, []).append(export)
    summary = run_ablation(args.world, args.student[0], args.out, fast=args.fast, steps=args.steps,
                           student_seeds=args.student, single_teacher=single, workers=args.workers)
    print(json.dumps(summary["runs"]))
    return 0
