"""DINOv3 ViT through Hugging Face transformers: `dinov3:ID_OR_DIR`.

Any image size works (RoPE positions): `resolution` R keeps the aspect ratio, scales the area to
about R^2 and rounds each side to a multiple of the patch size. Mean/std and resampling come from
the model's image-processor config when the directory has one, else ImageNet mean/std (what every
DINOv3 checkpoint uses) and the patch size / image size from the model config.

Outputs: summary "dinov3" = CLS (post-norm), registers = the 4 register tokens, patches per image.
Text branch (dino.txt, distill/encoders/dinotxt.py): head "dinotxt" whose image embedding is the
dino.txt vision head applied to this model's [CLS, patches] (joint [CLS | mean patch]) and whose text
side is dino.txt's text tower. Found by itself in `DIR/dinotxt/` (the mini-world teacher's own head);
`?dinotxt=hub` loads the real one through torch.hub (remote code, opt-in; `hub_load=` injectable for
offline use); `?dinotxt=PATH` names a head folder. Without one, `describe()["dinotxt_missing"]` says why.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from distill.encoders.common import (check_source, IMAGENET_MEAN, IMAGENET_STD, ModuleEncoder, as_image_list,
                                     aspect_size, group_by_size, hub_error, is_local, no_grad_encode,
                                     resize_normalize)
from distill.encoders.dinotxt import HUB_ENTRY, HUB_REPO, SUBFOLDER, DinoTxtBranch, is_mini_dinotxt, load_dinotxt
from distill.encoders.registry import register_loader
from distill.features import Features

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class DINOv3Encoder(ModuleEncoder):
    kind = "dinov3"

    def __init__(self, model, source: str, mean, std, resample: int, default_side: int, head: str = "dinov3",
                 dinotxt: DinoTxtBranch | None = None, dinotxt_missing: str | None = None):
        self.model = model.eval()
        self.source = source
        self.name = f"dinov3:{source}"
        self.patch_size = int(model.config.patch_size)
        self.n_registers = int(getattr(model.config, "num_register_tokens", 0))
        self.width = int(model.config.hidden_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.resample = int(resample)
        self.default_side = int(default_side)
        self.head = head
        self.dinotxt = dinotxt
        self.dinotxt_missing = dinotxt_missing
        if dinotxt is not None:
            dinotxt.check_width(self.width, f"the DINOv3 model {source}")
        self.heads = (head, "dinotxt") if dinotxt is not None else (head,)
        self.text_heads = ("dinotxt",) if dinotxt is not None else ()

    def preprocess(self, image, resolution=None) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}")
        W, H = image.size
        size = aspect_size(H, W, int(resolution or self.default_side), self.patch_size)
        return resize_normalize(image, size, self.mean, self.std, self.resample)

    def preprocess_config(self) -> dict:
        return {"mean": self.mean, "std": self.std, "resample": self.resample, "patch_size": self.patch_size,
                "default_side": self.default_side, "size_rule": "aspect-kept area R^2, sides rounded to patch"}

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        n = len(images)
        cls, regs, patches, grids = [None] * n, [None] * n, [None] * n, [None] * n
        R = self.n_registers
        for (H, W), idx in group_by_size(images).items():
            if H % self.patch_size or W % self.patch_size:
                raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                                 "use preprocess()")
            batch = torch.stack([images[i] for i in idx])
            hs = self.model(pixel_values=batch).last_hidden_state   # [CLS, registers, patches]
            for j, i in enumerate(idx):
                cls[i] = hs[j, 0]
                regs[i] = hs[j, 1: 1 + R]
                patches[i] = hs[j, 1 + R:]
                grids[i] = (H // self.patch_size, W // self.patch_size)
        cls_t = torch.stack(cls)
        summary = {self.head: cls_t}
        if self.dinotxt is not None:
            summary["dinotxt"] = self.dinotxt.image_embedding(cls_t, patches).to(cls_t.dtype)
        return Features(summary=summary, patches={self.head: patches}, grids=grids, cls=cls_t,
                        registers=torch.stack(regs) if R else None)

    @no_grad_encode
    def encode_text(self, texts: list[str], head: str) -> torch.Tensor:
        self.require_head(head, text=True)
        return self.dinotxt.encode_text(texts).to(self.dtype)

    def logit_scale(self, head: str) -> float:
        return self.dinotxt.logit_scale() if head == "dinotxt" and self.dinotxt is not None else super().logit_scale(head)

    def text_fingerprint(self, head: str) -> str:
        return self.dinotxt.fingerprint() if head == "dinotxt" and self.dinotxt is not None else self.fingerprint()

    def modules(self):
        return [self.model] + ([self.dinotxt.model] if self.dinotxt is not None else [])

    def describe(self) -> dict:
        return {"width": self.width, "patch_size": self.patch_size, "registers": self.n_registers,
                "dinotxt": self.dinotxt.fingerprint() if self.dinotxt is not None else None,
                **({"dinotxt_missing": self.dinotxt_missing} if self.dinotxt_missing else {})}


@register_loader("dinov3", "DINOv3 ViT (DINOv3ViTModel) via transformers; summary = CLS, 4 registers, patches; "
                 "dino.txt text head from DIR/dinotxt/, or via torch.hub (?dinotxt=hub, remote code, opt-in)",
                 requires=("transformers",), example="dinov3:facebook/dinov3-vitl16-pretrain-lvd1689m",
                 options={"dinotxt": "hub (the real head; needs trust_remote_code) or a head folder; default DIR/dinotxt/",
                          "dinotxt_weights / dinotxt_backbone_weights": "files or URLs for the hub entry",
                          "hub_load": "(Python) replacement for torch.hub.load"})
def load_dinov3(arg: str, head: str = "dinov3", dinotxt=None, trust_remote_code=None, hub_load=None,
                dinotxt_repo: str = HUB_REPO, dinotxt_entry: str = HUB_ENTRY, dinotxt_weights=None,
                dinotxt_backbone_weights=None, dinotxt_source: str | None = None, revision: str | None = None,
                **unused) -> DINOv3Encoder:
    if unused:
        raise TypeError(f"dinov3 loader got unknown option(s) {sorted(unused)}")
    from transformers import AutoConfig, AutoImageProcessor, DINOv3ViTModel

    source = check_source("dinov3", arg)
    kw = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(source, **kw)
        if config.model_type != "dinov3_vit":
            raise ValueError(f"{source} is a '{config.model_type}' model, not DINOv3 ViT (dinov3_vit); use the "
                             "matching kind or a bare path for auto-detection")
        model = DINOv3ViTModel.from_pretrained(source, dtype=torch.float32, **kw)
        has_proc = not Path(source).is_dir() or any((Path(source) / f).is_file() for f in PROCESSOR_FILES)
        proc = AutoImageProcessor.from_pretrained(source, **kw) if has_proc else None
    except OSError as e:
        if not is_local(source):
            raise hub_error("dinov3", source, e) from e
        raise
    if proc is not None:
        mean, std = proc.image_mean, proc.image_std
        resample = int(getattr(proc, "resample", Image.BILINEAR))
        size = getattr(proc, "size", None) or {}

        def _get(key):  # a plain dict or transformers' SizeDict
            return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        side = int(_get("height") or _get("shortest_edge") or config.image_size)
    else:  # fall back to what every DINOv3 checkpoint was trained with
        mean, std, resample, side = IMAGENET_MEAN, IMAGENET_STD, int(Image.BILINEAR), int(config.image_size)
    branch, missing = None, None
    local = Path(source) / SUBFOLDER if Path(source).is_dir() else None
    if dinotxt is False or str(dinotxt).lower() in ("0", "false"):
        missing = "disabled (?dinotxt=0)"
    elif dinotxt in (None, "", "auto"):
        if local is not None and is_mini_dinotxt(local):
            branch = load_dinotxt(local)
        else:
            missing = (f"no dino.txt text head: {source} has no '{SUBFOLDER}/' head folder; pass ?dinotxt=hub "
                       "(the real head through torch.hub, remote code) or ?dinotxt=PATH")
    else:
        hub_kwargs = {k: v for k, v in (("weights", dinotxt_weights), ("backbone_weights", dinotxt_backbone_weights),
                                         ("source", dinotxt_source)) if v is not None}
        branch = load_dinotxt(dinotxt, hub_load=hub_load, trust_remote_code=trust_remote_code, repo=dinotxt_repo,
                              entry=dinotxt_entry, **hub_kwargs)
    return DINOv3Encoder(model, source, mean, std, resample, side, head=head, dinotxt=branch, dinotxt_missing=missing)

