"""A custom encoder for amoe, registered from outside the package (docs/encoders.md, 'Plugins').

    amoe --import amoe_plugin_example bench run --model colour-hist:8 --task knn ...
"""
import numpy as np
import torch
from PIL import Image

from distill.encoders.base import Encoder
from distill.encoders.registry import register_loader
from distill.features import Features


class ColourHistogram(Encoder):
    """Summary: a per-channel histogram of the image (a classic baseline); no patches, no text."""
    patch_size = 16
    heads = ("hist",)

    def __init__(self, bins: int):
        self.bins, self.name = bins, f"colour-hist:{bins}"

    def preprocess(self, image: Image.Image, resolution=None) -> torch.Tensor:
        side = resolution or 64
        pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)          # CHW

    def encode(self, images) -> Features:
        hist = [torch.cat([torch.histc(c, self.bins, 0, 1) / c.numel() for c in im]) for im in images]
        return Features(summary={"hist": torch.stack(hist)})

    def fingerprint(self) -> str:   # part of the feature-cache key: identifies weights and preprocessing
        return f"colour-hist-{self.bins}-v1"


@register_loader("colour-hist", "per-channel colour histogram baseline", example="colour-hist:8")
def load_colour_histogram(arg: str, **unused) -> ColourHistogram:
    return ColourHistogram(int(arg))
