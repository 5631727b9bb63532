"""Bad input -> clear errors; checkpoint loading (official .pt, safetensors); the perf command."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distill.student import ImageProcessor, Student, load_official_checkpoint
from distill.student.config import get_config

SMALL = {"dim": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16, "moe_dim": 16,
         "moe_args": {"num_experts": 4, "num_shared_experts": 0, "top_k": 2}, "teachers_dim": [32, 16]}


@pytest.fixture(scope="module")
def model():
    return Student(SMALL)


def test_unknown_config_name_lists_known(capsys):
    with pytest.raises(KeyError, match=r"unknown student config 'siglino-moe-0.3B'; known: .*dense-30M.*siglino-0.3B"):
        get_config("siglino-moe-0.3B")
    from amoe.cli import main
    assert main(["ground", "perf", "--vision", "nope"]) == 2          # one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown student config 'nope'" in err


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match=r"unknown key .dimm. in the student config \(did you mean .dim.\?\)"):
        get_config({**SMALL, "dimm": 3})
    with pytest.raises(ValueError, match=r"unknown key .num_expert. in moe_args \(did you mean .num_experts.\?\)"):
        get_config({**SMALL, "moe_args": {"num_expert": 4}})
    with pytest.raises(ValueError, match="missing required config key 'dim'"):
        get_config({"n_layers": 1})


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match=r"image 0: expected shape \(3, H, W\)"):
        model.forward_packed([torch.randn(4, 32, 32)])
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 5, 32, 32))


def test_images_smaller_than_a_patch(model):
    with pytest.raises(ValueError, match=r"8x32 is smaller than one 16x16 patch"):
        model.forward_packed([torch.randn(3, 32, 32), torch.randn(3, 8, 32)][1:])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.forward_packed([torch.randn(3, 40, 32)])
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        ImageProcessor()(np.zeros((10, 40, 3), dtype=np.uint8))


def test_non_float_inputs(model):
    with pytest.raises(TypeError, match=r"dtype torch.uint8; expected normalised floating-point"):
        model.forward_packed([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 4, 768, dtype=torch.int64), None, torch.tensor([[2, 2]]))


def test_bad_patch_inputs(model):
    with pytest.raises(ValueError, match=r"\(N, L, 768\)"):
        model(torch.randn(1, 4, 700), None, torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="spatial_shapes .* is required"):
        model(torch.randn(1, 4, 768))
    with pytest.raises(ValueError, match=r"spatial shape 2x3 = 6 patches, but padding_mask marks 4"):
        model(torch.randn(1, 6, 768), torch.tensor([[1, 1, 1, 1, 0, 0]]), torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="exceed max_num_patches"):
        ImageProcessor()(np.zeros((256, 256, 3), dtype=np.uint8), max_num_patches=10)
    with pytest.raises(ValueError, match="non-empty list"):
        model.forward_packed([])


def test_state_dict_mismatch_lists_keys(model):
    sd = model.state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        Student(SMALL).load_state_dict(sd)
    msg = str(err.value)
    assert "missing keys (1): ['norm.weight']" in msg and "unexpected keys (1): ['extra.weight']" in msg
    sd = model.state_dict()
    sd["norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"norm.weight: checkpoint \(5,\) vs model \(32,\)"):
        Student(SMALL).load_state_dict(sd)


def test_load_official_pt_and_safetensors(model, tmp_path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pt = tmp_path / "amoe-small.pt"
    torch.save(sd, pt)  # the release's format: a plain torch.save of the state_dict
    loaded = Student.from_pretrained(SMALL, pt)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k])
    st = tmp_path / "small.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, str(st))
    assert set(load_official_checkpoint(st)) == set(sd)  # 'model.' prefix stripped


def test_unsafe_pickle_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pt")


def test_backend_options(model):
    with pytest.raises(ValueError, match="unknown attention_backend"):
        model(torch.randn(1, 4, 768), None, torch.tensor([[2, 2]]), attention_backend="fast")
    with pytest.raises(ValueError, match="unknown expert_backend"):
        Student(SMALL, expert_backend="cuda-magic")


def test_perf_command_prints_json(capsys):
    from amoe.cli import main

    rc = main(["student", "perf", "--json", "--config", "moe-cpu-small", "--images", "3", "--min-side", "32",
               "--max-side", "64", "--max-tokens", "64", "--repeats", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_backend"] == "segments" and report["device"] == "cpu"
    scores = report["packed"]["attention_scores"]
    assert scores["computed"] == scores["needed"] == sum((5 + (h // 16) * (w // 16)) ** 2
                                                         for h, w in report["image_sizes_px"])
    assert report["padded"]["attention_scores"]["backend"] == "sdpa"
    assert report["speedup_bound"]["attention"] == pytest.approx(
        report["padded"]["attention_scores"]["computed"] / scores["needed"], rel=1e-2)
    assert set(report["packed"]["forward_s_spread"]) == {"median", "min", "max"}
    assert report["packed"]["fwd_bwd_tokens_per_s"] > 0 and report["padded"]["forward_tokens_per_s"] > 0
    assert 0 < report["packed"]["fill_ratio"] <= 1
    assert report["real_tokens"] == sum(5 + (h // 16) * (w // 16) for h, w in report["image_sizes_px"])
