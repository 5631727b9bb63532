"""What the mini-world allows in the teachers' budget: raw-pixel floors and supervised ceilings.

`amoe teachers ceiling --world W` answers "is a weak teacher a bug or a limit?" before anyone tunes a
recipe. On the benchmark's own train/test splits it measures
- a floor: a logistic-regression probe on raw 24 x 24 pixels (classification); the other raw-pixel
  floors go through the benchmark tasks like any model (`pixels:24`, a row of the quickstart's
  leaderboard: kNN, and the segmentation linear probe on raw 16-px patches);
- ceilings in a fixed CPU budget, trained *supervised* on the labelled train splits (which no teacher
  sees with labels): a small CNN and the DINOv3 teacher's own ViT on classification, and the same
  ViT as a per-patch classifier on segmentation.
A teacher far below the supervised ceiling has room to grow; a ceiling near the floor says the
budget (or the world) is the limit. Figures: docs/teachers.md.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from tqdm.auto import tqdm

from distill.data import load_dataset
from distill.seg_metrics import image_areas, metrics_from_areas
from distill.train.optim import build_adamw


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tensors(images: list, side: int) -> torch.Tensor:
    x = torch.stack([TF.pil_to_tensor(im.convert("RGB").resize((side, side))) for im in images]).float() / 255
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def _split(world: Path, reader: str, part: str, split: str):
    ds = load_dataset(reader, world / part, split)
    return ds, [ds[i] for i in range(len(ds))]


class SmallCNN(nn.Module):
    """Four stride-2 conv blocks (stride 16 overall), global average pool, linear classifier."""

    def __init__(self, classes: int, width: int = 128):
        super().__init__()
        chans = [3, 32, 64, width, width]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class ViTClassifier(nn.Module):
    """The DINOv3 teacher's ViT (HF DINOv3ViTModel, same recipe shape) with a linear head on CLS
    (`dense=False`) or on every patch token (`dense=True`)."""

    def __init__(self, recipe: dict, classes: int, dense: bool):
        super().__init__()
        from .dinov3 import build_model
        self.backbone = build_model(recipe)
        self.skip = 1 + recipe["num_register_tokens"]
        self.dense = dense
        self.head = nn.Linear(recipe["hidden_size"], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=x).last_hidden_state
        return self.head(hidden[:, self.skip:] if self.dense else hidden[:, 0])


def rot_flip(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator):
    """Random horizontal flip and 90-degree rotation (the world's shapes are drawn at any angle)."""
    k = int(torch.randint(4, (1,), generator=gen))
    flip = bool(torch.randint(2, (1,), generator=gen))
    x = torch.rot90(x, k, (2, 3))
    x = x.flip(-1) if flip else x
    if y is not None:
        y = torch.rot90(y, k, (1, 2))
        y = y.flip(-1) if flip else y
    return x, y


def train_for_seconds(model: nn.Module, batches, seconds: float, lr: float, desc: str, progress: bool) -> dict:
    """AdamW at a constant lr until `seconds` of wall time are used; returns steps and seconds."""
    opt = build_adamw(model.named_parameters(), lr, 0.05)
    model.train()
    t0, steps = time.perf_counter(), 0
    bar = tqdm(desc=desc, disable=not progress, leave=False)
    while time.perf_counter() - t0 < seconds:
        loss = batches(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        bar.update()
        if steps % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1)}


def _vit_recipe() -> dict:
    from .common import load_recipe
    return load_recipe()["dinov3"]


# Input side of each supervised classifier: the CNN at 48 px (at 96 px it makes ~6x fewer steps in a
# budget and lands 12 points lower, docs/teachers.md: 96 px measured its step cost more than the
# world); the ViT at the DINOv3 teacher's own global-crop size.
CNN_SIDE = 48


def supervised_classification(world: Path, arch: str, seconds: float, side: int | None = None, batch: int = 48,
                              seed: int = 0, progress: bool = True) -> dict:
    """A classifier trained on the classification train split only; top-1 (%) on val. `side` defaults
    to CNN_SIDE for the CNN and to the teacher recipe's `global_size` for the ViT."""
    side = side or (CNN_SIDE if arch == "cnn" else _vit_recipe()["global_size"])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ds, train = _split(world, "imagefolder", "classification", "train")
    _, val = _split(world, "imagefolder", "classification", "val")
    xtr, ytr = _tensors([im for im, _ in train], side), torch.tensor([y for _, y in train])
    xva, yva = _tensors([im for im, _ in val], side), torch.tensor([y for _, y in val])
    classes = len(ds.classes)
    if arch == "cnn":
        model, lr = SmallCNN(classes), 2e-3
    else:
        recipe = {**_vit_recipe(), "image_size": side}
        model, lr = ViTClassifier(recipe, classes, dense=False), 1e-3

    def batches(m):
        i = torch.randint(len(xtr), (min(batch, len(xtr)),), generator=gen)
        x, _ = rot_flip(xtr[i], None, gen)
        return F.cross_entropy(m(x), ytr[i])

    info = train_for_seconds(model, batches, seconds, lr, f"ceiling {arch} classification", progress)
    with torch.no_grad():
        pred = torch.cat([model(xva[j:j + 128]).argmax(-1) for j in range(0, len(xva), 128)])
    return {"top1": round(100 * (pred == yva).float().mean().item(), 2), **info, "image_size": side}


