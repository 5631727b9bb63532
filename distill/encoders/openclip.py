"""SigLIP / SigLIP2 through open_clip: `openclip:NAME[?pretrained=TAG]`, e.g.
`openclip:ViT-SO400M-16-SigLIP2-384` (tag defaults to the first one open_clip lists, e.g. webli;
`pretrained=none` builds the architecture with random weights).

Towers must be timm-backed (every SigLIP/SigLIP2 config in open_clip is): patches are the trunk's
final normed tokens (no prefix tokens), summary is the model's image embedding (MAP pool + head).
Fixed-size model: `resolution` R resizes (squash) to R x R and the trunk's position embedding is
resampled from the pristine checkpoint table for that size (never from an already resampled one).
Text: open_clip's own tokenizer for the model (SigLIP2 configs canonicalise text and pad to 64);
it is fetched from the hub on first use unless `tokenizer=` is given.
"""
from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from distill.encoders.common import (ModuleEncoder, as_image_list, group_by_size, hub_error, no_grad_encode,
                                     resize_normalize)
from distill.encoders.registry import register_loader
from distill.features import Features

_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class OpenCLIPEncoder(ModuleEncoder):
    kind = "openclip"

    def __init__(self, model, model_name: str, pretrained: str | None, head: str = "siglip2", tokenizer=None):
        from open_clip.timm_model import TimmModel

        if not isinstance(model.visual, TimmModel):
            raise TypeError(f"openclip:{model_name} has a {type(model.visual).__name__} image tower; this loader "
                            "supports timm-backed towers (the SigLIP / SigLIP2 configs)")
        self.model = model.eval()
        self.model_name, self.pretrained = model_name, pretrained
        self.name = f"openclip:{model_name}" + (f"?pretrained={pretrained}" if pretrained else "")
        self.heads = (head,)
        self.text_heads = (head,)
        trunk = model.visual.trunk
        self.trunk = trunk
        self.patch_size = int(trunk.patch_embed.patch_size[0])
        self.image_size = tuple(int(v) for v in trunk.patch_embed.img_size)
        self._pristine = (trunk.pos_embed.detach().clone(), self.image_size) if trunk.pos_embed is not None else None
        pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(float(v) for v in pcfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(float(v) for v in pcfg.get("std", (0.5, 0.5, 0.5)))
        self.interpolation = str(pcfg.get("interpolation", "bicubic"))
        self._tokenizer = tokenizer

    def preprocess(self, image, resolution=None) -> torch.Tensor:
        side = int(resolution) if resolution else self.image_size[0]
        return resize_normalize(image, (side, side), self.mean, self.std,
                                _INTERP.get(self.interpolation, Image.BICUBIC))

    def preprocess_config(self) -> dict:
        return {"mean": self.mean, "std": self.std, "interpolation": self.interpolation, "resize": "squash",
                "image_size": self.image_size}

    def _ensure_size(self, hw: tuple[int, int]) -> None:
        trunk = self.trunk
        if tuple(trunk.patch_embed.img_size) == tuple(hw):
            return
        if self._pristine is not None:
            pos, size = self._pristine
            trunk.patch_embed.set_input_size(img_size=size)
            trunk.pos_embed = nn.Parameter(pos.clone().to(self.device, self.dtype), requires_grad=False)
        trunk.set_input_size(img_size=tuple(hw))

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        n = len(images)
        head = self.heads[0]
        summary, patches, grids = [None] * n, [None] * n, [None] * n
        for (H, W), idx in group_by_size(images).items():
            self._ensure_size((H, W))
            tokens = self.trunk.forward_features(torch.stack([images[i] for i in idx]))
            pooled = self.model.visual.head(self.trunk.forward_head(tokens))
            k = int(getattr(self.trunk, "num_prefix_tokens", 0))
            for j, i in enumerate(idx):
                summary[i] = pooled[j]
                patches[i] = tokens[j, k:]
                grids[i] = (H // self.patch_size, W // self.patch_size)
        return Features(summary={head: torch.stack(summary)}, patches={head: patches}, grids=grids)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip
            try:
                self._tokenizer = open_clip.get_tokenizer(self.model_name)
            except OSError as e:
                raise hub_error("openclip", f"the tokenizer of {self.model_name}", e) from e
        return self._tokenizer

    @no_grad_encode
    def encode_text(self, texts: list[str], head: str) -> torch.Tensor:
        self.require_head(head, text=True)
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens)

    def logit_scale(self, head: str) -> float:
        return float(self.model.logit_scale.detach().float().exp().item())

    @property
    def active_params(self) -> int:
        return sum(p.numel() for p in self.model.visual.parameters())

    def describe(self) -> dict:
        return {"model": self.model_name, "pretrained": self.pretrained, "patch_size": self.patch_size}


@register_loader("openclip", "SigLIP/SigLIP2 via open_clip (timm towers); summary = image embedding, patches = "
                 "trunk tokens; open_clip's tokenizer", requires=("open_clip",),
                 example="openclip:ViT-SO400M-16-SigLIP2-384?pretrained=webli",
                 options={"pretrained": "tag or checkpoint file ('none' = random weights)", "head": "default siglip2",
                          "tokenizer": "(Python) tokenizer callable"})
def load_openclip(arg: str, pretrained=None, head: str = "siglip2", tokenizer=None, **unused) -> OpenCLIPEncoder:
    if unused:
        raise TypeError(f"openclip loader got unknown option(s) {sorted(unused)}")
    import open_clip

    name = arg
    if not name.startswith("hf-hub:") and name not in open_clip.list_models():
        import difflib
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        raise ValueError(f"open_clip has no model '{name}'" + (f"; did you mean {close}?" if close else "")
                         + " (see open_clip.list_models())")
    if pretrained is None and not name.startswith("hf-hub:"):
        tags = open_clip.list_pretrained_tags_by_model(name)
        pretrained = tags[0] if tags else None
        if pretrained is None:
            raise ValueError(f"open_clip lists no pretrained weights for '{name}'; pass ?pretrained=FILE_OR_TAG "
                             "(or pretrained=none for random weights)")
    tag = None if str(pretrained).lower() == "none" else pretrained
    try:
        model = open_clip.create_model(name, pretrained=tag)
    except (OSError, RuntimeError) as e:
        raise hub_error("openclip", f"{name} ({tag})", e) from e
    return OpenCLIPEncoder(model.float(), name, None if tag is None else str(tag), head=head, tokenizer=tokenizer)
