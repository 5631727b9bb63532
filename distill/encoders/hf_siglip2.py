"""SigLIP2 (and SigLIP) through Hugging Face transformers: `siglip2:ID_OR_DIR`.

NaFlex models (`Siglip2Model`, e.g. google/siglip2-so400m-patch16-naflex) see each image at its
native aspect ratio within a patch budget: `resolution` R means at most (R/16)^2 patches, resized by
the model's own image processor. Fixed-size models (`SiglipModel`) are resized to R x R, with the
position embeddings interpolated when R differs from the trained size.

Summary = `pooler_output` (the MAP head); patches = the last hidden state (post-layernorm) per image.
Text: SigLIP's rule -- lower-case, strip punctuation, pad on the right to the text tower's position
count (64 for the released models), and no attention mask: the tower pools the last position, so
the padded length must be the one it was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from distill.encoders.common import (check_source, ModuleEncoder, as_image_list, canonicalize_text, group_by_size, hub_error,
                                     is_local, no_grad_encode, pad_stack, resize_normalize)
from distill.encoders.registry import register_loader
from distill.features import Features
from distill.student.processor import chw_to_patches

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")
# a tokenizer saved from a bare `tokenizers` object: load it as exactly that, not as the class the
# model type maps to (AutoTokenizer would rebuild it as a Gemma-style BPE and mangle the vocabulary)
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int, channels: int = 3) -> torch.Tensor:
    """Inverse of the NaFlex patch layout (row, col, channel inside a patch; raster order)."""
    h, w = grid
    x = patches[: h * w].reshape(h, w, patch, patch, channels)
    return x.permute(4, 0, 2, 1, 3).reshape(channels, h * patch, w * patch)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(source).expanduser()
    if p.is_dir():
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{p} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): encode_text needs one. Save it beside the "
                "model with `tokenizer.save_pretrained(DIR)` (or a Siglip2Processor with `save_pretrained(DIR)`).")
        cfg_file = p / "tokenizer_config.json"
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
        if cls in GENERIC_TOKENIZER_CLASSES or (cls is None and (p / "tokenizer.json").is_file()):
            return PreTrainedTokenizerFast.from_pretrained(str(p))
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as e:
        if not is_local(source):
            raise hub_error("siglip2", source, e) from e
        raise


class HFSiglipEncoder(ModuleEncoder):
    kind = "siglip2"

    def __init__(self, model, image_processor, source: str, head: str, naflex: bool):
        self.model = model.eval()
        self.image_processor = image_processor
        self.source = source
        self.naflex = naflex
        self.name = f"siglip2:{source}"
        self.heads = (head,)
        self.has_tokenizer = not Path(source).expanduser().is_dir() or any(
            (Path(source).expanduser() / f).is_file() for f in TOKENIZER_FILES)
        self.text_heads = (head,) if self.has_tokenizer else ()
        vcfg = model.config.vision_config
        self.patch_size = int(vcfg.patch_size)
        self.width = int(vcfg.hidden_size)
        self.image_size = int(getattr(vcfg, "image_size", 224) or 224)
        ip = image_processor
        self.mean = tuple(float(v) for v in ip.image_mean)
        self.std = tuple(float(v) for v in ip.image_std)
        self.resample = int(getattr(ip, "resample", Image.BICUBIC))
        self.default_patches = int(getattr(ip, "max_num_patches", 256) or 256)
        self.text_length = int(model.config.text_config.max_position_embeddings)
        self._tokenizer = None

    # ------------------------------------------------------------------ images
    def _budget(self, resolution):
        if resolution is None:
            return self.default_patches
        return max(1, (int(resolution) // self.patch_size) ** 2)

    def preprocess(self, image, resolution=None) -> torch.Tensor:
        if not self.naflex:
            side = int(resolution or self.image_size)
            return resize_normalize(image, (side, side), self.mean, self.std, self.resample)
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}")
        out = self.image_processor(images=[image.convert("RGB")], max_num_patches=self._budget(resolution),
                                   return_tensors="pt")
        grid = tuple(int(v) for v in out["spatial_shapes"][0].tolist())
        return unpatchify(out["pixel_values"][0].float(), grid, self.patch_size)

    def preprocess_config(self) -> dict:
        return {"naflex": self.naflex, "patch_size": self.patch_size, "mean": self.mean, "std": self.std,
                "resample": self.resample, "default_max_num_patches": self.default_patches,
                "image_size": None if self.naflex else self.image_size, "text_length": self.text_length}

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        head = self.heads[0]
        vision = self.model.vision_model
        if self.naflex:
            per = [chw_to_patches(im, self.patch_size) for im in images]
            grids = [g for _, g in per]
            pixel_values, mask = pad_stack([p for p, _ in per])
            shapes = torch.tensor(grids, dtype=torch.long, device=self.device)
            out = vision(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
            summary = out.pooler_output
            patches = [out.last_hidden_state[i, : h * w] for i, (h, w) in enumerate(grids)]
            return Features(summary={head: summary}, patches={head: patches}, grids=grids)
        summary = [None] * len(images)
        patches = [None] * len(images)
        grids = [None] * len(images)
        for (H, W), idx in group_by_size(images).items():
            batch = torch.stack([images[i] for i in idx])
            out = vision(pixel_values=batch, interpolate_pos_encoding=(H, W) != (self.image_size, self.image_size))
            hp, wp = H // self.patch_size, W // self.patch_size
            for j, i in enumerate(idx):
                summary[i] = out.pooler_output[j]
                patches[i] = out.last_hidden_state[j]
                grids[i] = (hp, wp)
        return Features(summary={head: torch.stack(summary)}, patches={head: patches}, grids=grids)

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    @no_grad_encode
    def encode_text(self, texts: list[str], head: str) -> torch.Tensor:
        if head in self.heads and not self.has_tokenizer:
            load_tokenizer(self.source)  # raises: names the missing files and the fix
        self.require_head(head, text=True)
        tok = self.tokenizer
        out = []
        for s in range(0, len(texts), 256):
            chunk = [canonicalize_text(t) for t in texts[s: s + 256]]
            ids = tok(chunk, padding="max_length", max_length=self.text_length, truncation=True, padding_side="right",
                      return_tensors="pt")["input_ids"].to(self.device)
            out.append(self.model.text_model(input_ids=ids).pooler_output)
        return torch.cat(out)

    def logit_scale(self, head: str) -> float:
        return float(self.model.logit_scale.detach().float().exp().item())

    @property
    def active_params(self) -> int:
        return sum(p.numel() for p in self.model.vision_model.parameters())

    def describe(self) -> dict:
        return {"model_type": self.model.config.model_type, "width": self.width,
                "patch_size": self.patch_size}


@register_loader("siglip2", "SigLIP2 NaFlex (Siglip2Model) or fixed-size SigLIP (SiglipModel) via transformers; "
                 "summary = MAP pooler, patches = last hidden state, text tower with SigLIP canonicalisation",
                 requires=("transformers",), example="siglip2:google/siglip2-so400m-patch16-naflex",
                 options={"head": "head name (default siglip2; 'siglip' for SiglipModel)",
                          "revision": "hub revision"})
def load_siglip2(arg: str, head: str | None = None, revision: str | None = None, **unused) -> HFSiglipEncoder:
    if unused:
        raise TypeError(f"siglip2 loader got unknown option(s) {sorted(unused)}; known: head, revision")
    from transformers import AutoConfig, AutoImageProcessor, SiglipModel, Siglip2Model

    source = check_source("siglip2", arg)
    kw = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except OSError as e:
        if not is_local(source):
            raise hub_error("siglip2", source, e) from e
        raise FileNotFoundError(f"{source}: no readable config.json ({e}); save the model with "
                                "save_pretrained(DIR)") from e
    mt = config.model_type
    if mt not in ("siglip2", "siglip"):
        raise ValueError(f"{source} is a '{mt}' model, not SigLIP2/SigLIP; use the matching kind "
                         f"(e.g. 'dinov3:{arg}') or a bare path for auto-detection")
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in PROCESSOR_FILES):
        raise FileNotFoundError(
            f"{source} has no image-processor config ({' / '.join(PROCESSOR_FILES)}); the encoder uses the "
            "model's own preprocessing. Save it with `Siglip2ImageProcessor(...).save_pretrained(DIR)` "
            "(or a Siglip2Processor).")
    cls = Siglip2Model if mt == "siglip2" else SiglipModel
    try:
        model = cls.from_pretrained(source, dtype=torch.float32, **kw)
        processor = AutoImageProcessor.from_pretrained(source, **kw)
    except OSError as e:
        if not is_local(source):
            raise hub_error("siglip2", source, e) from e
        raise
    return HFSiglipEncoder(model, processor, source, head or ("siglip2" if mt == "siglip2" else "siglip"),
                           naflex=(mt == "siglip2"))
