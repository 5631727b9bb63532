"""The mini-world grounding ablation: scratch vs student init vs student init + Gram anchoring, the
student init with text experts from the stand-in LM, and the constant-box baseline.

    run_ablation(world, student_dir, out, fast=False) -> {"runs": {name: {split: acc}}, ...}

The runs share the student's architecture (the scratch run takes it from the student export too, so
only the initialisation differs), the data, the box bins and the seed; the LM run's text side is the
stand-in LM (`amoe ground lm-pretrain`, trained first into OUT/standin-lm on the pool captions) with
its own tokenizer. Each is trained in this process, then evaluated on val / testA / testB; the
constant-box baseline (the mean training box) is scored on the same splits. Result JSONs (benchmarks
schema, suite "miniworld") go to OUT/results (or `results_dir`, e.g. the quickstart's shared one), a
summary to OUT/ablation.json and OUT/ablation.md.
`fast=True` is the quickstart's smoke setting: few steps, a capped number of eval expressions.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from distill.io import write_json_atomic, write_text_atomic

from .baseline import MODEL as BASELINE, evaluate_constant_box
from .evaluate import evaluate
from .init import read_student_export
from .standin_lm import pretrain_standin_lm
from .train import load_config, train

LM_CONFIG = "miniworld-student-lm"     # its lm.path is the stand-in LM the ablation trains first
CONFIGS = ("miniworld-scratch", "miniworld-student", "miniworld-student-gram", LM_CONFIG)
FAST = {"steps": 12, "eval_limit": 24, "lm_steps": 20}


def run_ablation(world: str | Path, student_dir: str | Path, out: str | Path, fast: bool = False,
                 steps: int | None = None, progress: bool = True, results_dir: str | Path | None = None) -> dict:
    world, out = Path(world), Path(out)
    refer = world / "refer"
    if not (refer / "refcoco").is_dir():
        raise FileNotFoundError(f"{world} has no refer/refcoco: make the world first (`amoe world make --out {world}`)")
    student_cfg, _ = read_student_export(student_dir)
    vision = student_cfg.to_dict()
    results_dir = Path(results_dir) if results_dir is not None else out / "results"
    summary: dict = {"world": world.name, "student": Path(student_dir).name, "fast": fast, "runs": {}, "wall_s": {}}
    t0 = time.time()
    lm_dir = out / "standin-lm"
    pretrain_standin_lm(world, lm_dir, {"steps": FAST["lm_steps"]} if fast else None, progress=progress)
    summary["wall_s"]["standin-lm"] = round(time.time() - t0, 1)
    for name in CONFIGS:
        cfg = load_config(name)
        sets = [f"data.root={refer}", f"train.progress={json.dumps(progress)}"]
        if name == LM_CONFIG:
            sets.append(f"lm.path={lm_dir}")
        if cfg["init"]["kind"] == "scratch":
            cfg["model"]["vision"] = vision
        else:
            sets.append(f"init.path={student_dir}")
        if fast or steps:
            n = steps or FAST["steps"]
            sets += [f"train.steps={n}", f"train.checkpoint_every={n}", f"train.log_every={max(1, n // 4)}",
                     f"optim.warmup_steps={max(1, n // 10)}"]
        cfg = load_config(cfg, sets)
        t0 = time.time()
        train(cfg, out / name)
        accs = {}
        for split in cfg["data"]["eval_splits"]:
            rec = evaluate(out / name, split, limit=FAST["eval_limit"] if fast else None,
                           results_dir=results_dir, progress=progress)
            accs[split] = rec["metrics"]["acc@0.5"]
        summary["runs"][name] = accs
        summary["wall_s"][name] = round(time.time() - t0, 1)
    cfg = load_config(CONFIGS[0], [f"data.root={refer}"])
    summary["runs"][BASELINE] = {
        split: evaluate_constant_box(cfg, split, results_dir, limit=FAST["eval_limit"] if fast else None)["metrics"]["acc@0.5"]
        for split in cfg["data"]["eval_splits"]}
    write_json_atomic(out / "ablation.json", summary)
    splits = sorted({s for a in summary["runs"].values() for s in a}, key=["val", "testA", "testB"].index)
    lines = ["| init | " + " | ".join(f"{s} Acc@0.5" for s in splits) + " | wall s |",
             "|---|" + "---|" * (len(splits) + 1)]
    for name, accs in summary["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{accs[s]:.2f}" for s in splits)
                     + f" | {summary['wall_s'].get(name, '–')} |")
    write_text_atomic(out / "ablation.md", "\n".join(lines) + "\n")
    return summary
