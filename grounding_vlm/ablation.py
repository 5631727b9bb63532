"""The mini-world grounding ablation: scratch vs student init vs student init + Gram anchoring, the
student init with text experts from the stand-in LM, students distilled from one teacher as init, and
the constant-box baseline.

    run_ablation(world, student_dir, out, fast=False) -> {"runs": {name: {split: acc}}, ...}

The arms share the student's architecture (the scratch run takes it from the student export too, so
only the initialisation differs), the data, the box bins and the seed; the LM run's text side is the
stand-in LM (`amoe ground lm-pretrain`, trained first into OUT/standin-lm on the pool captions) with
its own tokenizer. `single_teacher` adds one arm per teacher, initialised from a student distilled
from that teacher alone (the paper's multi- vs single-teacher init). With `seeds` > 1 every arm is also
trained with train.seed 1..S-1 (run folder NAME-seedS; the LM arm with seed 0 only, `arm_seeds`);
seed s of a student arm starts from
`student_seeds[s]` (the student distilled with seed s), so the spread covers the student's training
noise too. Each arm is trained, then evaluated on val / testA / testB, and marks itself finished
(RUN/arm.json), so a killed ablation redoes only unfinished arms; a finished arm whose config differs
from the planned one is refused, naming the differing keys. The constant-box baseline (the mean
training box) is scored on the same splits. Result JSONs (benchmarks schema, suite "miniworld") go to
OUT/results (or `results_dir`, e.g. the quickstart's shared one), a summary to OUT/ablation.json and
OUT/ablation.md. `workers` > 1 trains that many arms side by side (distill.jobs, one thread each).
`fast=True` is the quickstart's smoke setting: few steps, a capped number of eval expressions.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from distill.config import differing_keys
from distill.errors import AmoeError
from distill.io import portable, write_json_atomic, write_text_atomic

from .baseline import MODEL as BASELINE, evaluate_constant_box
from .evaluate import evaluate
from .init import read_student_export
from .standin_lm import pretrain_standin_lm
from .train import load_config, train

LM_CONFIG = "miniworld-student-lm"     # its lm.path is the stand-in LM the ablation trains first
CONFIGS = ("miniworld-scratch", "miniworld-student", "miniworld-student-gram", LM_CONFIG)
SINGLE_TEACHER_CONFIG = "miniworld-student"   # a single-teacher student as init, otherwise the student arm
FAST = {"steps": 12, "eval_limit": 24, "lm_steps": 20}
ARM_FILE = "arm.json"                  # written last in a run folder: the arm is trained and evaluated
MAY_DIFFER = ("train.progress",)       # how a run reports, not what it trains


class AblationConfigMismatch(AmoeError, ValueError):
    """A finished arm in the ablation folder was trained with another config than the planned one, or
    the inits given do not fit together."""


def arm_name(base: str, seed: int) -> str:
    """Run folder (and leaderboard spec `grounding-vlm:NAME`) of an arm's seed: seed 0 keeps the plain name."""
    return base if seed == 0 else f"{base}-seed{seed}"


def arm_seeds(config: str, seeds: int) -> range:
    """Training seeds of an arm: every seed, except the stand-in LM arm's seed 0 alone (it tests none of
    the paper's claims, only that a pretrained text side plugs in, so its extra seeds are not worth
    their training time)."""
    return range(1) if config == LM_CONFIG else range(seeds)


def single_teacher_arm(teacher: str) -> str:
    return f"miniworld-student-{teacher}-only"


def plan_arms(world: Path, student_seeds: list[Path], out: Path, fast: bool, steps: int | None, progress: bool,
              single_teacher: dict[str, list[Path]] | None = None) -> list[tuple[str, int, dict]]:
    """(arm, seed, resolved config) for every run of the ablation, seed by seed."""
    refer = world / "refer"
    vision = read_student_export(student_seeds[0])[0].to_dict()
    arms = [(name, name, None) for name in CONFIGS] + \
        [(single_teacher_arm(t), SINGLE_TEACHER_CONFIG, dirs) for t, dirs in (single_teacher or {}).items()]
    plan = []
    for seed in range(len(student_seeds)):
        for arm, config, inits in arms:
            if seed not in arm_seeds(config, len(student_seeds)):
                continue
            cfg = load_config(config)
            sets = [f"data.root={refer}", f"train.progress={json.dumps(progress)}"]
            if config == LM_CONFIG:
                sets.append(f"lm.path={out / 'standin-lm'}")
            if cfg["init"]["kind"] == "scratch":
                cfg["model"]["vision"] = vision
            else:
                sets.append(f"init.path={(inits or student_seeds)[seed]}")
            if seed:
                sets.append(f"train.seed={seed}")
            if fast or steps:
                n = steps or FAST["steps"]
                sets += [f"train.steps={n}", f"train.checkpoint_every={n}", f"train.log_every={max(1, n // 4)}",
                         f"optim.warmup_steps={max(1, n // 10)}"]
            plan.append((arm, seed, load_config(cfg, sets)))
    return plan


