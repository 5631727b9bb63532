"""What a model can learn of the mini-world's *shapes* from fresh scenes in a CPU budget.

`amoe teachers ceiling` trains on the benchmark's own train splits (470 Zipf-imbalanced images on the
small world), so it mixes two limits: too little labelled data and too little compute. This probe takes
the data limit away: it renders `scenes` new classification-style scenes with the world's own code
(one medium or large object of one of the world's classification shapes and colours, a random texture
and background, a small distractor in a spare colour as often as the world has one), labels each by
shape only, trains a supervised model on them for `seconds` of wall time, and scores shape top-1 on the
world's classification *val* split (the scenes are drawn from another seed stream than the world, so
no val image is among them). Chance is 1 / shapes.

`model` is `cnn` (the ceiling's small CNN) or `vit` (HF `DINOv3ViTModel`, the teachers' class, built
from the DINOv3 teacher recipe with `patch`, `width` and `side` overridden): the gap between the two
at one budget is what the teachers' architecture costs in sample efficiency. Figures: docs/teachers.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.data import load_dataset
from distill.teachers.ceiling import (IMAGENET_MEAN, IMAGENET_STD, SmallCNN, ViTClassifier, rot_flip,
                                     train_for_seconds)
from distill.teachers.common import load_recipe

from .draw import render
from .parts import _pick, _scene
from .vocab import COLOUR_NAMES, SHAPES, TEXTURES

SCENE_SEED_PART = 1001   # a seed stream of its own: never the world's classification items


def render_shape_scenes(n: int, cfg: dict, seed: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`n` classification-style scenes at the world's image size: (n, H, W, 3) uint8 and shape ids."""
    size, shapes = cfg["image_size"], SHAPES[:cfg["shapes"]]
    colours = COLOUR_NAMES[:cfg["colours"]]
    spare = [c for c in COLOUR_NAMES if c not in colours] or COLOUR_NAMES
    images, labels = np.zeros((n, size, size, 3), np.uint8), np.zeros(n, np.int64)
    for i in tqdm(range(n), desc="render scenes", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, SCENE_SEED_PART, i])
        label = int(rng.integers(len(shapes)))
        specs = [(shapes[label], _pick(rng, colours), _pick(rng, TEXTURES), _pick(rng, ["medium", "large"]))]
        if rng.random() < cfg["distractor_prob"]:
            specs.append((_pick(rng, [s for s in SHAPES if s != shapes[label]]), _pick(rng, spare),
                          _pick(rng, TEXTURES), "small"))
        image, _ = render(_scene(rng, size, size, specs, overlap=False), rng)
        images[i], labels[i] = np.asarray(image), label
    return images, labels


def _normalised(images: torch.Tensor, side: int) -> torch.Tensor:
    x = F.interpolate(images.float() / 255, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def _val_split(world: Path, shapes: list[str], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classification val split through the project's ImageFolder reader, each item labelled by
    the shape its class names (`<colour> <shape>`)."""
    ds = load_dataset("imagefolder", world / "classification", "val")
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im, _ in items])
    y = torch.tensor([shapes.index(ds.classes[label].split()[-1]) for _, label in items])
    return _normalised(x, side), y


def shape_ceiling(world: str | Path, model: str = "cnn", seconds: float = 240.0, scenes: int = 20000,
                  side: int = 48, patch: int = 8, width: int = 64, batch: int = 64, lr: float = 1e-3,
                  init_range: float | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Train `model` supervised on fresh scenes for `seconds`; shape top-1 (%) on the val split.
    `init_range` overrides the ViT's weight init std (the DINOv3 teacher recipe's `initializer_range`)."""
    world = Path(world)
    cfg = json.loads((world / "world.json").read_text())["config"]["classification"]
    shapes = SHAPES[:cfg["shapes"]]
    t0 = time.perf_counter()
    images, labels = render_shape_scenes(scenes, cfg, seed, progress)
    x, y = _normalised(torch.from_numpy(images).permute(0, 3, 1, 2), side), torch.from_numpy(labels)
    xva, yva = _val_split(world, shapes, side)
    render_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if model == "cnn":
        net = SmallCNN(len(shapes), width=width)
    else:
        recipe = {**load_recipe()["dinov3"], "patch_size": patch, "hidden_size": width, "intermediate_size": 4 * width,
                  "num_attention_heads": max(1, width // 32), "image_size": side}
        if init_range is not None:
            recipe["initializer_range"] = init_range
        net = ViTClassifier(recipe, len(shapes), dense=False)

    def batches(m):
        i = torch.randint(len(x), (batch,), generator=gen)
        xb, _ = rot_flip(x[i], None, gen)
        return F.cross_entropy(m(xb), y[i])

    info = train_for_seconds(net, batches, seconds, lr, f"shape ceiling {model}", progress)
    with torch.no_grad():
        pred = torch.cat([net(xva[j:j + 256]).argmax(-1) for j in range(0, len(xva), 256)])
    return {"model": model, "shape_top1": round(100 * (pred == yva).float().mean().item(), 2),
            "chance": round(100 / len(shapes), 2), "scenes": scenes, "side": side, "width": width,
            **({"patch": patch, "init_range": recipe["initializer_range"]} if model == "vit" else {}), **info,
            "render_seconds": round(render_s, 1), "torch_threads": torch.get_num_threads()}
