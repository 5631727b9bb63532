"""`pixels:SIDE`: raw pixels as an encoder, the floor every learnt encoder must clear.

Summary = the image resized to SIDE x SIDE, flattened (3 * SIDE^2 values, ImageNet-normalised);
patches = the image's own non-overlapping 16 x 16 pixel patches (768 values each), so the
segmentation probe learns a linear map from raw patch pixels. No text tower: zero-shot and retrieval
cells are skipped for it. Run through the benchmark tasks like any model, its kNN and segmentation
rows say how far a score is above what the pixels alone give.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distill.features import Features

from .base import Encoder
from .registry import register_loader

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class RawPixels(Encoder):
    heads = ("pixels",)
    patch_size = 16

    def __init__(self, side: int, default_resolution: int = 128):
        self.side, self.default_resolution = side, default_resolution
        self.name = f"pixels:{side}"

    def preprocess(self, image: Image.Image, resolution: int | None = None) -> torch.Tensor:
        """Native aspect within a `resolution`^2 pixel budget (default 128^2), sides cut to multiples of 16."""
        budget = (resolution or self.default_resolution) ** 2
        w, h = image.size
        scale = min(1.0, (budget / (w * h)) ** 0.5)
        p = self.patch_size
        nw, nh = max(p, int(w * scale) // p * p), max(p, int(h * scale) // p * p)
        pixels = np.asarray(image.convert("RGB").resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255
        return (torch.from_numpy(pixels).permute(2, 0, 1) - MEAN) / STD

    def encode(self, images) -> Features:
        p = self.patch_size
        summary, patches, grids = [], [], []
        for x in images:
            x = x.float()
            summary.append(F.interpolate(x[None], size=(self.side, self.side), mode="bilinear",
                                         antialias=True, align_corners=False).flatten())
            grids.append((x.shape[1] // p, x.shape[2] // p))
            patches.append(F.unfold(x[None], p, stride=p)[0].T)          # (h*w, 3*p*p), raster order
        return Features(summary={"pixels": torch.stack(summary)}, patches={"pixels": patches}, grids=grids)

    def fingerprint(self) -> str:
        return f"pixels-{self.side}-v1"

    def preprocess_config(self) -> dict:
        return {"default_resolution": self.default_resolution, "patch": self.patch_size, "norm": "imagenet"}


@register_loader("pixels", "raw pixels (the floor): summary = the image at SIDE x SIDE, patches = raw 16-px "
                 "pixel patches; no text tower", example="pixels:24")
def load_pixels(arg: str, **unused) -> RawPixels:
    try:
        side = int(arg)
    except ValueError:
        side = 0
    if side < 1:
        from distill.errors import AmoeError
        raise AmoeError(f"pixels:{arg}: SIDE must be a positive integer, e.g. pixels:24")
    return RawPixels(side)
