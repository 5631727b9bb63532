"""The DINOv3 text branch (dino.txt): the real hub route (injected, offline), the mini-world head
folder, students and the official release borrowing it, and its bad-input messages."""
from __future__ import annotations

import shutil

import pytest
import torch

from distill.encoders.common import RemoteCodeNotAllowedError
from distill.encoders.dinotxt import (SUBFOLDER, DinoTxtShapeError, MiniDinoTxt, VisionHead, load_dinotxt,
                                      save_mini_dinotxt)
from distill.encoders.registry import load_encoder
from distill.encoders.student import export_random_student
from test_encoders_standins import image, make_dinov3_dir, make_siglip2_dir


class _OfficialLayout(torch.nn.Module):
    """What torch.hub's dino.txt entry returns, at test size: `visual_model.head` (blocks + ln_final),
    `encode_text(ids)` (N, 2C) and `logit_scale`."""

    def __init__(self, width: int):
        super().__init__()
        self.visual_model = torch.nn.Module()
        self.visual_model.head = VisionHead(width, 2, 2)
        self.text = torch.nn.EmbeddingBag(100, 2 * width)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode_text(self, ids):
        return self.text(ids)


class _Tok:
    def tokenize(self, texts):
        return torch.tensor([[len(w) % 100 for w in (t.split() + ["x"] * 4)[:4]] for t in texts])


def _mini_head(folder, width: int):
    from distill.teachers.tokenizer import train_tokenizer
    tok = train_tokenizer(["a red circle", "a blue square", "two shapes"], 32, 8)
    model = MiniDinoTxt({"dim": width, "heads": 2, "head_blocks": 1, "vocab_size": len(tok), "context_length": 8,
                         "text_dim": 16, "text_heads": 2, "text_layers": 1, "pad_id": int(tok.pad_token_id)})
    return save_mini_dinotxt(model.eval(), tok, folder)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    make_siglip2_dir(root / "siglip2", width=32)
    make_dinov3_dir(root / "dinov3", width=48)
    _mini_head(root / "dinov3" / SUBFOLDER, 48)
    return root


def test_real_route_is_opt_in_injectable_and_applies_the_head_to_our_tokens(tmp_path):
    d = make_dinov3_dir(tmp_path / "dinov3", width=48)
    calls = []

    def hub_load(repo, entry, **kw):
        calls.append((repo, entry, kw))
        return _OfficialLayout(48), _Tok()

    with pytest.raises(RemoteCodeNotAllowedError, match="AMOE_TRUST_REMOTE_CODE"):
        load_encoder(f"dinov3:{d}?dinotxt=hub", hub_load=hub_load)
    enc = load_encoder(f"dinov3:{d}?dinotxt=hub&trust_remote_code=1&dinotxt_weights=/w/head.pth", hub_load=hub_load)
    assert calls == [("facebookresearch/dinov3", "dinov3_vitl16_dinotxt_tet1280d20h24l", {"weights": "/w/head.pth"})]
    assert enc.heads == ("dinov3", "dinotxt") and enc.text_heads == ("dinotxt",)
    xs = [enc.preprocess(image(32, 48)), enc.preprocess(image(64, 64, seed=1))]
    f = enc.encode(xs)
    assert f.summary["dinotxt"].shape == (2, 96)
    # the joint embedding is the head on [CLS, patches]: [head CLS | mean head patch]
    head = enc.dinotxt.head
    for i in range(2):
        h = head(torch.cat([f.cls[i][None], f.patches["dinov3"][i]])[None])[0]
        torch.testing.assert_close(f.summary["dinotxt"][i], torch.cat([h[0], h[1:].mean(0)]), atol=1e-5, rtol=1e-4)
    assert enc.encode_text(["a red circle", "dog"], "dinotxt").shape == (2, 96)
    assert enc.logit_scale("dinotxt") == pytest.approx(float(torch.tensor(2.0).exp()))


def test_mini_head_folder_is_found_beside_the_teacher(teachers, tmp_path):
    enc = load_encoder(f"dinov3:{teachers / 'dinov3'}")
    assert enc.text_heads == ("dinotxt",) and enc.describe()["dinotxt"] == enc.dinotxt.fingerprint()
    # the fingerprint (every cache key) names weights, never a path: a moved teacher keeps its caches
    moved = shutil.copytree(teachers / "dinov3", tmp_path / "elsewhere" / "dinov3")
    assert load_encoder(f"dinov3:{moved}").fingerprint() == enc.fingerprint()
    f = enc.encode([enc.preprocess(image(40, 40))])
    assert f.summary["dinotxt"].shape == (1, 96)
    assert enc.encode_text(["a red circle"], "dinotxt").shape == (1, 96)
    off = load_encoder(f"dinov3:{teachers / 'dinov3'}?dinotxt=0")
    assert off.text_heads == () and off.describe()["dinotxt_missing"] == "disabled (?dinotxt=0)"
    # a reloaded folder gives the same numbers
    again = load_dinotxt(teachers / "dinov3" / SUBFOLDER)
    torch.testing.assert_close(again.encode_text(["a red circle"]), enc.encode_text(["a red circle"], "dinotxt"))


