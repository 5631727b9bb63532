"""Small real-behaving stand-ins for the harness tests: an encoder, datasets and tasks.

The encoder is a fixed random projection of average-pooled pixels (so features depend on the image,
the resolution and the seed); the datasets are generated PIL images; the tasks compute real metrics
(nearest-neighbour accuracy) through the TaskContext API only.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distill.encoders.base import Encoder, MissingHeadError
from distill.features import Features


class FakeEncoder(Encoder):
    """Two heads ("a", "b"), one text head ("a"); patch grid = resolution / patch_size."""

    patch_size = 8

    def __init__(self, name: str = "fake", seed: int = 0, dim: int = 6, count_file: str | None = None):
        self.name = name
        self.heads = ("a", "b")
        self.text_heads = ("a",)
        g = torch.Generator().manual_seed(seed)
        self.proj = {h: torch.randn(3, dim, generator=g) for h in self.heads}
        self.seed = seed
        self.count_file = count_file
        self.encoded = 0

    def preprocess(self, image, resolution=None):
        side = resolution or 32
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255.0)
        return x.permute(2, 0, 1)

    def encode(self, images):
        batch = torch.stack(list(images)) if isinstance(images, list) else images
        self.encoded += len(batch)
        if self.count_file:
            with open(self.count_file, "a") as f:
                f.write(f"{len(batch)}\n")
        pooled = F.avg_pool2d(batch, self.patch_size)            # (N, 3, h, w)
        n, _, h, w = pooled.shape
        tokens = pooled.flatten(2).transpose(1, 2)                # (N, h*w, 3)
        patches = {k: [t @ p for t in tokens] for k, p in self.proj.items()}
        summary = {k: torch.stack([t.mean(0) for t in v]) for k, v in patches.items()}
        return Features(summary=summary, patches=patches, grids=[(h, w)] * n,
                        cls=summary["a"].clone(), registers=torch.zeros(n, 2, 6))

    def encode_text(self, texts, head):
        self.require_head(head, text=True)
        g = torch.Generator().manual_seed(len(texts))
        return torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(sum(map(ord, t))))
                            for t in texts]) + 0 * torch.randn(1, generator=g)

    def fingerprint(self):
        return f"{self.name}-seed{self.seed}"

    def preprocess_config(self):
        return {"size": 32, "norm": "none"}


COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]


class FakeClassification(torch.utils.data.Dataset):
    def __init__(self, root: str, split: str, n_per_class: int = 5, **_):
        self.root, self.split = root, split
        offset = 0 if split == "train" else 1000
        self.items = []
        rng = np.random.default_rng(len(split) + offset)
        for c, colour in enumerate(COLOURS):
            for i in range(n_per_class):
                noise = rng.integers(-25, 25, size=(40, 40, 3))
                arr = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
                self.items.append((arr, c))
        self.targets = [c for _, c in self.items]
        self.classes = ["red", "green", "blue", "yellow"]
        self.templates = ["a photo of {}."]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        arr, c = self.items[i]
        return Image.fromarray(arr), c


def fake_dataset_loader(reader: str, root: str, split: str, **kw):
    if reader != "fakecls":
        raise KeyError(f"unknown reader {reader}")
    return FakeClassification(root, split, **kw)


def write_suite(path: Path, root: Path) -> Path:
    import json
    suite = {
        "name": "fake-suite",
        "datasets": [
            {"id": "colours", "reader": "fakecls", "root": "${fakeroot}/colours",
             "roles": {"train": "train", "test": "val"}, "tasks": ["nn", "textonly_b", "boom", "nn_patches"]},
            {"id": "colours-big", "reader": "fakecls", "root": "${fakeroot}/colours",
             "roles": {"train": "train", "test": "val"}, "reader_kwargs": {"n_per_class": 7},
             "tasks": ["nn"]},
        ],
        "leaderboard": {"head_preference": ["a"], "columns": {"nn": ["top1"]},
                        "families": [{"name": "nn avg", "task": "nn", "metric": "top1",
                                      "datasets": ["colours", "colours-big"]}]},
    }
    path.write_text(json.dumps(suite))
    (root / "colours").mkdir(parents=True, exist_ok=True)
    return path


class NearestNeighbourTask:
    """1-NN top-1 accuracy per head, through ctx.features only."""

    name = "nn"
    version = "1"
    roles = ("train", "test")
    needs_patches = False
    defaults = {"k": 1}

    def run(self, ctx, cfg):
        kill_at = os.environ.get("FAKE_KILL_AT")
        if kill_at and ctx.dataset_cfg["id"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a sweep killed mid-way (no cleanup runs)
        train, test = ctx.features("train", patches=self.needs_patches), ctx.features("test")
        ytr = torch.tensor(ctx.dataset("train").targets)
        yte = torch.tensor(ctx.dataset("test").targets)
        out = {}
        for head in train.summary:
            a = F.normalize(test.summary[head], dim=-1)
            b = F.normalize(train.summary[head], dim=-1)
            pred = ytr[(a @ b.T).argmax(1)]
            out[f"{head}/top1"] = 100.0 * (pred == yte).float().mean().item()
        return out


class PatchTask(NearestNeighbourTask):
    name = "nn_patches"
    needs_patches = True

    def run(self, ctx, cfg):
        f = ctx.features("train", patches=True)
        assert len(f.patches["a"]) == len(ctx.dataset("train"))
        return {"a/grid_h": float(f.grids[0][0])}


class TextOnlyB(NearestNeighbourTask):
    name = "textonly_b"

    def run(self, ctx, cfg):
        return {"b/x": float(ctx.text_features(["x"], "b").sum())}   # the fake has no text tower "b"


class Boom(NearestNeighbourTask):
    name = "boom"

    def run(self, ctx, cfg):
        raise RuntimeError("injected failure")


FAKE_TASKS = {t.name: t for t in (NearestNeighbourTask(), PatchTask(), TextOnlyB(), Boom())}


def fake_task_lookup(name):
    return FAKE_TASKS[name]


def fake_encoder_loader(spec: str, device: str = "cpu"):
    kind, _, arg = spec.partition(":")
    if kind != "fake":
        raise ValueError(f"unknown encoder spec {spec}")
    return FakeEncoder(name=f"fake{arg}", seed=int(arg or 0), count_file=os.environ.get("FAKE_COUNT_FILE"))


def encoded_images(count_file: str) -> int:
    p = Path(count_file)
    return sum(int(x) for x in p.read_text().split()) if p.exists() else 0


__all__ = ["FakeEncoder", "MissingHeadError"]
