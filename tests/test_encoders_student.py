"""SigLino students as encoders: official checkpoints, our exports (PHI-S inverse, borrowed text
towers), random exports for the quickstart, the HF remote-code route, and open_clip."""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from distill.encoders.base import MissingHeadError
from distill.encoders.common import RemoteCodeNotAllowedError
from distill.encoders.registry import detect_kind, load_encoder
from distill.encoders.student import export_random_student, student_export_complete
from distill.encoders.student import release_config_for, save_student
from distill.student import ImageProcessor, Student
from test_encoders_standins import image, make_dinov3_dir, make_siglip2_dir


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    make_siglip2_dir(root / "siglip2", width=32)
    make_dinov3_dir(root / "dinov3", width=48)
    return root


def test_random_export_roundtrip(tmp_path):
    out = export_random_student(tmp_path / "s", config="tiny-moe", seed=0)
    assert student_export_complete(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "amoe-student" and cfg["student_config"]["dim"] == 64
    assert detect_kind(out) == "student"
    enc = load_encoder(str(out))
    assert enc.heads == ("siglino", "siglip2", "dinov3") and enc.text_heads == ()
    xs = [enc.preprocess(image(50, 90), resolution=64), enc.preprocess(image(64, 64), resolution=48)]
    f = enc.encode(xs)
    assert f.grids == [tuple(s // 16 for s in x.shape[1:]) for x in xs]
    assert {h: v.shape[1] for h, v in f.summary.items()} == {"siglino": 64, "siglip2": 64, "dinov3": 48}
    assert [p.shape[0] for p in f.patches["dinov3"]] == [h * w for h, w in f.grids]
    assert f.registers.shape == (2, 4, 64)
    # the same numbers as the Student run directly on the release processor's output
    model = Student("tiny-moe")
    model.load_state_dict(enc.model.state_dict())
    ref = model.forward_packed([ImageProcessor(min_pixels=64 * 64, max_pixels=64 * 64).to_tensor(image(50, 90))])[0]
    torch.testing.assert_close(f.summary["siglip2"][0], ref.summary_features["siglip2"][0], atol=1e-5, rtol=1e-4)
    # seeded: same seed -> same weights; another seed -> different
    same = load_encoder(f"student:{export_random_student(tmp_path / 's2', seed=0)}")
    other = load_encoder(f"student:{export_random_student(tmp_path / 's3', seed=1)}")
    assert same.fingerprint() == enc.fingerprint() != other.fingerprint()
    assert enc.num_params > enc.active_params > 0      # top-2 of 8 experts are active


def test_export_complete_detects_damage(tmp_path):
    out = export_random_student(tmp_path / "s", config="tiny-moe")
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    assert not student_export_complete(out)
    out = export_random_student(tmp_path / "t", config="tiny-moe")
    (out / "config.json").unlink()
    assert not student_export_complete(out)
    assert not student_export_complete(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="amoe-student"):
        load_encoder(f"student:{out}")


def test_random_export_sized_to_teachers_borrows_text(tmp_path, teachers):
    out = export_random_student(tmp_path / "s", config="tiny-moe", seed=3, teachers=teachers)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["student_config"]["teachers_dim"] == [32, 48]
    rel = os.path.relpath(teachers / "siglip2", out)   # relative to the export: the run folder can move
    assert cfg["teachers"]["siglip2"] == {"spec": f"siglip2:{rel}", "head": "siglip2"}
    enc = load_encoder(f"student:{out}")
    assert enc.teacher_specs["siglip2"]["spec"] == f"siglip2:{os.path.normpath(out / rel)}"
    f = enc.encode([enc.preprocess(image(40, 60), resolution=64)])
    assert f.summary["siglip2"].shape == (1, 32) and f.summary["dinov3"].shape == (1, 48)
    # zero-shot the AMoE way: student image features vs the SigLIP2 teacher's text tower
    assert enc.text_heads == ("siglip2",)            # the DINOv3 teacher has no text tower
    teacher = load_encoder(str(teachers / "siglip2"))
    texts = ["a photo of the cat", "red circle"]
    torch.testing.assert_close(enc.encode_text(texts, "siglip2"), teacher.encode_text(texts, "siglip2"))
    assert enc.logit_scale("siglip2") == pytest.approx(teacher.logit_scale("siglip2"))
    for head in ("dinov3", "siglino"):
        with pytest.raises(MissingHeadError):
            enc.encode_text(texts, head)
    # a teacher that is gone leaves the image side working and says why there is no text
    spec = json.loads((out / "config.json").read_text())
    spec["teachers"]["siglip2"]["spec"] = "siglip2:/gone/teachers/siglip2"
    (out / "config.json").write_text(json.dumps(spec))
    moved = load_encoder(f"student:{out}")
    with pytest.warns(UserWarning, match="could not be loaded"):
        assert moved.text_heads == ()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        moved.encode_text(["a cat"], "siglip2")


def test_run_folder_with_teachers_and_student_can_move(tmp_path, teachers):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(teachers, run / "teachers")
    export_random_student(run / "students" / "random-init", config="tiny-moe", teachers=run / "teachers")
    shutil.move(str(run), str(tmp_path / "moved"))
    enc = load_encoder(f"student:{tmp_path / 'moved' / 'students' / 'random-init'}")
    assert enc.text_heads == ("siglip2",)
    assert enc.encode_text(["a red circle"], "siglip2").shape == (1, 32)


def test_phis_inverse_maps_back_to_teacher_space(tmp_path):
    from distill.phis import PhiS

    model = Student("tiny-moe")
    out = tmp_path / "e"
    (out / "phis").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    std = {"siglip2": PhiS.fit(torch.randn(200, 64, generator=g) * 3 + 1),
           "dinov3": PhiS.fit(torch.randn(200, 48, generator=g) * 0.5 - 2)}
    phis = {}
    for head, s in std.items():
        for kind in ("summary", "patches"):
            s.save(out / "phis" / f"{head}.{kind}.safetensors")
            phis.setdefault(head, {})[kind] = f"phis/{head}.{kind}.safetensors"
    save_student(model.state_dict(), model.config, out, metadata={"phis": phis, "teachers": {}})
    assert student_export_complete(out)
    raw = load_encoder(f"student:{out}?phis_inverse=false")
    mapped = load_encoder(f"student:{out}")
    x = [raw.preprocess(image(48, 64), resolution=64)]
    fr, fm = raw.encode(x), mapped.encode(x)
    for head in ("siglip2", "dinov3"):
        torch.testing.assert_close(fm.summary[head], std[head].inverse(fr.summary[head]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fm.patches[head][0], std[head].inverse(fr.patches[head][0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fm.summary["siglino"], fr.summary["siglino"])    # the backbone has no teacher
    assert raw.fingerprint() != mapped.fingerprint()
    (out / "phis" / "dinov3.patches.safetensors").unlink()
    assert not student_export_complete(out)


def test_official_checkpoint_weights_only(tmp_path):
    model = Student("tiny-moe")
    torch.nn.init.normal_(model.layers["0"].attention.wo.weight, std=0.05)  # a non-trivial forward
    ckpt = tmp_path / "tiny-moe.pt"
    torch.save(model.state_dict(), ckpt)
    enc = load_encoder(str(ckpt))                     # bare .pt -> siglino; config from the file name
    assert enc.kind == "siglino"
    x = enc.preprocess(image(64, 96))
    f = enc.encode([x])
    ref = model.eval().forward_packed([x])[0]
    torch.testing.assert_close(f.summary["siglino"], ref.summary_features["siglino"], atol=1e-5, rtol=1e-4)
    assert f.grids == [tuple(ref.spatial_shapes[0].tolist())]
    # file names of the releases map to the code's config keys
    assert release_config_for("amoe-0.3B.pt") == "siglino-0.3B"
    assert release_config_for("/x/dense-30M.pt") == "dense-30M"
    other = tmp_path / "weights.pt"
    torch.save(model.state_dict(), other)
    with pytest.raises(ValueError, match="config=siglino-0.3B"):
        load_encoder(f"siglino:{other}")
    assert load_encoder(f"siglino:{other}?config=tiny-moe").heads == ("siglino", "siglip2", "dinov3")
    with pytest.raises(KeyError, match="missing keys"):     # strict: a checkpoint of another config
        load_encoder(f"siglino:{other}?config=moe-cpu-small")


def test_official_checkpoint_refuses_pickled_code(tmp_path):
    bad = tmp_path / "amoe-0.3B.pt"
    torch.save({"w": torch.zeros(1), "x": object.__new__(_Evil)}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        load_encoder(str(bad))


class _Evil:
    pass


def test_remote_siglino_is_opt_in_and_follows_the_release_contract(tmp_path):
    model = Student("tiny-moe").eval()
    with pytest.raises(RemoteCodeNotAllowedError):
        load_encoder("siglino:tiiuae/siglino-moe-0.3-0.6B", hf_load=lambda mid: model)
    enc = load_encoder("siglino:tiiuae/siglino-moe-0.3-0.6B", hf_load=lambda mid: model, trust_remote_code=True)
    xs = [enc.preprocess(image(64, 96)), enc.preprocess(image(48, 48))]
    f = enc.encode(xs)
    ref = [model.forward_packed([x])[0] for x in xs]
    for i in range(2):
        torch.testing.assert_close(f.summary["siglip2"][i], ref[i].summary_features["siglip2"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(f.patches["dinov3"][i], ref[i].patch_features["dinov3"][0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- open_clip (tiny timm tower)
def _tiny_openclip_config(tmp_path):
    import open_clip
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    name = "vit_amoe_test_tiny_siglip"
    if name not in timm.list_models(name):
        @register_model
        def vit_amoe_test_tiny_siglip(pretrained=False, **kw):
            args = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, class_token=False,
                        global_pool="map", no_embed_class=True)
            known = inspect.signature(VisionTransformer.__init__).parameters
            args.update({k: v for k, v in kw.items() if k in known})
            return VisionTransformer(**args)
    cfg = {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
           "vision_cfg": {"image_size": 32, "timm_model_name": name, "timm_model_pretrained": False,
                          "timm_pool": "map", "timm_proj": "none"},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                        "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}}
    f = tmp_path / "AMoE-Test-Tiny-SigLIP2.json"
    f.write_text(json.dumps(cfg))
    open_clip.add_model_config(f)
    return "AMoE-Test-Tiny-SigLIP2"


def test_openclip_tiny_timm_tower(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    name = _tiny_openclip_config(tmp_path)
    enc = load_encoder(f"openclip:{name}?pretrained=none", tokenizer=SimpleTokenizer(context_length=16,
                                                                                      clean="canonicalize"))
    x = enc.preprocess(image(50, 90))
    assert tuple(x.shape) == (3, 32, 32)
    f = enc.encode([x, enc.preprocess(image(50, 90), resolution=48)])
    assert f.grids == [(2, 2), (3, 3)] and [p.shape[0] for p in f.patches["siglip2"]] == [4, 9]
    with torch.no_grad():
        enc._ensure_size((32, 32))
        ref = enc.model.encode_image(x[None])
    torch.testing.assert_close(f.summary["siglip2"][:1], ref, atol=1e-5, rtol=1e-4)
    # back at the trained size the pristine position table is used again
    torch.testing.assert_close(enc.trunk.pos_embed, enc._pristine[0])
    assert enc.encode_text(["A cat!", "a dog"], "siglip2").shape == (2, 32)
    assert enc.num_params == sum(p.numel() for p in enc.model.parameters())
    with pytest.raises(ValueError, match="no model"):
        load_encoder("openclip:ViT-NOPE-16")


def test_cli_show_student(tmp_path, capsys):
    from amoe.cli import main

    out = export_random_student(tmp_path / "s", config="tiny-moe", seed=0)
    assert main(["encoders", "show", str(out), "--resolution", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "student" and info["summary_dims"] == {"siglino": 64, "siglip2": 64, "dinov3": 48}
    assert info["registers"] == [4, 64] and 0 < info["active_params"] < info["num_params"]