def test_teacher_without_text_head_says_why(tmp_path):
    enc = load_encoder(f"dinov3:{make_dinov3_dir(tmp_path / 'd', width=48)}")
    assert enc.text_heads == () and "has no 'dinotxt/' head folder" in enc.describe()["dinotxt_missing"]


def test_student_borrows_both_text_branches(teachers, tmp_path):
    out = export_random_student(tmp_path / "s", config="tiny-moe", teachers=teachers)
    enc = load_encoder(f"student:{out}")
    assert enc.text_heads == ("siglip2", "dinotxt") and "dinotxt" in enc.heads
    xs = [enc.preprocess(image(50, 90), resolution=64), enc.preprocess(image(64, 64), resolution=48)]
    f = enc.encode(xs)
    assert f.summary["dinotxt"].shape == (2, 96)
    ref = enc.dinotxt.image_embedding(f.summary["dinov3"], f.patches["dinov3"])
    torch.testing.assert_close(f.summary["dinotxt"], ref)
    assert enc.encode_text(["a red circle"], "dinotxt").shape == (1, 96)
    # the borrowed towers keep their identity, so the harness caches their text embeddings once
    teacher = load_encoder(f"dinov3:{teachers / 'dinov3'}")
    assert enc.text_fingerprint("dinotxt") == teacher.text_fingerprint("dinotxt") != teacher.fingerprint()
    assert enc.text_fingerprint("siglip2") == load_encoder(f"siglip2:{teachers / 'siglip2'}").fingerprint()
    other = export_random_student(tmp_path / "s2", config="tiny-moe", seed=1, teachers=teachers)
    assert load_encoder(f"student:{other}").text_fingerprint("siglip2") == enc.text_fingerprint("siglip2")


def test_student_whose_teacher_lacks_the_head_runs_with_siglip2_only(tmp_path):
    root = tmp_path / "t"
    make_siglip2_dir(root / "siglip2", width=32)
    make_dinov3_dir(root / "dinov3", width=48)
    enc = load_encoder(f"student:{export_random_student(tmp_path / 's', config='tiny-moe', teachers=root)}")
    assert enc.text_heads == ("siglip2",)
    assert "has no dino.txt head" in enc.describe()["dinotxt_missing"]
    assert "dinotxt" not in enc.encode([enc.preprocess(image(32, 32), resolution=32)]).summary


def test_head_of_another_width_is_refused_naming_both(teachers, tmp_path):
    _mini_head(tmp_path / "wide", 40)
    out = export_random_student(tmp_path / "s", config="tiny-moe", teachers=teachers)
    enc = load_encoder(f"student:{out}?dinotxt={tmp_path / 'wide'}")
    with pytest.raises(DinoTxtShapeError, match=r"takes 40-d DINOv3 tokens but .* gives 48-d"):
        enc.encode([enc.preprocess(image(32, 32), resolution=32)])
    with pytest.raises(DinoTxtShapeError, match="40-d"):
        load_encoder(f"dinov3:{teachers / 'dinov3'}?dinotxt={tmp_path / 'wide'}")


def test_official_release_gets_both_branches(teachers, tmp_path):
    from distill.student import Student
    ckpt = tmp_path / "amoe-tiny.pt"
    torch.save(Student("tiny-moe").state_dict(), ckpt)
    plain = load_encoder(f"siglino:{ckpt}?config=tiny-moe")
    assert plain.text_heads == () and "dinotxt" in plain.describe()["dinotxt_missing"]
    calls = []

    def hub_load(repo, entry, **kw):
        calls.append(entry)
        return _OfficialLayout(48), _Tok()

    enc = load_encoder(f"siglino:{ckpt}?config=tiny-moe&dinotxt=hub&trust_remote_code=1"
                       f"&siglip2_text=siglip2:{teachers / 'siglip2'}", hub_load=hub_load)
    assert enc.text_heads == ("siglip2", "dinotxt") and calls == ["dinov3_vitl16_dinotxt_tet1280d20h24l"]
    f = enc.encode([enc.preprocess(image(48, 48), resolution=48)])
    assert f.summary["dinotxt"].shape == (1, 96)
