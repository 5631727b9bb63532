"""Extending without editing: an encoder, a dataset reader and a task registered from a module outside
the package (`amoe --import`, AMOE_PLUGINS, entry points) run a real sweep cell; the `timm:` kind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from amoe.cli import main as amoe_main
from distill import plugins
from distill.results import load_results

from test_trustworthy_numbers import digits_root, suite_file  # noqa: F401 (fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "amoe_plugin_example.py"


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """The documented example plus a module registering a dataset reader and a task."""
    shutil.copy(EXAMPLE, tmp_path / "amoe_plugin_example.py")
    (tmp_path / "amoe_plugin_more.py").write_text('''
from benchmarks.tasks.base import register_task
from distill.data.classification import load_imagefolder
from distill.data.registry import register_dataset

register_dataset("digits-folder", "classification", load_imagefolder, "an ImageFolder under another name")


class CountTask:
    name, version, roles, needs_patches, defaults = "count", "1", ("test",), False, {}

    def run(self, ctx, cfg):
        return {"items": float(len(ctx.features("test")))}


register_task(CountTask())
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV, "")      # recorded, so the CLI's own additions are undone afterwards
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setattr(plugins, "_entry_point_modules", None)   # rescanned under the test's entry points
    return tmp_path


def test_plugin_encoder_runs_a_sweep_cell_through_the_cli(tmp_path, digits_root, plugin_path, capsys):
    suite = suite_file(digits_root, tmp_path)
    rc = amoe_main(["--import", "amoe_plugin_example", "bench", "run", "--model", "colour-hist:8", "--task", "knn",
                    "--dataset", "digits", "--suite", str(suite), "--out", str(tmp_path / "res"),
                    "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    (rec,) = load_results(tmp_path / "res")
    assert rec["status"] == "ok" and rec["model"]["name"] == "colour-hist:8"
    assert 0 < rec["metrics"]["hist/top1"] <= 100
    # the same kind, listed by `amoe encoders list`
    assert amoe_main(["--import", "amoe_plugin_example", "encoders", "list"]) == 0
    assert "colour-hist" in capsys.readouterr().out


def test_plugin_dataset_and_task_through_the_environment(tmp_path, digits_root, plugin_path, monkeypatch):
    from benchmarks.cache import FeatureCache
    from benchmarks.sweep import Harness, run_sweep
    monkeypatch.setenv(plugins.ENV, "amoe_plugin_example,amoe_plugin_more")
    suite = {"name": "p", "datasets": [{"id": "d", "reader": "digits-folder", "root": str(digits_root / "folder"),
                                        "roles": {"train": "train", "test": "val"}, "tasks": ["count", "knn"]}]}
    (tmp_path / "p.json").write_text(json.dumps(suite))
    h = Harness(out_dir=tmp_path / "r", cache=FeatureCache(tmp_path / "c"), show_progress=False)
    summary = run_sweep({"suite": str(tmp_path / "p.json"), "models": ["colour-hist:4"], "tasks": ["count", "knn"]}, h)
    assert summary.ok == 2, summary.failures
    counts = [r for r in load_results(tmp_path / "r") if r["cell"]["task"] == "count"]
    assert counts[0]["metrics"]["items"] == 60.0


def test_entry_point_plugins_are_found(plugin_path, monkeypatch):
    class EP:
        value = "amoe_plugin_more"
    monkeypatch.setattr(plugins, "entry_points", lambda group: [EP()] if group == plugins.GROUP else [])
    assert "amoe_plugin_more" in plugins.load_plugins()
    from distill.data.registry import list_datasets
    assert "digits-folder" in list_datasets("classification")


def test_a_plugin_that_cannot_be_imported_is_one_line(plugin_path, capsys):
    assert amoe_main(["--import", "no_such_plugin_module", "encoders", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plugin module 'no_such_plugin_module' cannot be imported" in err[0]


# ---------------------------------------------------------------- timm

def _timm_checkpoint(name: str, path: Path) -> Path:
    import timm
    from safetensors.torch import save_file
    model = timm.create_model(name, pretrained=False)   # random weights in a file stand in for a checkpoint
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_timm_cnn_and_vit_backbones(tmp_path):
    from distill.encoders.registry import load_encoder
    from PIL import Image
    torch.manual_seed(0)
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    cnn = load_encoder(f"timm:resnet18?checkpoint={_timm_checkpoint('resnet18', tmp_path / 'r18.safetensors')}")
    f = cnn.encode([cnn.preprocess(img, 64)])
    assert f.summary["timm"].shape == (1, 512) and f.grids == [(2, 2)] and f.patches["timm"][0].shape == (4, 512)
    vit = load_encoder(f"timm:vit_tiny_patch16_224?checkpoint={_timm_checkpoint('vit_tiny_patch16_224', tmp_path / 'v.safetensors')}")
    f = vit.encode([vit.preprocess(img, 96)])     # another size than 224: the position table is resampled
    assert vit.patch_size == 16 and f.grids == [(6, 6)] and f.patches["timm"][0].shape == (36, 192)
    assert vit.text_heads == ()
    # the same weights from a file give the same fingerprint; other weights another
    again = load_encoder(f"timm:vit_tiny_patch16_224?checkpoint={tmp_path / 'v.safetensors'}")
    assert again.fingerprint() == vit.fingerprint() != cnn.fingerprint()


def test_timm_refuses_what_it_cannot_stand_behind(tmp_path):
    from distill.encoders.registry import load_encoder
    with pytest.raises(ValueError, match="exactly one of"):
        load_encoder("timm:resnet18")                         # random weights are no baseline
    with pytest.raises(ValueError, match="timm has no model 'resnet1800'"):
        load_encoder("timm:resnet1800?pretrained=1")
    wrong = _timm_checkpoint("resnet18", tmp_path / "r18.safetensors")
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_encoder(f"timm:resnet34?checkpoint={wrong}")