def supervised_segmentation(world: Path, seconds: float, side: int = 128, batch: int = 32, seed: int = 0,
                            progress: bool = True) -> dict:
    """The teacher ViT as a per-patch classifier trained on the segmentation train split; val mIoU (%)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ds, train = _split(world, "ade20k", "segmentation", "training")
    _, val = _split(world, "ade20k", "segmentation", "validation")
    recipe = {**_vit_recipe(), "image_size": side}
    p, classes = recipe["patch_size"], len(ds.classes)
    grid = side // p

    def labels(items):  # label of each patch centre; 255 (background / ignore) stays 255
        y = torch.stack([torch.as_tensor(np.asarray(lab)).long() for _, lab in items])
        return F.interpolate(y[:, None].float(), size=(grid, grid), mode="nearest")[:, 0].long()

    xtr, ytr = _tensors([im for im, _ in train], side), labels(train)
    xva = _tensors([im for im, _ in val], side)
    yva = torch.stack([torch.as_tensor(np.asarray(lab)).long() for _, lab in val])
    model = ViTClassifier(recipe, classes, dense=True)

    def batches(m):
        i = torch.randint(len(xtr), (min(batch, len(xtr)),), generator=gen)
        x, y = rot_flip(xtr[i], ytr[i], gen)
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten(), ignore_index=255)

    info = train_for_seconds(model, batches, seconds, 1e-3, "ceiling vit segmentation", progress)
    with torch.no_grad():
        logits = torch.cat([model(xva[j:j + 64]) for j in range(0, len(xva), 64)])
    logits = logits.reshape(len(xva), grid, grid, classes).permute(0, 3, 1, 2)
    logits = F.interpolate(logits, size=yva.shape[-2:], mode="bilinear", align_corners=False)
    scores = seg_scores(logits.argmax(1), yva, classes)
    return {"miou": round(scores["miou"], 2), "pixel_acc": round(scores["aacc"], 2), **info}


def seg_scores(pred: torch.Tensor, target: torch.Tensor, classes: int) -> dict:
    """mIoU and pixel accuracy (percent) of predicted label maps, by the benchmark's own mIoU."""
    rows = torch.stack([image_areas(p, t, classes) for p, t in zip(pred, target)])
    return metrics_from_areas(*rows.sum(0).view(4, classes))


def raw_pixel_floors(world: Path, seed: int = 0) -> dict:
    """Logistic regression on raw 24-px pixels (the kNN and segmentation floors: `pixels:24` through
    the benchmark tasks)."""
    from sklearn.linear_model import LogisticRegression
    _, train = _split(world, "imagefolder", "classification", "train")
    _, val = _split(world, "imagefolder", "classification", "val")
    xtr, xva = _tensors([im for im, _ in train], 24).flatten(1), _tensors([im for im, _ in val], 24).flatten(1)
    ytr, yva = torch.tensor([y for _, y in train]), torch.tensor([y for _, y in val])
    probe = LogisticRegression(max_iter=2000, C=0.1, random_state=seed).fit(xtr.numpy(), ytr.numpy())
    return {"linear_top1": round(100 * float((probe.predict(xva.numpy()) == yva.numpy()).mean()), 2)}


def measure_ceiling(world: str | os.PathLike, seconds: float = 240.0, seed: int = 0, progress: bool = True) -> dict:
    """Floors and ceilings on `world`; each supervised model gets `seconds` of wall time."""
    world = Path(world)
    t0 = time.perf_counter()
    out = {"budget_seconds_per_model": seconds, "torch_threads": torch.get_num_threads(),
           "raw_pixels": raw_pixel_floors(world, seed),
           "supervised": {"cnn_classification": supervised_classification(world, "cnn", seconds, seed=seed,
                                                                          progress=progress),
                          "vit_classification": supervised_classification(world, "vit", seconds, seed=seed,
                                                                          progress=progress),
                          "vit_segmentation": supervised_segmentation(world, seconds, seed=seed,
                                                                      progress=progress)}}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
