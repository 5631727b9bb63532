"""Encoder registry and the Hugging Face / torch.hub loaders, offline on tiny real-class models."""
from __future__ import annotations

import json

import pytest
import torch

from distill.encoders.base import MissingHeadError
from distill.encoders.common import HubUnreachableError, RemoteCodeNotAllowedError, aspect_size, canonicalize_text
from distill.encoders.registry import UnknownEncoderError, detect_kind, list_loaders, load_encoder, parse_spec
from test_encoders_standins import (TinyRADIO, image, make_dinov3_dir, make_siglip2_dir, make_siglip_dir)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"siglip2": make_siglip2_dir(root / "siglip2", text_length=16),  # like the mini-world teachers
            "siglip": make_siglip_dir(root / "siglip"),
            "dinov3": make_dinov3_dir(root / "dinov3"),
            "dinov3_noproc": make_dinov3_dir(root / "dinov3_noproc", processor=False),
            "siglip2_noproc": make_siglip2_dir(root / "siglip2_noproc", processor=False),
            "siglip2_notok": make_siglip2_dir(root / "siglip2_notok", tokenizer=False),
            "root": root}


# ---------------------------------------------------------------- registry
def test_registry_lists_every_family():
    kinds = {i.kind for i in list_loaders()}
    assert {"siglip2", "openclip", "dinov3", "radio", "radio-hf", "siglino", "student"} <= kinds
    assert all(i.description for i in list_loaders())


def test_parse_spec_query_and_bare_paths(dirs):
    assert parse_spec("radio:radio_v2.5-h?adaptors=siglip,clip&trust_remote_code=1") == (
        "radio", "radio_v2.5-h", {"adaptors": "siglip,clip", "trust_remote_code": 1})
    assert parse_spec(str(dirs["dinov3"]))[0] is None
    with pytest.raises(UnknownEncoderError, match="did you mean 'siglip2'"):
        load_encoder("siglp2:whatever")
    with pytest.raises(FileNotFoundError, match="neither KIND:ARG"):
        load_encoder("/no/such/model/dir")
    with pytest.raises(ValueError, match="no argument"):
        parse_spec("dinov3:")


def test_detect_kind(dirs, tmp_path):
    assert detect_kind(dirs["siglip2"]) == "siglip2"
    assert detect_kind(dirs["siglip"]) == "siglip2"
    assert detect_kind(dirs["dinov3"]) == "dinov3"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        detect_kind(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"")
    assert detect_kind(tmp_path / "x.pt") == "siglino"


def test_hub_id_offline_names_the_fix():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder("siglip2:/no/such/model")        # a missing path is a path error, not a hub error
    with pytest.raises(HubUnreachableError, match="siglip2:DIR"):
        load_encoder("siglip2:google/siglip2-so400m-patch16-naflex")
    with pytest.raises(HubUnreachableError, match="dinov3:DIR"):
        load_encoder("dinov3:facebook/dinov3-vitl16-pretrain-lvd1689m")


def test_text_canonicalisation_and_sizes():
    assert canonicalize_text("A Photo, of a  CAT!") == "a photo of a cat"
    assert aspect_size(480, 640, 512, 16) == (448, 592)
    assert aspect_size(10, 2000, 32, 16) == (16, 448)


# ---------------------------------------------------------------- SigLIP2 NaFlex
def test_siglip2_naflex_matches_the_model_and_processor(dirs):
    from transformers import AutoImageProcessor, Siglip2Model

    enc = load_encoder(f"siglip2:{dirs['siglip2']}")
    assert enc.heads == ("siglip2",) and enc.text_heads == ("siglip2",)
    imgs = [image(50, 90, 0), image(64, 64, 1)]
    xs = [enc.preprocess(im, resolution=64) for im in imgs]
    assert [tuple(x.shape) for x in xs] == [(3, 48, 80), (3, 64, 64)]  # native aspect within 16 patches
    f = enc.encode(xs)
    assert f.grids == [(3, 5), (4, 4)]
    assert [tuple(p.shape) for p in f.patches["siglip2"]] == [(15, 32), (16, 32)]
    # the same numbers as the HF processor + model on the raw images
    proc = AutoImageProcessor.from_pretrained(dirs["siglip2"])
    model = Siglip2Model.from_pretrained(dirs["siglip2"]).eval()
    batch = proc(images=imgs, max_num_patches=16, return_tensors="pt")
    with torch.no_grad():
        ref = model.vision_model(pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"],
                                 spatial_shapes=batch["spatial_shapes"])
    torch.testing.assert_close(f.summary["siglip2"], ref.pooler_output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f.patches["siglip2"][0], ref.last_hidden_state[0, :15], atol=1e-5, rtol=1e-4)


