"""`amoe quickstart`: the whole mini-world pipeline in one resumable command.

The pipeline is an ordered list of named steps (`STEPS`). Each step knows how to tell that its
outputs are complete (`done`) and how to make them (`run`); re-running the command skips complete
steps, so a killed quickstart picks up where it stopped. Later work (distilling the student,
ablations, grounding) adds a `Step` to the list in one place.

Settings are data: `amoe/quickstart.json` (`default`, and `fast` overrides for
the smoke run used by the tests).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill.errors import AmoeError
from distill.io import portable, write_json_atomic

SETTINGS_FILE = Path(__file__).resolve().parent / "quickstart.json"


RELATIONAL_LABELS = {"arkd": "ARKD", "rkd": "RKD", "none": "no relational"}
SAMPLINGS = ("curated", "random")   # the curation ablation's two pool samples of equal size
SINGLE_TEACHERS = {"siglip2": "SigLIP2", "dinov3": "DINOv3"}   # students distilled from one teacher alone
RAW_PIXELS = "pixels:24"   # the floor row: kNN on 24-px images, the segmentation probe on raw 16-px patches


@dataclass(frozen=True)
class Arm:
    """A student the pipeline distils: its folder under students/ (seed 0; seed s adds `-seedS`), its
    leaderboard row, and what it changes in the main recipe."""

    folder: str
    label: str
    relational: str
    sampling: str | None = None               # the curation ablation's pool sample (curation/<sampling>.parquet)
    overrides: tuple = ()                     # (dotted key, value) recipe overrides, e.g. padded batches
    teacher: str | None = None                # distilled from this teacher alone (a grounding init)


@dataclass
class Run:
    """One quickstart run: its output folder and resolved settings."""

    out: Path
    settings: dict
    log: Callable[[str], None] = print

    @property
    def world(self) -> Path:
        return self.out / "world"

    @property
    def teachers(self) -> Path:
        return self.out / "teachers"

    @property
    def random_student(self) -> Path:
        return self.out / "students" / "random-init"

    @property
    def students(self) -> Path:
        return self.out / "students"

    @property
    def curation(self) -> Path:
        return self.out / "curation"

    @property
    def grounding(self) -> Path:
        return self.out / "grounding"

    @property
    def ablations(self) -> bool:
        """Whether the ablation steps (relational terms, data, packing, grounding inits) are part of this run."""
        return bool(self.settings.get("ablations"))

    @property
    def seeds(self) -> int:
        """Training seeds per ablation arm (seed 0 is the arm's plain folder); 1 without ablations."""
        return max(1, int(self.settings.get("seeds", 1))) if self.ablations else 1

    @property
    def workers(self) -> int:
        """Ablation arms trained, and benchmark models run, side by side (distill.jobs: one torch thread
        each); `workers` in the settings, default two on a machine with two cores or more."""
        from distill.jobs import default_workers
        return int(self.settings.get("workers") or default_workers(2))

    def export(self, arm: Arm, seed: int = 0) -> Path:
        """Export folder of `arm` distilled with training seed `seed`."""
        return self.students / (arm.folder if seed == 0 else f"{arm.folder}-seed{seed}") / "export"

    def relational_variants(self) -> list[str]:
        """The main recipe's relational term first, then (with ablations) the ablation's other terms."""
        d = self.settings["distill"]
        extra = [k for k in d.get("ablation", []) if k != d["relational"]] if self.ablations else []
        return [d["relational"]] + extra

    def relational_arm(self, relational: str) -> Arm:
        return Arm(f"distilled-{relational}", f"student ({RELATIONAL_LABELS.get(relational, relational)})", relational)

    @property
    def main_arm(self) -> Arm:
        """The quickstart's student: the main recipe (`distill.recipe`) with the main relational term."""
        return Arm("distilled", "student", self.relational_variants()[0])

    @property
    def base_arm(self) -> Arm:
        """The ablations' reference student: the ablation recipe with the main relational term. The other
        arms read its teacher outputs, the grounding ablation starts from it, and the single-teacher arms
        take its adapter layout, so every ablation compares students of one recipe."""
        return self.relational_arm(self.relational_variants()[0])

    def recipe(self, arm: Arm) -> str:
        """The main student's recipe, or for an ablation arm `distill.ablation_recipe` (default: the same).
        The paper's ablations, too, run at a smaller budget than its final model."""
        d = self.settings["distill"]
        return d["recipe"] if arm == self.main_arm else d.get("ablation_recipe") or d["recipe"]

    def arms(self, step: str) -> list[Arm]:
        """The arms an ablation step distils (`relational`, `curation`, `packing`, `single-teacher`)."""
        main = self.main_arm.relational
        if step == "relational":
            return [self.relational_arm(k) for k in self.relational_variants()]
        if step == "curation":
            return [Arm(f"data-{k}", f"student ({k} data)", main, sampling=k) for k in SAMPLINGS]
        if step == "packing":
            return [Arm("distilled-padded", "student (padded batches)", main,
                        overrides=tuple(sorted(self.settings["packing"]["overrides"].items())))]
        if step == "single-teacher":
            return [Arm(f"distilled-{t}-only", f"student ({name} only)", main, teacher=t)
                    for t, name in SINGLE_TEACHERS.items()]
        raise KeyError(step)

    def benched(self) -> list[tuple[Arm, int]]:
        """(arm, seed) of every distilled student the suite runs on: the main one, and with ablations every
        seed of the relational, curation and packing arms (single-teacher students are grounding inits)."""
        arms = [(a, s) for step in ("relational", "curation", "packing") for a in self.arms(step)
                for s in range(self.seeds)] if self.ablations else []
        return [(self.main_arm, 0)] + arms

    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def leaderboard(self) -> Path:
        return self.out / "leaderboard"

    def models(self) -> list[str]:
        """Every encoder the mini-world suite runs on: raw pixels (the floor), both teachers, the
        random-init student and the distilled students (the main one, and with ablations every arm's seeds)."""
        return [RAW_PIXELS, f"siglip2:{self.teachers / 'siglip2'}", f"dinov3:{self.teachers / 'dinov3'}",
                f"student:{self.random_student}"] + [f"student:{self.export(a, s)}" for a, s in self.benched()]

    def labels(self) -> list[dict]:
        """Leaderboard rows in order, {spec, name}, and for an arm's seed s > 0 also {arm, seed}: the
        evidence page reads the seeds of an arm together (the specs stay in the CSVs)."""
        from grounding_vlm.ablation import CONFIGS, SINGLE_TEACHER_CONFIG, arm_name, arm_seeds, single_teacher_arm

        def entry(spec: str, label: str, seed: int) -> dict:
            return {"spec": spec, "name": label} if seed == 0 else \
                {"spec": spec, "name": f"{label} · seed {seed}", "arm": label, "seed": seed}

        rows = [entry(RAW_PIXELS, "raw pixels", 0), entry(f"siglip2:{self.teachers / 'siglip2'}", "SigLIP2 teacher", 0),
                entry(f"dinov3:{self.teachers / 'dinov3'}", "DINOv3 teacher", 0),
                entry(f"student:{self.random_student}", "student (random init)", 0)]
        rows += [entry(f"student:{self.export(a, s)}", a.label, s) for a, s in self.benched()]
        grounding = {c: (c, f"grounding ({c.removeprefix('miniworld-').replace('-', ' + ')})") for c in CONFIGS}
        grounding.update({single_teacher_arm(t): (SINGLE_TEACHER_CONFIG, f"grounding ({name}-only student)")
                          for t, name in SINGLE_TEACHERS.items()})
        rows += [entry(f"grounding-vlm:{arm_name(run, s)}", label, s) for s in range(self.seeds)
                 for run, (config, label) in grounding.items() if s in arm_seeds(config, self.seeds)]
        return rows + [entry("grounding-baseline:constant-box", "grounding (constant box)", 0)]

    def sweep_config(self) -> dict:
        s = self.settings["sweep"]
        return {"suite": s["suite"], "vars": {"world": str(self.world)}, "models": self.models(),
                "tasks": s["tasks"], "resolutions": s.get("resolutions") or [None], "limit": s.get("limit"),
                "batch_size": s.get("batch_size", 32), "task_cfg": s.get("task_cfg") or {},
                "out": str(self.results), "cache_dir": str(self.cache), "device": s.get("device")}


@dataclass
class Step:
    name: str
    description: str
    done: Callable[[Run], bool]
    run: Callable[[Run], object]
    requires: tuple[str, ...] = field(default_factory=tuple)
    ablation: bool = False      # runs only when the settings ask for ablations (`--ablations`)


class SeedConfigMismatch(AmoeError, ValueError):
    """A student folder of the run holds a run of another recipe than the one planned for it."""


# ---------------------------------------------------------------- steps

def _world_done(r: Run) -> bool:
    return (r.world / "world.json").is_file()


def _make_world(r: Run) -> None:
    from benchmarks.world import make_world
    w = r.settings["world"]
    make_world(r.world, size=w.get("size", "small"), seed=int(w.get("seed", 0)))


def _teachers_done(r: Run) -> bool:
    from distill.teachers import teachers_complete
    return teachers_complete(r.teachers)


def _train_teachers(r: Run) -> None:
    from distill.teachers import train_teachers
    train_teachers(r.world, r.teachers, **(r.settings.get("teachers") or {}))


def _student_done(r: Run) -> bool:
    from distill.encoders.student import student_export_complete
    return student_export_complete(r.random_student)


def _export_random_student(r: Run) -> None:
    from distill.encoders.student import export_random_student
    s = r.settings["random_student"]
    config = s.get("config")
    if config is None:   # the distilled student's own architecture: the baseline differs only in training
        from distill.train.config import load_config
        config = load_config(r.settings["distill"]["recipe"]).student.config
    export_random_student(r.random_student, config=config, seed=int(s.get("seed", 0)), teachers=r.teachers)


def _arm_config(r: Run, arm: Arm, seed: int):
    """The recipe `arm` is distilled with at `seed`: its recipe (the main one, or the ablation recipe)
    and the settings' overrides, the arm's relational term, pool sample, recipe overrides or single
    teacher, and the seed."""
    from distill.train.config import load_config
    d = r.settings["distill"]
    export, recipe = r.export(arm, seed), r.recipe(arm)
    overrides = {"world": str(r.world), "teachers_dir": str(r.teachers),
                 "teachers.0.relational": arm.relational, "teachers.1.relational": arm.relational,
                 "name": f"{recipe}-{export.parent.name}", **(d.get("overrides") or {})}
    if arm.sampling is not None:
        overrides["data.sources.0.manifest"] = str(r.curation / f"{arm.sampling}.parquet")
    overrides.update(dict(arm.overrides))
    if seed:
        overrides["seed"] = seed
    if arm != r.main_arm and (arm, seed) != (r.base_arm, 0):
        # every arm distils the same teachers on the same pool: read the reference arm's teacher outputs
        # (complete before any arm starts; read-only, so an arm's inputs do not depend on its neighbours)
        overrides["target_cache.shared"] = str(_ablation_target_cache(r))
    cfg = load_config(recipe, overrides)
    if arm.teacher is not None:
        # the student keeps both adapters (the release's layout), sized as the reference arm's; the other
        # teacher's adapter is simply never trained
        main = json.loads((r.export(r.base_arm) / "config.json").read_text())["student_config"]
        raw = cfg.to_json()
        raw["teachers"] = [t for t in raw["teachers"] if t["name"] == arm.teacher]
        raw["student"]["config"] = {**raw["student"]["config"], "teachers": main["teachers"],
                                    "teachers_dim": main["teachers_dim"]}
        cfg = load_config(raw)
    return cfg


def _arm_done(r: Run, arm: Arm, seed: int) -> bool:
    """Whether the arm's seed is exported. A folder holding a run of another recipe is refused, naming
    the keys that differ (a re-run with a changed recipe must not mix with the old seeds)."""
    from distill.config import differing_keys
    from distill.encoders.student import student_export_complete
    from distill.train.engine import RESUME_MAY_CHANGE
    folder = r.export(arm, seed).parent
    recorded = folder / "config.json"
    if recorded.is_file():
        cfg = _arm_config(r, arm, seed).resolve_paths(folder)
        planned = json.loads(json.dumps(portable(cfg.to_json(), folder)))
        diff = differing_keys(planned, json.loads(recorded.read_text()),
                              ignore=("logging", "checkpoint", "description") + RESUME_MAY_CHANGE)
        if diff:
            raise SeedConfigMismatch(
                f"{folder} holds a student of another recipe ({', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''} "
                f"differ from the planned {arm.label}, seed {seed}); use a new --out, or delete that folder "
                "to retrain it")
    return student_export_complete(r.export(arm, seed))


def _distill_arm(r: Run, arm: Arm, seed: int, alongside: bool = False) -> None:
    from distill.train import run_distillation
    cfg = _arm_config(r, arm, seed).to_json()
    if alongside:   # side by side, one core each: no interleaved progress bars, and decoding in
        cfg["logging"]["progress"] = False    # worker processes would only add hand-overs
        cfg["data"]["workers"] = 0
    run_distillation(cfg, r.export(arm, seed).parent)


def _distill_arms(r: Run, todo: list[tuple[Arm, int]]) -> None:
    """Distil the unfinished (arm, seed) pairs, `r.workers` at a time side by side."""
    from distill.jobs import side_by_side
    todo = [(a, s) for a, s in todo if not _arm_done(r, a, s)]
    side = r.workers > 1 and len(todo) > 1

    def done(i: int, seconds: float) -> None:
        a, s = todo[i]
        r.log(f"  {a.label}{f' · seed {s}' if s else ''}: distilled in {seconds:.0f} s")

    side_by_side([(_distill_arm, (r, a, s, side), {}) for a, s in todo],
                 workers=r.workers if side else 1, on_done=done)


def _step_arms(r: Run, step: str) -> list[tuple[Arm, int]]:
    """(arm, seed) pairs an ablation step distils."""
    return [(a, s) for a in r.arms(step) for s in range(r.seeds)]


def _distill_done(r: Run) -> bool:
    return _arm_done(r, r.main_arm, 0)


def _distill_main(r: Run) -> None:
    _distill_arm(r, r.main_arm, 0)


def _ablation_target_cache(r: Run) -> Path:
    return r.export(r.base_arm).parent / "target_cache"


def _targets_done(r: Run) -> bool:
    teachers = _arm_config(r, r.base_arm, 0).teachers
    return all((_ablation_target_cache(r) / f"filled-{t.name}.json").is_file() for t in teachers)


def _fill_targets(r: Run) -> dict:
    """Every teacher output an ablation arm can ask for, into the reference arm's target cache (the other
    arms read it as `target_cache.shared`), one teacher per process side by side: arms then encode nothing."""
    from distill.jobs import side_by_side
    from distill.train.targets import fill_target_cache
    cfg, out = _arm_config(r, r.base_arm, 0), r.export(r.base_arm).parent
    names = [t.name for t in cfg.teachers]
    counts = side_by_side([(fill_target_cache, (cfg, out, n), {}) for n in names],
                          workers=min(r.workers, len(names)))
    for name, c in zip(names, counts):
        write_json_atomic(_ablation_target_cache(r) / f"filled-{name}.json", c)
    return dict(zip(names, counts))


def _ablation_done(r: Run) -> bool:
    return all(_arm_done(r, a, s) for a, s in _step_arms(r, "relational"))


def _distill_ablation(r: Run) -> None:
    _distill_arms(r, _step_arms(r, "relational"))


def _curation_done(r: Run) -> bool:
    return all(_arm_done(r, a, s) for a, s in _step_arms(r, "curation"))


def _curation_ablation(r: Run) -> dict:
    """Embed the pool with the image-text teacher, cluster it hierarchically, sample a balanced subset
    and a uniform-random one of the same size, and distil the ablation recipe on each."""
    from distill.curation import (cluster_embeddings, embed_pool, evaluate_manifest, random_manifest,
                                  sample_manifest)
    from distill.encoders.registry import load_encoder
    c = r.settings["curation"]
    pool = r.world / "pool" / "shards"
    embeddings, clusters = r.curation / "embeddings", r.curation / "clusters"
    embed_pool(load_encoder(str(r.teachers / c["encoder"])), pool, embeddings)   # resumable per shard
    cluster_embeddings(embeddings, c["config"], clusters)                        # resumable per level
    manifests = {k: r.curation / f"{k}.parquet" for k in SAMPLINGS}
    sample_manifest(clusters, c["target"], manifests["curated"], seed=c.get("seed", 0))
    random_manifest(embeddings, c["target"], manifests["random"], seed=c.get("seed", 0))
    evidence = {k: evaluate_manifest(m, r.world / "pool") for k, m in manifests.items()}
    write_json_atomic(r.curation / "evidence.json", portable(evidence, r.curation))
    _distill_arms(r, _step_arms(r, "curation"))
    return {"target": c["target"]}


def _packing_done(r: Run) -> bool:
    return all(_arm_done(r, a, s) for a, s in _step_arms(r, "packing"))


def _packing_ablation(r: Run) -> None:
    """The ablation recipe, relational term and steps with padded batches instead of token-balanced packing."""
    _distill_arms(r, _step_arms(r, "packing"))


def _single_teacher_done(r: Run) -> bool:
    return all(_arm_done(r, a, s) for a, s in _step_arms(r, "single-teacher"))


def _single_teacher_ablation(r: Run) -> None:
    """The ablation recipe distilled from each teacher alone: the grounding ablation's single-teacher inits."""
    _distill_arms(r, _step_arms(r, "single-teacher"))


def _grounding_done(r: Run) -> bool:
    summary = r.grounding / "ablation.json"
    return summary.is_file() and json.loads(summary.read_text()).get("seeds", 1) == r.seeds


def _grounding_ablation(r: Run) -> dict:
    from grounding_vlm.ablation import run_ablation
    g = r.settings["grounding"]
    # the two-teacher init is the ablation recipe's ARKD arm, like the single-teacher inits, so that the
    # multi- vs single-teacher comparison differs in the teachers only
    student = r.base_arm
    single = {a.teacher: [r.export(a, s) for s in range(r.seeds)] for a in r.arms("single-teacher")}
    summary = run_ablation(r.world, r.export(student), r.grounding, fast=bool(g.get("fast")), steps=g.get("steps"),
                           results_dir=r.results, student_seeds=[r.export(student, s) for s in range(r.seeds)],
                           single_teacher=single, workers=r.workers, progress=r.workers <= 1)
    return {"wall_s": summary["wall_s"]}


def _bench_done(r: Run) -> bool:
    from distill.results import DONE_STATUSES, existing_status
    from benchmarks.suites import load_suite
    from benchmarks.sweep import harness_from_config, plan_cells
    cfg = r.sweep_config()
    h = harness_from_config(cfg)
    suite = load_suite(cfg["suite"])
    cells = [h.identify(c, suite) for c in plan_cells(cfg, suite)]
    return all(existing_status(r.results, c) in DONE_STATUSES for c in cells)


def _run_bench(r: Run) -> dict:
    from benchmarks.sweep import harness_from_config, run_sweep
    cfg = r.sweep_config()
    write_json_atomic(r.out / "sweep.json", cfg)  # the exact sweep, re-runnable with `amoe bench sweep`
    from benchmarks.leaderboard import LABELS_FILE
    r.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(r.results / LABELS_FILE, r.labels())   # row names, order and seeds for the leaderboard
    summary = run_sweep(cfg, harness_from_config(cfg), workers=r.workers)
    if summary.failed:
        lines = "\n  ".join(f"{f['cell']}: {f['reason']} ({f['path']})" for f in summary.failures)
        raise RuntimeError(f"{summary.failed} benchmark cell(s) failed:\n  {lines}\n"
                           "Fix the cause and re-run `amoe quickstart`: finished cells are kept.")
    return summary.as_dict()


def _leaderboard_done(r: Run) -> bool:
    md = r.leaderboard / "leaderboard.md"
    if not md.is_file() or not r.results.is_dir():
        return False
    if r.ablations and not (r.leaderboard / "evidence.md").is_file():
        return False
    newest = max((p.stat().st_mtime for p in r.results.glob("*.json")), default=0.0)
    return md.stat().st_mtime >= newest


def _build_leaderboard(r: Run) -> dict:
    from benchmarks.leaderboard import build
    summary = build(r.results, r.leaderboard)
    if r.ablations:   # the claims the ablations test, with verdicts from paired intervals
        from benchmarks.evidence import write_evidence
        ev = write_evidence(r.results, r.leaderboard, "miniworld", world=r.world)
        summary["evidence"] = {c["id"]: c["verdict"] for c in ev["claims"]}
    return summary


STEPS: list[Step] = [
    Step("world", "make the mini-world (ImageFolder, Karpathy JSON, ADE20K, refer, webdataset)",
         _world_done, _make_world),
    Step("teachers", "train the two mini-world teachers (SigLIP2-style and DINOv3-style)",
         _teachers_done, _train_teachers, requires=("world",)),
    Step("random-student", "export a random-init student (the untrained baseline)",
         _student_done, _export_random_student, requires=("teachers",)),
    Step("distill", "distil the mini-world MoE student from both teachers (ARKD, PHI-S, packing; the main recipe)",
         _distill_done, _distill_main, requires=("world", "teachers")),
    Step("ablation-targets", "cache every teacher output the ablation arms can ask for (each image at each "
         "side budget), so that no arm runs a teacher", _targets_done, _fill_targets,
         requires=("world", "teachers"), ablation=True),
    Step("ablation-relational", "distil the relational-term ablation students (ARKD, none, RKD; every seed; the "
         "ablation recipe)", _ablation_done, _distill_ablation, requires=("world", "teachers", "ablation-targets"),
         ablation=True),
    Step("ablation-curation", "curate the pool (hierarchical k-means, balanced sampling) and distil on the "
         "curated vs a random sample of equal size", _curation_done, _curation_ablation,
         requires=("world", "teachers", "ablation-targets"), ablation=True),
    Step("ablation-packing", "distil the ablation recipe with padded batches instead of token-balanced packing",
         _packing_done, _packing_ablation, requires=("world", "teachers", "ablation-targets"), ablation=True),
    Step("ablation-single-teacher", "distil the ablation recipe from each teacher alone (grounding inits)",
         _single_teacher_done, _single_teacher_ablation, requires=("world", "teachers", "ablation-relational"),
         ablation=True),
    Step("grounding", "RefCOCO-style grounding VLM: scratch vs student init vs student + Gram anchoring vs "
                      "student + stand-in LM vs single-teacher students, and the constant-box baseline",
         _grounding_done, _grounding_ablation, requires=("world", "ablation-relational",
                                                         "ablation-single-teacher"), ablation=True),
    Step("bench", "run the mini-world suite on every encoder (zero-shot, kNN, linear, retrieval, segmentation)",
         _bench_done, _run_bench, requires=("world", "teachers", "random-student", "distill", "ablation-relational",
                                            "ablation-curation", "ablation-packing")),
    Step("leaderboard", "build the leaderboard tables and plot from the result JSONs",
         _leaderboard_done, _build_leaderboard, requires=("bench",)),
]


# ---------------------------------------------------------------- runner

def load_settings(fast: bool = False, path: str | Path = SETTINGS_FILE) -> dict:
    """`default`, deep-merged with `fast` when asked (distill.config)."""
    from distill.config import merge

    data = json.loads(Path(path).read_text())
    return merge(data["default"], data.get("fast", {})) if fast else copy.deepcopy(data["default"])


def run_steps(run: Run, steps: list[Step] | None = None, only: list[str] | None = None) -> list[dict]:
    """Run `steps` in order, skipping complete ones; records each step's outcome in out/quickstart.json."""
    steps = STEPS if steps is None else steps
    names = [s.name for s in steps]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SystemExit(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    run.out.mkdir(parents=True, exist_ok=True)
    state_path = run.out / "quickstart.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"steps": {}}
    report = []
    t_all = time.perf_counter()
    for i, step in enumerate(steps, start=1):
        if only and step.name not in only:
            continue
        tag = f"[{i}/{len(steps)}] {step.name}"
        if step.ablation and not run.ablations:
            report.append({"step": step.name, "status": "not selected"})
            continue
        if step.done(run):
            run.log(f"{tag}: complete, skipped")
            report.append({"step": step.name, "status": "skipped"})
            continue
        run.log(f"{tag}: {step.description} ...")
        t0 = time.perf_counter()
        try:
            info = step.run(run)
        except BaseException as e:
            state["steps"][step.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                         "seconds": round(time.perf_counter() - t0, 2)}
            write_json_atomic(state_path, portable(state, run.out))
            raise
        seconds = time.perf_counter() - t0
        if not step.done(run):
            raise RuntimeError(f"step '{step.name}' finished but its outputs are not complete; "
                               "this is a bug in the step")
        state["steps"][step.name] = {"status": "done", "seconds": round(seconds, 2),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     **({"info": info} if isinstance(info, dict) else {})}
        write_json_atomic(state_path, portable(state, run.out))
        run.log(f"{tag}: done in {seconds:.1f}s")
        report.append({"step": step.name, "status": "done", "seconds": round(seconds, 2)})
    run.log(f"quickstart: all steps complete in {time.perf_counter() - t_all:.1f}s; "
            f"leaderboard: {run.leaderboard / 'leaderboard.md'}")
    return report


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="the mini-world pipeline: world, teachers, benchmarks, "
                                                 "leaderboard (resumable)")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--fast", action="store_true", help="a small smoke version (tiny world, short training)")
    p.add_argument("--ablations", action="store_true",
                   help="also run the ablations that test the paper's claims (relational term, data curation, "
                        "packing, grounding init), each arm with --seeds training seeds, and write the evidence page")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="training seeds per ablation arm (default 3, from the settings)")
    p.add_argument("--only", action="append", metavar="STEP",
                   help=f"run only this step (repeatable): {', '.join(s.name for s in STEPS)}")
    p.add_argument("--list", action="store_true", help="list the steps and whether each is complete")
    p.add_argument("--settings", default=str(SETTINGS_FILE), help="settings JSON (default: the built-in one)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    settings = load_settings(args.fast, args.settings)
    if args.ablations:
        settings["ablations"] = True
    if args.seeds is not None:
        if args.seeds < 1:
            raise AmoeError(f"--seeds must be >= 1, got {args.seeds}")
        settings["seeds"] = args.seeds
    run = Run(Path(args.out), settings)
    if args.list:
        for i, step in enumerate(STEPS, start=1):
            try:
                state = "complete" if step.done(run) else "to do"
            except Exception as e:  # a step whose module is missing cannot say
                state = f"unknown ({type(e).__name__}: {e})"
            if step.ablation and not run.ablations:
                state = "off"
            print(f"{i}. {step.name:20s} {state:10s} {step.description}")
        return 0
    run_steps(run, only=args.only)
    return 0
