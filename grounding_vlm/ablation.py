"""The mini-world grounding ablation: scratch vs student init vs student init + Gram anchoring.

    run_ablation(world, student_dir, out, fast=False) -> {"runs": {name: {split: acc}}, ...}

All three runs share the student's architecture (the scratch run takes it from the student export
too, so only the initialisation differs), the data, the tokenizer settings and the seed. Each is
trained in this process, then evaluated on val / testA / testB; result JSONs (benchmarks schema,
suite "miniworld") go to OUT/results (or `results_dir`, e.g. the quickstart's shared one), a summary
to OUT/ablation.json and OUT/ablation.md.
`fast=True` is the quickstart's smoke setting: few steps, a capped number of eval expressions.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from distill.io import write_json_atomic, write_text_atomic

from .evaluate import evaluate
from .init import read_student_export
from .train import load_config, train

CONFIGS = ("miniworld-scratch", "miniworld-student", "miniworld-student-gram")
FAST = {"steps": 12, "eval_limit": 24}


def run_ablation(world: str | Path, student_dir: str | Path, out: str | Path, fast: bool = False,
                 steps: int | None = None, progress: bool = True, results_dir: str | Path | None = None) -> dict:
    world, out = Path(world), Path(out)
    refer = world / "refer"
    if not (refer / "refcoco").is_dir():
        raise FileNotFoundError(f"{world} has no refer/refcoco: make the world first (`amoe world make --out {world}`)")
    student_cfg, _ = read_student_export(student_dir)
    vision = student_cfg.to_dict()
    results_dir = Path(results_dir) if results_dir is not None else out / "results"
    summary: dict = {"world": str(world), "student": str(student_dir), "fast": fast, "runs": {}, "wall_s": {}}
    for name in CONFIGS:
        cfg = load_config(name)
        sets = [f"data.root={refer}", f"train.progress={json.dumps(progress)}"]
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
    write_json_atomic(out / "ablation.json", summary)
    splits = sorted({s for a in summary["runs"].values() for s in a}, key=["val", "testA", "testB"].index)
    lines = ["| init | " + " | ".join(f"{s} [email protected]" for s in splits) + " | wall s |",
             "|---|" + "---|" * (len(splits) + 1)]
    for name, accs in summary["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{accs[s]:.2f}" for s in splits)
                     + f" | {summary['wall_s'][name]} |")
    write_text_atomic(out / "ablation.md", "\n".join(lines) + "\n")
    return summary