def test_siglip2_text_rule(dirs):
    from transformers import PreTrainedTokenizerFast, Siglip2Model

    enc = load_encoder(str(dirs["siglip2"]))
    a = enc.encode_text(["A photo, of the CAT!", "red circle"], "siglip2")
    b = enc.encode_text(["a photo of the cat", "red circle"], "siglip2")
    assert a.shape == (2, 32)
    torch.testing.assert_close(a, b)
    tok = PreTrainedTokenizerFast.from_pretrained(dirs["siglip2"])
    ids = tok(["a photo of the cat"], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert ids[0, 0] != tok.pad_token_id and ids[0, -1] == tok.pad_token_id   # right padding to the positions
    model = Siglip2Model.from_pretrained(dirs["siglip2"]).eval()
    with torch.no_grad():
        ref = model.text_model(input_ids=ids).pooler_output
    torch.testing.assert_close(b[:1], ref, atol=1e-5, rtol=1e-4)
    assert enc.logit_scale("siglip2") == pytest.approx(float(model.logit_scale.detach().exp()))
    with pytest.raises(MissingHeadError):
        enc.encode_text(["x"], "dinov3")


def test_siglip2_missing_processor_or_tokenizer(dirs):
    with pytest.raises(FileNotFoundError, match="image-processor config"):
        load_encoder(f"siglip2:{dirs['siglip2_noproc']}")
    enc = load_encoder(f"siglip2:{dirs['siglip2_notok']}")
    assert enc.text_heads == ()
    enc.encode([enc.preprocess(image(32, 32))])
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        enc.encode_text(["a cat"], "siglip2")


def test_siglip_fixed_size(dirs):
    enc = load_encoder(str(dirs["siglip"]))
    assert enc.heads == ("siglip",)
    xs = [enc.preprocess(image(50, 90)), enc.preprocess(image(40, 40), resolution=48)]
    assert [tuple(x.shape) for x in xs] == [(3, 32, 32), (3, 48, 48)]
    f = enc.encode(xs)
    assert f.grids == [(2, 2), (3, 3)] and f.summary["siglip"].shape == (2, 32)
    assert enc.encode_text(["a cat"], "siglip").shape == (1, 32)


# ---------------------------------------------------------------- DINOv3
def test_dinov3_cls_registers_patches(dirs):
    from transformers import DINOv3ViTModel

    enc = load_encoder(f"dinov3:{dirs['dinov3']}")
    xs = [enc.preprocess(image(50, 90), resolution=64), enc.preprocess(image(64, 64)), enc.preprocess(image(30, 200), 64)]
    assert [tuple(x.shape[1:]) for x in xs] == [(48, 80), (64, 64), (32, 160)]
    f = enc.encode(xs)
    assert f.grids == [(3, 5), (4, 4), (2, 10)]
    assert f.registers.shape == (3, 4, 48) and f.cls.shape == (3, 48)
    model = DINOv3ViTModel.from_pretrained(dirs["dinov3"]).eval()
    with torch.no_grad():
        ref = model(pixel_values=xs[0][None])
    torch.testing.assert_close(f.summary["dinov3"][0], ref.pooler_output[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f.registers[0], ref.last_hidden_state[0, 1:5], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f.patches["dinov3"][0], ref.last_hidden_state[0, 5:], atol=1e-5, rtol=1e-4)
    assert enc.text_heads == ()
    with pytest.raises(MissingHeadError):
        enc.encode_text(["a cat"], "dinov3")


def test_bad_inputs_name_the_problem(dirs):
    enc = load_encoder(str(dirs["dinov3"]))
    with pytest.raises(TypeError, match="PIL image"):
        enc.preprocess(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="CHW tensor"):
        enc.encode([torch.zeros(32, 32)])
    with pytest.raises(ValueError, match="no images"):
        enc.encode([])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc.encode([torch.zeros(3, 30, 32)])
    with pytest.raises(TypeError, match="unknown option"):
        load_encoder(f"dinov3:{dirs['dinov3']}?resolutoin=3")


def test_dinov3_without_processor_uses_imagenet_stats(dirs):
    enc = load_encoder(str(dirs["dinov3_noproc"]))
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406)) and enc.default_side == 64
    assert enc.encode([enc.preprocess(image(20, 20))]).grids == [(4, 4)]


