"""Boxes as location tokens: quantise, parse, score.

A box is four location tokens <loc_x1><loc_y1><loc_x2><loc_y2>, each coordinate normalised by the
image's own width or height and quantised into `bins` equal bins (1000 by default, as in
Kosmos-2 / PaliGemma-style grounding). Decoding takes each bin's centre, then rescales to the
original image, so a box survives a round trip to within half a bin.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def quantise_box(box_xyxy: tuple[float, float, float, float], width: float, height: float,
                 bins: int) -> list[int]:
    """Pixel xyxy box -> 4 bin indices in [0, bins)."""
    x1, y1, x2, y2 = box_xyxy
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"degenerate box {box_xyxy}: need x2 > x1 and y2 > y1")
    scale = (width, height, width, height)
    out = []
    for v, s in zip((x1, y1, x2, y2), scale):
        q = int(min(max(v / s, 0.0), 1.0) * bins)
        out.append(min(q, bins - 1))
    return out


def dequantise_box(bins_xyxy: list[int], width: float, height: float, bins: int) -> list[float]:
    """4 bin indices -> pixel xyxy box (bin centres), in the original image's pixels."""
    scale = (width, height, width, height)
    return [(b + 0.5) / bins * s for b, s in zip(bins_xyxy, scale)]


def to_norm1000(box_xyxy: list[float], width: float, height: float) -> list[int]:
    """Pixel xyxy -> the 0-1000 normalised integer convention many VLMs read and write (Qwen-VL,
    Kosmos-2 style): round(v / side * 1000), clamped to [0, 1000]."""
    scale = (width, height, width, height)
    return [int(min(max(round(v / s * 1000), 0), 1000)) for v, s in zip(box_xyxy, scale)]


def box_iou(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    """IoU of two xyxy boxes (continuous coordinates, as pycocotools' iou with iscrowd=0)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class GroundingScore:
    """Acc@0.5: the share of expressions whose predicted box has IoU >= 0.5 with the truth.

    An unparsable prediction (None) counts as a miss, as the field does, and is counted apart."""

    hits: int = 0
    total: int = 0
    unparsable: int = 0
    iou_sum: float = 0.0
    ious: list = field(default_factory=list)   # per expression, for bootstrap intervals
    threshold: float = 0.5

    def add(self, predicted: list[float] | None, truth: list[float]) -> float:
        self.total += 1
        if predicted is None:
            self.unparsable += 1
            self.ious.append(0.0)
            return 0.0
        iou = box_iou(predicted, truth)
        self.ious.append(iou)
        self.iou_sum += iou
        self.hits += iou >= self.threshold
        return iou

    def items(self) -> dict:
        """Per-expression scores behind acc@0.5 and mean_iou (distill.stats)."""
        from distill.stats import hits
        ious = np.asarray(self.ious, dtype=np.float64)
        return {"acc@0.5": hits(ious >= self.threshold), "mean_iou": hits(ious)}

    def metrics(self) -> dict[str, float]:
        n = max(self.total, 1)
        return {"acc@0.5": 100.0 * self.hits / n, "mean_iou": 100.0 * self.iou_sum / n,
                "unparsable": float(self.unparsable), "n": float(self.total)}
