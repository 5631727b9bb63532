"""Every config file shipped in the packages resolves, without weights or data.

A recipe, sweep or suite is data that a user runs on a cluster hours after writing it; a wrong
encoder kind, option, dataset reader, task, task key or student config name must fail here, in CI,
not before step 1 of a paper run. Encoder specs are checked against the registry (kind, and the
options the loader takes) without loading; the paper student is built on the meta device.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.suites import list_suites, load_suite
from benchmarks.sweep import SWEEPS_DIR, Harness, load_sweep_config, plan_cells
from benchmarks.tasks.base import get_task, list_tasks, unknown_keys
from benchmarks.tasks.segmentation import resolve_protocol
from distill.data import DATASETS
from distill.encoders.registry import parse_spec, resolve_spec
from distill.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "distill" / "recipes").glob("*.json"))
SWEEPS = sorted(SWEEPS_DIR.glob("*.json"))


def check_encoder_spec(spec: str) -> None:
    """A spec with a kind must name a registered loader and only options it takes; a bare path
    (a mini-world teacher folder under ${teachers}) is the user's to provide."""
    kind = spec.partition(":")[0]
    if ":" in spec and "/" not in kind:
        resolve_spec(spec)


def check_task_settings(task_name: str, settings: dict) -> None:
    task = get_task(task_name)
    unknown_keys(settings, task.defaults, task_name)
    if task_name == "segmentation":
        resolve_protocol({**task.defaults, **settings})


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_distillation_recipe_resolves(recipe, tmp_path):
    from distill.student.config import get_config
    from distill.student.model import Student

    cfg = load_config(recipe, {"world": "/w", "teachers": "/t"}).resolve_paths(tmp_path / "out")
    for t in cfg.teachers:
        check_encoder_spec(t.spec)
    with torch.device("meta"):   # the real class at full size, no memory
        student = Student(get_config(cfg.student.config))
    assert sum(p.numel() for p in student.parameters()) > 0


def test_the_paper_recipes_name_registered_teacher_kinds():
    for name in ("stage1.json", "stage2.json"):
        cfg = load_config(ROOT / "distill" / "recipes" / name)
        kinds = {t.name: parse_spec(t.spec)[0] for t in cfg.teachers}
        assert kinds == {"siglip2": "siglip2", "dinov3": "dinov3"}, (name, kinds)


def test_a_misspelt_or_unknown_spec_option_is_named():
    with pytest.raises(TypeError, match=r"the radio loader got unknown option\(s\) adaptor; it takes: .*adaptors"):
        resolve_spec("radio:radio_v2.5-h?adaptor=siglip")
    with pytest.raises(KeyError, match="unknown encoder kind 'hf'.*Known kinds: .*dinov3"):
        resolve_spec("hf:google/siglip2-so400m-patch16-naflex")


@pytest.mark.parametrize("suite_name", list_suites())
def test_every_suite_names_known_readers_tasks_and_task_settings(suite_name):
    suite = load_suite(suite_name)
    tasks = set(list_tasks())
    for ds in suite["datasets"]:
        assert ds["reader"] in DATASETS, (ds["id"], ds["reader"])
        assert set(ds["tasks"]) <= tasks | {"grounding"}, ds["id"]   # grounding: `amoe ground eval`
        for task_name, settings in (ds.get("task_cfg") or {}).items():
            assert task_name in ds["tasks"], (ds["id"], task_name)
            check_task_settings(task_name, settings)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_resolves_to_cells_with_valid_settings(sweep, tmp_path):
    cfg = load_sweep_config(sweep)
    suite = load_suite(cfg["suite"])
    for model in cfg["models"]:
        check_encoder_spec(model)
    h = Harness(out_dir=tmp_path, cache=None, task_cfg=cfg.get("task_cfg") or {})
    cells = plan_cells(cfg, suite)
    assert cells
    datasets = {d["id"]: d for d in suite["datasets"]}
    for cell in cells:
        check_task_settings(cell.task, h.task_settings(get_task(cell.task), cell.task, datasets[cell.dataset]))


def test_the_segmentation_protocol_follows_the_dataset():
    """The paper suite scores ADE20K and Cityscapes with the official protocol by itself; the short
    mini-world schedule is used for the mini-world only; a dataset of a user's own suite that says
    nothing gets the paper's protocol, not the toy one; a sweep's own setting still wins."""
    task = get_task("segmentation")
    h = Harness(out_dir=Path("."), cache=None)
    paper = {d["id"]: d for d in load_suite("paper")["datasets"]}
    mini = {d["id"]: d for d in load_suite("miniworld")["datasets"]}
    assert h.task_settings(task, "segmentation", paper["ade20k"])["preset"] == "amoe"
    assert h.task_settings(task, "segmentation", paper["cityscapes"])["preset"] == "amoe"
    assert h.task_settings(task, "segmentation", mini["mw-seg"])["preset"] == "miniworld"
    assert h.task_settings(task, "segmentation", {"id": "mine", "reader": "ade20k"})["preset"] == "amoe"
    radio = Harness(out_dir=Path("."), cache=None, task_cfg={"segmentation": {"preset": "radio"}})
    assert radio.task_settings(task, "segmentation", paper["ade20k"])["preset"] == "radio"
    # the preset is part of a cell's identity: the same cell under another protocol is another result
    from distill.results import Cell
    cell = Cell("pixels:24", "segmentation", "ade20k", 512)
    assert h.identify(cell, load_suite("paper")).settings != radio.identify(cell, load_suite("paper")).settings


def test_the_other_shipped_configs_load():
    from amoe.quickstart import load_settings
    from benchmarks.evidence import CLAIMS_DIR, load_claims
    from distill.curation.hierarchy import CONFIG_DIR, load_cluster_config
    from distill.teachers.common import load_recipe
    from grounding_vlm.train import CONFIGS_DIR, load_config as load_grounding_config

    for fast in (False, True):
        assert load_settings(fast=fast)
        assert load_recipe(fast=fast)
    for p in sorted(CONFIG_DIR.glob("*.json")):
        assert load_cluster_config(p.stem).levels
    for p in sorted(CONFIGS_DIR.glob("*.json")):
        assert load_grounding_config(p.stem)["init"]["kind"]
    for p in sorted(CLAIMS_DIR.glob("*.json")):
        assert load_claims(p.stem)["claims"]


@pytest.mark.parametrize("fast", [False, True], ids=["default", "fast"])
def test_the_miniworld_recipe_reads_each_teacher_at_its_trained_input_size(fast):
    """A mini-world teacher is trained at one input size; read at the student's larger sizes it is
    another model (the SigLIP2 teacher's zero-shot falls from 33.5 % at 48 px to 19 % at 128 px), and the
    student would learn that one. The quickstart's recipes (its student's, on the pretraining scenes,
    and its ablations'), smoke run included, read every teacher at its own default size (what that means
    for the runner: tests/test_train_engine.py)."""
    from amoe.quickstart import load_settings
    from distill.train.config import TEACHER_OWN_SIZE

    d = load_settings(fast=fast)["distill"]
    recipes = [load_config(d[k], d["overrides"]) for k in ("recipe", "ablation_recipe")]
    assert [Path(s.path).parts[-2:] for s in recipes[0].data.sources] == [("pretrain", "shards")]
    assert [Path(s.path).parts[-2:] for s in recipes[1].data.sources] == [("pool", "shards")]
    for cfg in recipes:
        assert {t.name: t.resolution for t in cfg.teachers} == {"siglip2": TEACHER_OWN_SIZE, "dinov3": TEACHER_OWN_SIZE}