def arm_finished(run: Path, cfg: dict) -> dict | None:
    """The finished arm's {split: acc}, or None when it has to be (re)trained; a finished arm of
    another config is refused."""
    marker = run / ARM_FILE
    if not marker.is_file():
        return None
    recorded = json.loads((run / "config.json").read_text())
    diff = differing_keys(json.loads(json.dumps(portable(cfg, run))), recorded, ignore=MAY_DIFFER)
    if diff:
        raise AblationConfigMismatch(
            f"{run} was trained with another config ({', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''} "
            "differ); use a new ablation folder, or delete that run folder to retrain it")
    return json.loads(marker.read_text())["acc@0.5"]


def train_and_evaluate(cfg: dict, run: Path, eval_limit: int | None, results_dir: Path, progress: bool) -> dict:
    """One arm: train (resuming) into `run`, evaluate every eval split, then mark the arm finished."""
    t0 = time.time()
    train(cfg, run)
    accs = {split: evaluate(run, split, limit=eval_limit, results_dir=results_dir, progress=progress)
            ["metrics"]["acc@0.5"] for split in cfg["data"]["eval_splits"]}
    write_json_atomic(run / ARM_FILE, {"acc@0.5": accs, "wall_s": round(time.time() - t0, 1)})
    return accs


def run_ablation(world: str | Path, student_dir: str | Path, out: str | Path, fast: bool = False,
                 steps: int | None = None, progress: bool = True, results_dir: str | Path | None = None,
                 student_seeds: list[str | Path] | None = None,
                 single_teacher: dict[str, list[str | Path]] | None = None, workers: int = 1) -> dict:
    from distill.jobs import side_by_side

    world, out = Path(world), Path(out)
    if not (world / "refer" / "refcoco").is_dir():
        raise FileNotFoundError(f"{world} has no refer/refcoco: make the world first (`amoe world make --out {world}`)")
    seeds = [Path(p) for p in (student_seeds or [student_dir])]
    single = {t: [Path(p) for p in dirs] for t, dirs in (single_teacher or {}).items()}
    bad = {t: len(d) for t, d in single.items() if len(d) != len(seeds)}
    if bad:
        raise AblationConfigMismatch(f"single-teacher students per seed {bad} do not match the {len(seeds)} student "
                                     "seed(s): give one single-teacher student per seed")
    results_dir = Path(results_dir) if results_dir is not None else out / "results"
    summary: dict = {"world": world.name, "student": Path(student_dir).name, "fast": fast, "seeds": len(seeds),
                     "runs": {}, "wall_s": {}}
    t0 = time.time()
    pretrain_standin_lm(world, out / "standin-lm", {"steps": FAST["lm_steps"]} if fast else None, progress=progress)
    summary["wall_s"]["standin-lm"] = round(time.time() - t0, 1)
    side = workers > 1
    plan = plan_arms(world, seeds, out, fast, steps, progress and not side, single)
    eval_limit = FAST["eval_limit"] if fast else None
    todo = []
    for arm, seed, cfg in plan:
        run = out / arm_name(arm, seed)
        accs = arm_finished(run, cfg)
        if accs is None:
            todo.append((arm, seed, cfg))
        else:
            summary["runs"][run.name] = accs
    # longest first (a Gram arm also runs its anchor), so that the arm left running alone at the end is short
    todo.sort(key=lambda t: float(t[2]["gram"].get("weight", 0.0)) == 0.0)
    jobs = [(train_and_evaluate, (cfg, out / arm_name(arm, seed), eval_limit, results_dir, progress and not side), {})
            for arm, seed, cfg in todo]

    def done(i: int, seconds: float) -> None:
        name = arm_name(*todo[i][:2])
        summary["wall_s"][name] = round(seconds, 1)
        if side:
            print(f"[amoe ground ablation] {name} finished in {seconds:.0f} s", flush=True)

    for (arm, seed, _), accs in zip(todo, side_by_side(jobs, workers=workers, on_done=done)):
        summary["runs"][arm_name(arm, seed)] = accs
    summary["runs"] = {arm_name(a, s): summary["runs"][arm_name(a, s)] for a, s, _ in plan}   # plan order
    cfg = load_config(CONFIGS[0], [f"data.root={world / 'refer'}"])
    summary["runs"][BASELINE] = {
        split: evaluate_constant_box(cfg, split, results_dir, limit=eval_limit)["metrics"]["acc@0.5"]
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
