"""Small stand-ins for tests of the trainer: frozen random-conv teachers and tiny pool shards.

The teachers implement the real `distill.encoders.base.Encoder` interface (preprocess from PIL at a
resolution, encode a list of CHW tensors of any size -> Features), with patch size 8 so their patch
grids differ from the student's 16 and the grid alignment is exercised.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from distill.encoders.base import Encoder
from distill.features import Features


class ConvTeacher(Encoder):
    patch_size = 8

    def __init__(self, name: str, width: int, registers: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.heads = name, (name,)
        self.embed = nn.Conv2d(3, width, 8, 8)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=g) * 0.2)
            self.embed.bias.copy_(torch.randn(width, generator=g) * 0.5)
        self.reg = torch.randn(registers, width, generator=g) if registers else None
        self.width = width

    def preprocess(self, image, resolution=None):
        side = resolution or 64
        w, h = image.size
        s = side / max(w, h)
        w2, h2 = max(8, round(w * s / 8) * 8), max(8, round(h * s / 8) * 8)
        arr = np.asarray(image.convert("RGB").resize((w2, h2), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1

    @torch.no_grad()
    def encode(self, images):
        summ, patches, grids, regs = [], [], [], []
        for im in images:
            f = torch.tanh(self.embed(im[None].float()))[0]            # (C, h, w)
            c, h, w = f.shape
            p = f.reshape(c, h * w).T
            patches.append(p)
            grids.append((h, w))
            summ.append(p.mean(0) * 3 + p.std(0))
            if self.reg is not None:
                regs.append(self.reg + p.mean(0))
        feats = Features(summary={self.name: torch.stack(summ)}, patches={self.name: patches}, grids=grids,
                         registers=torch.stack(regs) if regs else None)
        return feats

    def fingerprint(self):
        return f"conv-{self.name}-{self.width}"


def make_teachers(siglip_width=32, dino_width=24):
    return {"siglip2": ConvTeacher("siglip2", siglip_width, 0, seed=1),
            "dinov3": ConvTeacher("dinov3", dino_width, 4, seed=2)}


def write_pool(root: Path, n_images: int = 48, per_shard: int = 16, seed: int = 0,
               corrupt: tuple[int, ...] = ()) -> Path:
    """Webdataset shards (jpg + txt + json) of images with mixed sizes and simple shapes."""
    rng = np.random.default_rng(seed)
    shards = root / "pool" / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for s in range(0, n_images, per_shard):
        with tarfile.open(shards / f"pool-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, n_images)):
                w, h = int(rng.integers(40, 200)), int(rng.integers(40, 200))
                arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, 3).astype(np.uint8)
                y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
                buf = io.BytesIO()
                if i in corrupt:
                    buf.write(b"\xff\xd8\xff\xe0 broken")
                else:
                    Image.fromarray(arr).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"image {i}".encode()),
                                  ("json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards


TINY_STUDENT = {
    "dim": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16, "n_kv_heads": 1, "moe_dim": 32,
    "moe_args": {"num_experts": 4, "num_shared_experts": 0, "top_k": 2, "score_before_experts": False},
    "first_n_layers_dense": 0, "ffn_dim": None, "parameterized_norm": True, "n_storage_tokens": 4,
}


def tiny_recipe(world: Path, steps: int = 4, **changes) -> dict:
    cfg = {
        "name": "test", "steps": steps, "seed": 0, "world": str(world),
        "student": {"config": dict(TINY_STUDENT)},
        "teachers": [
            {"name": "siglip2", "spec": "standin", "relational": "arkd"},
            {"name": "dinov3", "spec": "standin", "relational": "arkd", "register_weight": 1.0},
        ],
        "data": {"patch_size": 16, "sources": [{"path": "${world}/pool/shards", "resolutions": [48, 64],
                                                "min_resolution": 32}]},
        "phis": {"enabled": False, "fit_images": 32},
        "batching": {"mode": "packed", "max_tokens": 64, "max_images_per_seq": 4, "seqs_per_rank": 2,
                     "lookahead": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "loss": {"channel_reduction": "mean"},
        "engine": {"device": "cpu"},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    for k, v in changes.items():
        node = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return cfg
