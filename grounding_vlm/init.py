"""Initialising the VLM's vision experts from a SigLino student, with an explicit key mapping.

Sources:
- our student export folder (`model.safetensors` + `config.json` with "student_config", written by
  `distill/train/export.py` or the encoder registry);
- an official release `.pt` / `.safetensors` (`load_official_checkpoint`) together with a config
  name or dict (`siglino-0.3B`, ...), since the release file carries no config.
"scratch" keeps the fresh initialisation (the ablation's baseline). A student distilled from a
single teacher is just another student export: the ablation names it in its config.

Mapping (student key -> VLM key):
    cls_token, storage_tokens, img_projector.weight, freqs_cis_golden -> vision_embed.<same>
    layers.<i>.<rest>                                                 -> layers.<i>.vision.<rest>
    norm.weight                                                       -> vision_norm.weight
The student's adapters, MAP head and layer_norm_dinov3 are distillation heads the VLM does not use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from distill.student import Student, StudentConfig, get_config, load_official_checkpoint

UNUSED_PREFIXES = ("dinov3_adapter.", "siglip2_adapter.", "layer_norm_dinov3.",
                   "siglip2_multihead_attention_pooling_head.")
EMBED_KEYS = ("cls_token", "storage_tokens", "img_projector.weight", "freqs_cis_golden")


def student_to_vlm_keys(cfg: StudentConfig) -> dict[str, str]:
    """Every student state key the VLM uses -> its VLM key (built from the student's own key list)."""
    ref_keys = _student_keys(cfg)
    out = {}
    for k in ref_keys:
        if k.startswith(UNUSED_PREFIXES):
            continue
        if k in EMBED_KEYS:
            out[k] = f"vision_embed.{k}"
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            out[k] = f"layers.{i}.vision.{rest}"
        elif k == "norm.weight":
            out[k] = "vision_norm.weight"
        else:
            raise KeyError(f"student key {k!r} has no place in the VLM mapping; extend student_to_vlm_keys")
    return out


_KEY_CACHE: dict[str, list[str]] = {}


def _student_keys(cfg: StudentConfig) -> list[str]:
    sig = json.dumps(cfg.to_dict(), sort_keys=True)
    if sig not in _KEY_CACHE:
        with torch.device("meta"):
            _KEY_CACHE[sig] = list(Student(cfg).state_dict())
    return _KEY_CACHE[sig]


def read_student_export(path: str | Path) -> tuple[StudentConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a student export folder (model.safetensors + config.json)."""
    from distill.encoders.student import read_student_config  # the export format's one reader

    meta = read_student_config(path)
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} is not a complete student export: model.safetensors is missing")
    return get_config(meta["student_config"]), load_official_checkpoint(weights)


def load_student_source(spec: Mapping[str, Any]) -> tuple[StudentConfig, dict[str, torch.Tensor]]:
    """spec: {"kind": "student", "path": EXPORT_DIR} or {"kind": "official", "path": FILE.pt, "config": NAME}."""
    kind = spec.get("kind")
    if kind == "student":
        return read_student_export(_need(spec, "path"))
    if kind == "official":
        return get_config(_need(spec, "config")), load_official_checkpoint(_need(spec, "path"))
    raise ValueError(f"init kind {kind!r} has no student weights; use 'student', 'official' or 'scratch'")


def _need(spec, key):
    if not spec.get(key):
        raise ValueError(f"init spec {dict(spec)} needs '{key}'")
    return spec[key]


def load_vision_experts(vlm, student_state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy the student's weights into the VLM's vision experts. Every mapped key must exist with the
    VLM's shape; otherwise nothing is copied and the error names each offending key."""
    mapping = student_to_vlm_keys(vlm.config.vision)
    own = vlm.state_dict()
    missing = sorted(k for k in mapping if k not in student_state)
    shape_bad = [f"{k}: checkpoint {tuple(student_state[k].shape)} vs VLM {tuple(own[v].shape)} ({v})"
                 for k, v in mapping.items() if k in student_state and student_state[k].shape != own[v].shape]
    unexpected = sorted(k for k in student_state if k not in mapping and not k.startswith(UNUSED_PREFIXES))
    if missing or shape_bad or unexpected:
        vc = vlm.config.vision
        raise ValueError(
            f"student checkpoint does not fit the VLM's vision config (dim {vc.dim}, {vc.n_layers} layers, "
            f"{vc.moe_args.num_experts} experts):\n"
            + (f"  missing keys: {missing}\n" if missing else "")
            + ("  shape mismatches:\n    " + "\n    ".join(shape_bad) + "\n" if shape_bad else "")
            + (f"  keys the VLM has no place for: {unexpected}\n" if unexpected else "")
            + "Set the VLM config's vision architecture to the student's (vision: \"from_init\") or pick the "
              "matching checkpoint.")
    with torch.no_grad():
        for k, v in mapping.items():
            own_t = vlm.get_parameter(v) if v in dict(vlm.named_parameters()) else vlm.get_buffer(v)
            own_t.copy_(student_state[k])
    return {"copied": sorted(mapping.values()),
            "unused": sorted(k for k in student_state if k.startswith(UNUSED_PREFIXES))}


def anchor_student(cfg: StudentConfig, state: Mapping[str, torch.Tensor]) -> Student:
    """The frozen copy of the initialising student that Gram anchoring compares against."""
    student = Student(cfg, attention_backend="sdpa", expert_backend="loop")
    student.load_state_dict(dict(state))
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student
