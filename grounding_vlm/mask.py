"""Referring segmentation: a light mask head on the vision experts' patch states, conditioned on the
expression.

Why a head and not polygon tokens: the vision experts already hold one state per 16-px patch, and in
the early-fusion sequence the expression's last prompt token (<sep>) has attended to all of them; a
mask is then one dot product per patch, `<MLP(patch), W text> / sqrt(D) + b`, upsampled bilinearly to
pixels. Polygon tokens would lengthen every decoded answer by tens of tokens and score a mask only
through a rasteriser. The head reads the same states the box tokens are decoded from, costs two
D x D layers and one D x D projection, and leaves the box path unchanged.

Training: binary cross-entropy plus dice against the ref's COCO mask (decoded with pycocotools at the
original size, then area-averaged to 4x the patch grid). Evaluation: the logits upsampled to the
original image, thresholded at 0, scored per expression as the RefCOCO segmentation protocol does:
cIoU (total intersection over total union) and mIoU (mean of the per-expression IoUs).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRAIN_SCALE = 4     # masks are compared at 4x the patch grid in training (a 16-px patch -> 4 x 4 cells)


class MaskHead(nn.Module):
    def __init__(self, dim: int, text_dim: int | None = None):
        """dim: the vision experts' width; text_dim: the text states' (an LM's hidden size), default dim."""
        super().__init__()
        self.patch = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.text = nn.Linear(text_dim or dim, dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, patch_states: torch.Tensor, grid: tuple[int, int], text_state: torch.Tensor) -> torch.Tensor:
        """(Hp * Wp, D) patch states, the expression's (text_dim,) state -> (Hp, Wp) mask logits."""
        scores = self.patch(patch_states) @ self.text(text_state) / math.sqrt(patch_states.shape[-1])
        return (scores + self.bias).view(*grid)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def mask_loss(logits: torch.Tensor, truth: np.ndarray) -> torch.Tensor:
    """BCE + dice of (Hp, Wp) logits against a binary (H, W) mask of the original image."""
    hp, wp = logits.shape
    size = (hp * TRAIN_SCALE, wp * TRAIN_SCALE)
    target = F.interpolate(torch.from_numpy(truth).float()[None, None].to(logits.device), size=size,
                           mode="area")[0, 0]
    pred = upsample(logits, size)
    bce = F.binary_cross_entropy_with_logits(pred, target)
    p = torch.sigmoid(pred)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def predicted_mask(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The binary mask at the original image size."""
    return (upsample(logits, (height, width)) > 0).cpu().numpy()


class MaskScore:
    """cIoU and mIoU over expressions, with the per-item rows their intervals are drawn from."""

    def __init__(self):
        self.rows: list[list[float]] = []     # [intersection, union, predicted area, true area]

    def add(self, pred: np.ndarray, truth: np.ndarray) -> float:
        truth = truth.astype(bool)
        inter, union = float((pred & truth).sum()), float((pred | truth).sum())
        self.rows.append([inter, union, float(pred.sum()), float(truth.sum())])
        return inter / union if union else 0.0

    def metrics(self) -> dict[str, float]:
        return {name: scores.metric() for name, scores in self.items().items()}

    def items(self) -> dict:
        """Per-expression rows: cIoU from the summed areas, mIoU from each expression's IoU."""
        from distill.stats import ItemScores, hits

        r = np.asarray(self.rows, dtype=np.float64).reshape(-1, 4)
        ious = np.where(r[:, 1] > 0, r[:, 0] / np.maximum(r[:, 1], 1), 0.0)
        return {"mask_ciou": ItemScores(r, "miou"), "mask_miou": hits(ious)}
