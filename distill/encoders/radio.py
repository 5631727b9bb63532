"""RADIO (NVlabs AM-RADIO) baselines: `radio:VERSION` via torch.hub, `radio-hf:ID` via transformers.

Both run code downloaded from a hub, so both need an explicit opt-in (`trust_remote_code=True`,
the spec suffix `?trust_remote_code=1`, or AMOE_TRUST_REMOTE_CODE=1).

RADIO takes pixels in [0, 1] (it normalises inside) at any size that is a multiple of its
resolution step. Output contract (both routes): without adaptors `model(x)` is a pair
(summary (N, C), spatial features (N, T, D)); with `adaptor_names` it is a mapping
{"backbone": pair, "<adaptor>": pair, ...}, pairs also available as `.summary` / `.features`.
Heads: "radio" (the backbone) plus one per adaptor; an adaptor with a text tower
(`adaptor.tokenizer` + `adaptor.encode_text`, e.g. "siglip", "clip") is also a text head.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from PIL import Image

from distill.encoders.common import (ModuleEncoder, as_image_list, as_list, aspect_size, group_by_size, hub_error,
                                     is_local, no_grad_encode, pil_rgb, require_remote_code, resize_normalize)
from distill.encoders.registry import register_loader
from distill.features import Features

RADIO_REPO = "NVlabs/RADIO"
VERSIONS = ("radio_v2.5-h", "radio_v2.5-l", "radio_v2.5-b", "radio_v2.5-g")


def _pair(v):
    if hasattr(v, "summary") and hasattr(v, "features"):
        return v.summary, v.features
    summary, features = v
    return summary, features


class RADIOEncoder(ModuleEncoder):
    kind = "radio"

    def __init__(self, model, name: str, adaptors: list[str]):
        self.model = model.eval()
        self.name = name
        self.adaptor_names = list(adaptors)
        self.patch_size = int(getattr(model, "patch_size", 16))
        self.step = int(getattr(model, "min_resolution_step", self.patch_size) or self.patch_size)
        pref = getattr(model, "preferred_resolution", None)
        self.default_side = int(pref[0] if isinstance(pref, (tuple, list)) else (pref or 512))
        self.heads = ("radio",) + tuple(self.adaptor_names)
        found = getattr(model, "adaptors", None) or {}
        self.text_heads = tuple(a for a in self.adaptor_names
                                if a in found and hasattr(found[a], "encode_text") and hasattr(found[a], "tokenizer"))

    def preprocess(self, image, resolution=None) -> torch.Tensor:
        img = pil_rgb(image)
        W, H = img.size
        size = aspect_size(H, W, int(resolution or self.default_side), self.step)
        # [0, 1] pixels: RADIO applies its own normalisation inside the model
        return resize_normalize(img, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), Image.BICUBIC)

    def preprocess_config(self) -> dict:
        return {"range": "[0,1]", "step": self.step, "default_side": self.default_side, "resample": "bicubic"}

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        n = len(images)
        summary = {h: [None] * n for h in self.heads}
        patches = {h: [None] * n for h in self.heads}
        grids = [None] * n
        for (H, W), idx in group_by_size(images).items():
            out = self.model(torch.stack([images[i] for i in idx]))
            pairs = ({("radio" if k == "backbone" else k): _pair(v) for k, v in out.items()}
                     if isinstance(out, Mapping) else {"radio": _pair(out)})
            missing = [h for h in self.heads if h not in pairs]
            if missing:
                raise RuntimeError(f"RADIO returned outputs {sorted(pairs)} but not {missing}; check adaptor_names")
            g = (H // self.patch_size, W // self.patch_size)
            for h in self.heads:
                s, f = pairs[h]
                if f.dim() == 4:  # NCHW feature format
                    f = f.flatten(2).transpose(1, 2)
                for j, i in enumerate(idx):
                    summary[h][i] = s[j]
                    patches[h][i] = f[j]
            for i in idx:
                grids[i] = g
        return Features(summary={h: torch.stack(v) for h, v in summary.items()}, patches=patches, grids=grids)

    @no_grad_encode
    def encode_text(self, texts: list[str], head: str) -> torch.Tensor:
        self.require_head(head, text=True)
        adaptor = self.model.adaptors[head]
        tokens = adaptor.tokenizer(list(texts))
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.to(self.device)
        return adaptor.encode_text(tokens)

    def describe(self) -> dict:
        return {"adaptors": self.adaptor_names, "patch_size": self.patch_size}


@register_loader("radio", "RADIOv2.5 via torch.hub NVlabs/RADIO radio_model (remote code: opt-in); heads radio + "
                 "adaptors (?adaptors=siglip,clip), adaptor text towers", requires=("torch",),
                 example="radio:radio_v2.5-h?adaptors=siglip&trust_remote_code=1",
                 options={"adaptors": "comma list of adaptor names", "trust_remote_code": "required",
                          "hub_load": "(Python) replacement for torch.hub.load", "repo": "hub repo or local clone"})
def load_radio(arg: str, adaptors=None, trust_remote_code=None, hub_load: Callable | None = None,
               repo: str = RADIO_REPO, source: str | None = None, adaptor_names=None, **unused) -> RADIOEncoder:
    if unused:
        raise TypeError(f"radio loader got unknown option(s) {sorted(unused)}")
    adaptors = adaptors if adaptors is not None else adaptor_names   # RADIO's own keyword works too
    if arg not in VERSIONS and not is_local(arg):
        import difflib
        close = difflib.get_close_matches(arg, VERSIONS, n=2)
        raise ValueError(f"unknown RADIO version '{arg}'" + (f"; did you mean {close}?" if close else "")
                         + f" Known: {', '.join(VERSIONS)} (or a local checkpoint path)")
    require_remote_code("radio", f"{repo} radio_model ({arg}) through torch.hub", trust_remote_code)
    names = as_list(adaptors)
    kw = {"version": arg, "adaptor_names": names or None, "progress": True, "skip_validation": True}
    if source:
        kw["source"] = source
    loader = hub_load or torch.hub.load
    try:
        model = loader(repo, "radio_model", **kw)
    except (OSError, RuntimeError) as e:
        raise OSError(f"radio: torch.hub could not load {repo} ({e}). Offline, clone the repo, download the "
                      "checkpoint, and use `radio:/path/to/ckpt.pth.tar?repo=/path/to/RADIO&source=local`.") from e
    return RADIOEncoder(model, f"radio:{arg}", names)


@register_loader("radio-hf", "RADIO through transformers AutoModel (nvidia/RADIO-H etc., trust_remote_code: opt-in)",
                 requires=("transformers",), example="radio-hf:nvidia/RADIO-H?trust_remote_code=1",
                 options={"adaptors": "comma list of adaptor names", "hf_load": "(Python) replacement loader"})
def load_radio_hf(arg: str, adaptors=None, trust_remote_code=None, hf_load: Callable | None = None,
                  adaptor_names=None, **unused) -> RADIOEncoder:
    if unused:
        raise TypeError(f"radio-hf loader got unknown option(s) {sorted(unused)}")
    adaptors = adaptors if adaptors is not None else adaptor_names
    require_remote_code("radio-hf", f"'{arg}' (Hugging Face remote code)", trust_remote_code)
    names = as_list(adaptors)
    if hf_load is None:
        def hf_load(model_id, adaptor_names):
            from transformers import AutoModel
            extra = {"adaptor_names": adaptor_names} if adaptor_names else {}
            return AutoModel.from_pretrained(model_id, trust_remote_code=True, **extra)
    try:
        model = hf_load(arg, names)
    except OSError as e:
        if not is_local(arg):
            raise hub_error("radio-hf", arg, e) from e
        raise
    return RADIOEncoder(model, f"radio-hf:{arg}", names)