# ---------------------------------------------------------------- RADIO (remote code, injected hub)
def test_radio_requires_opt_in_and_follows_the_contract(monkeypatch):
    seen = {}

    def hub_load(repo, entry, version, adaptor_names, **kw):
        seen.update(repo=repo, entry=entry, version=version, adaptors=adaptor_names)
        return TinyRADIO(adaptor_names)

    monkeypatch.delenv("AMOE_TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(RemoteCodeNotAllowedError):
        load_encoder("radio:radio_v2.5-h?adaptors=siglip", hub_load=hub_load)
    with pytest.raises(ValueError, match="radio_v2.5-h"):
        load_encoder("radio:radio_v2.5-hh", hub_load=hub_load, trust_remote_code=True)
    monkeypatch.setenv("AMOE_TRUST_REMOTE_CODE", "1")
    enc = load_encoder("radio:radio_v2.5-l?adaptors=siglip,clip", hub_load=hub_load)
    assert seen == {"repo": "NVlabs/RADIO", "entry": "radio_model", "version": "radio_v2.5-l",
                    "adaptors": ["siglip", "clip"]}
    assert enc.heads == ("radio", "siglip", "clip") and enc.text_heads == ("siglip", "clip")
    xs = [enc.preprocess(image(50, 90)), enc.preprocess(image(64, 64), resolution=32)]
    assert float(xs[0].min()) >= 0.0 and float(xs[0].max()) <= 1.0
    f = enc.encode(xs)
    assert f.grids == [(3, 5), (2, 2)]
    assert f.summary["radio"].shape == (2, 24) and f.summary["siglip"].shape == (2, 32)
    assert [tuple(p.shape) for p in f.patches["clip"]] == [(15, 32), (4, 32)]
    assert 0.0 <= enc.model.seen_range[0] and enc.model.seen_range[1] <= 1.0
    assert enc.encode_text(["a cat", "a dog"], "siglip").shape == (2, 32)


def test_radio_hf_route_injected():
    enc = load_encoder("radio-hf:nvidia/RADIO-H", trust_remote_code=True,
                       hf_load=lambda mid, adaptors: TinyRADIO(adaptors))
    both = load_encoder("radio-hf:nvidia/RADIO-H", trust_remote_code=True, adaptor_names=["clip"],
                        hf_load=lambda mid, adaptors: TinyRADIO(adaptors))
    assert both.heads == ("radio", "clip") and both.text_heads == ("clip",)
    f = enc.encode([enc.preprocess(image(40, 40))])
    assert enc.heads == ("radio",) and f.summary["radio"].shape == (1, 24)
    with pytest.raises(RemoteCodeNotAllowedError):
        load_encoder("radio-hf:nvidia/RADIO-H", hf_load=lambda mid, adaptors: TinyRADIO(adaptors))


# ---------------------------------------------------------------- common behaviour + CLI
def test_fingerprint_to_and_params(dirs):
    a = load_encoder(str(dirs["dinov3"]))
    b = load_encoder(str(dirs["dinov3_noproc"]))
    assert a.fingerprint() == load_encoder(str(dirs["dinov3"])).fingerprint()
    assert a.fingerprint() != b.fingerprint()          # same arch, different weights/preprocessing
    fp32 = a.fingerprint()
    a.to("cpu", torch.bfloat16)
    assert a.fingerprint() != fp32 and next(a.model.parameters()).dtype == torch.bfloat16
    f = a.encode([a.preprocess(image(32, 32)).to(torch.bfloat16)])
    assert f.summary["dinov3"].dtype == torch.bfloat16
    assert a.num_params == sum(p.numel() for p in a.model.parameters()) > 0


def test_cli_list_and_show(dirs, capsys):
    from amoe.cli import main

    assert main(["encoders", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in rows} >= {"siglip2", "dinov3", "student"} and all(r["available"] for r in rows)
    assert main(["encoders", "show", f"dinov3:{dirs['dinov3']}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["heads"] == ["dinov3"] and info["summary_dims"] == {"dinov3": 48} and info["registers"] == [4, 48]
    assert main(["encoders", "show", "dinov3:/no/such"]) == 2
    assert "dinov3" in capsys.readouterr().err
