"""Stand-ins for curation tests: a fixed-random-projection Encoder and tiny webdataset shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill.encoders.base import Encoder
from distill.features import Features


class ProjectionEncoder(Encoder):
    """Pixels downsampled to 8x8 -> a fixed random projection (seeded): similar images, similar vectors."""

    name = "projection"
    heads = ("proj",)

    def __init__(self, dim: int = 16, seed: int = 0, nan_for_red: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * 8 * 8, dim, generator=g)
        self.nan_for_red = nan_for_red
        self.calls = 0

    def preprocess(self, image, resolution=None):
        arr = np.asarray(image.resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def encode(self, images):
        self.calls += 1
        x = torch.stack(list(images)) if isinstance(images, list) else images
        out = x.flatten(1) @ self.w
        if self.nan_for_red:
            red = (x[:, 0].mean((1, 2)) > 0.6) & (x[:, 1].mean((1, 2)) < 0.3)
            out[red] = float("nan")
        return Features(summary={"proj": out})

    def fingerprint(self):
        return f"projection-{self.w.shape[1]}"


def write_shard(path: Path, samples: list[tuple[str, tuple[int, int, int] | None, dict]]) -> None:
    """samples: (key, RGB colour or None for a corrupt image, metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, colour, meta in samples:
            if colour is None:
                data = b"not an image"
            else:
                buf = io.BytesIO()
                Image.new("RGB", (24, 20), colour).save(buf, "PNG")
                data = buf.getvalue()
            for ext, blob in (("png", data), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
