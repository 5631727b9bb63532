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

from distill.io import portable, write_json_atomic

SETTINGS_FILE = Path(__file__).resolve().parent / "quickstart.json"


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

    def distilled(self, relational: str) -> Path:
        """Export folder of the student distilled with relational term `relational`."""
        return self.students / f"distilled-{relational}" / "export"

    @property
    def curation(self) -> Path:
        return self.out / "curation"

    def data_student(self, sampling: str) -> Path:
        """Export folder of the student distilled on the `curated` or `random` pool sample."""
        return self.students / f"data-{sampling}" / "export"

    @property
    def grounding(self) -> Path:
        return self.out / "grounding"

    @property
    def ablations(self) -> bool:
        """Whether the ablation steps (relational terms, grounding inits) are part of this run."""
        return bool(self.settings.get("ablations"))

    def relational_variants(self) -> list[str]:
        """The main recipe's relational term first, then (with ablations) the ablation's other terms."""
        d = self.settings["distill"]
        extra = [k for k in d.get("ablation", []) if k != d["relational"]] if self.ablations else []
        return [d["relational"]] + extra

    @property
    def padded_student(self) -> Path:
        """The packing ablation's student: the main recipe with padded instead of packed batches."""
        return self.out / "students" / "distilled-padded" / "export"

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
        random-init student and the distilled students (the main one and the relational-ablation variants)."""
        return [RAW_PIXELS, f"siglip2:{self.teachers / 'siglip2'}", f"dinov3:{self.teachers / 'dinov3'}",
                f"student:{self.random_student}"] + [f"student:{self.distilled(k)}"
                                                     for k in self.relational_variants()] + \
            ([f"student:{self.data_student(k)}" for k in SAMPLINGS] + [f"student:{self.padded_student}"]
             if self.ablations else [])

    def labels(self) -> dict[str, str]:
        """Display names of the leaderboard rows (the specs stay in the CSVs)."""
        relational = {"arkd": "ARKD", "rkd": "RKD", "none": "no relational"}
        names = {RAW_PIXELS: "raw pixels", f"siglip2:{self.teachers / 'siglip2'}": "SigLIP2 teacher",
                 f"dinov3:{self.teachers / 'dinov3'}": "DINOv3 teacher",
                 f"student:{self.random_student}": "student (random init)"}
        names.update({f"student:{self.distilled(k)}": f"student ({relational.get(k, k)})"
                      for k in self.relational_variants()})
        names.update({f"student:{self.data_student(k)}": f"student ({k} data)" for k in SAMPLINGS})
        names[f"student:{self.padded_student}"] = "student (padded batches)"
        names.update({f"grounding-vlm:miniworld-{k}": f"grounding ({k.replace('-', ' + ')})"
                      for k in ("scratch", "student", "student-gram", "student-lm")})
        names["grounding-baseline:constant-box"] = "grounding (constant box)"
        return names

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


SAMPLINGS = ("curated", "random")   # the curation ablation's two pool samples of equal size
RAW_PIXELS = "pixels:24"   # the floor row: kNN on 24-px images, the segmentation probe on raw 16-px patches


def _distill_one(r: Run, relational: str, export: Path, manifest: Path | None = None,
                 extra: dict | None = None) -> None:
    from distill.train import run_distillation
    from distill.train.config import load_config
    d = r.settings["distill"]
    overrides = {"world": str(r.world), "teachers_dir": str(r.teachers),
                 "teachers.0.relational": relational, "teachers.1.relational": relational,
                 "name": f"{d['recipe']}-{export.parent.name}", **(d.get("overrides") or {})}
    if manifest is not None:
        overrides["data.sources.0.manifest"] = str(manifest)
    overrides.update(extra or {})
    cfg = load_config(d["recipe"], overrides)
    run_distillation(cfg.to_json(), export.parent)


def _distill_done(r: Run) -> bool:
    from distill.encoders.student import student_export_complete
    return student_export_complete(r.distilled(r.relational_variants()[0]))


def _distill_main(r: Run) -> None:
    main = r.relational_variants()[0]
    _distill_one(r, main, r.distilled(main))


def _ablation_done(r: Run) -> bool:
    from distill.encoders.student import student_export_complete
    return all(student_export_complete(r.distilled(k)) for k in r.relational_variants()[1:])


def _distill_ablation(r: Run) -> None:
    from distill.encoders.student import student_export_complete
    for k in r.relational_variants()[1:]:
        if not student_export_complete(r.distilled(k)):
            _distill_one(r, k, r.distilled(k))


def _curation_done(r: Run) -> bool:
    from distill.encoders.student import student_export_complete
    return all(student_export_complete(r.data_student(k)) for k in SAMPLINGS)


def _curation_ablation(r: Run) -> dict:
    """Embed the pool with the image-text teacher, cluster it hierarchically, sample a balanced subset
    and a uniform-random one of the same size, and distil the main recipe on each."""
    from distill.curation import (cluster_embeddings, embed_pool, evaluate_manifest, random_manifest,
                                  sample_manifest)
    from distill.encoders.registry import load_encoder
    from distill.encoders.student import student_export_complete
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
    main = r.settings["distill"]["relational"]
    for k in SAMPLINGS:
        if not student_export_complete(r.data_student(k)):
            _distill_one(r, main, r.data_student(k), manifest=manifests[k])
    return {"target": c["target"]}


def _packing_done(r: Run) -> bool:
    from distill.encoders.student import student_export_complete
    return student_export_complete(r.padded_student)


def _packing_ablation(r: Run) -> None:
    """The main recipe, relational term and steps with padded batches instead of token-balanced packing."""
    _distill_one(r, r.settings["distill"]["relational"], r.padded_student,
                 extra=r.settings["packing"]["overrides"])


def _grounding_done(r: Run) -> bool:
    return (r.grounding / "ablation.json").is_file()


def _grounding_ablation(r: Run) -> dict:
    from grounding_vlm.ablation import run_ablation
    g = r.settings["grounding"]
    return run_ablation(r.world, r.distilled(r.relational_variants()[0]), r.grounding, fast=bool(g.get("fast")),
                        steps=g.get("steps"), results_dir=r.results)


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
    write_json_atomic(r.results / LABELS_FILE,            # row names (and order) for `amoe leaderboard build`
                      [{"spec": spec, "name": name} for spec, name in r.labels().items()])
    summary = run_sweep(cfg, harness_from_config(cfg))
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
    Step("distill", "distil the mini-world MoE student from both teachers (ARKD, PHI-S, packing)",
         _distill_done, _distill_main, requires=("world", "teachers")),
    Step("ablation-relational", "distil the relational-term ablation students (none, RKD)",
         _ablation_done, _distill_ablation, requires=("world", "teachers"), ablation=True),
    Step("ablation-curation", "curate the pool (hierarchical k-means, balanced sampling) and distil on the "
         "curated vs a random sample of equal size", _curation_done, _curation_ablation,
         requires=("world", "teachers"), ablation=True),
    Step("ablation-packing", "distil the main recipe with padded batches instead of token-balanced packing",
         _packing_done, _packing_ablation, requires=("world", "teachers"), ablation=True),
    Step("grounding", "RefCOCO-style grounding VLM: scratch vs student init vs student + Gram anchoring vs "
                      "student + stand-in LM, and the constant-box baseline",
         _grounding_done, _grounding_ablation, requires=("world", "distill"), ablation=True),
    Step("bench", "run the mini-world suite on every encoder (zero-shot, kNN, retrieval, segmentation)",
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
                   help="also run the ablations: relational term (none / RKD beside ARKD) and grounding init "
                        "(scratch / student / student + Gram); about 20 more minutes on 2 CPU cores")
    p.add_argument("--only", action="append", metavar="STEP",
                   help=f"run only this step (repeatable): {', '.join(s.name for s in STEPS)}")
    p.add_argument("--list", action="store_true", help="list the steps and whether each is complete")
    p.add_argument("--settings", default=str(SETTINGS_FILE), help="settings JSON (default: the built-in one)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    settings = load_settings(args.fast, args.settings)
    if args.ablations:
        settings["ablations"] = True
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
