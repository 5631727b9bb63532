"""The one mIoU: mmseg's IoUMetric area accounting, shared by the benchmark's segmentation probe and
the teachers' ceiling (`amoe teachers ceiling`).

`image_areas` gives one image's (4C,) row [intersect | union | pred | label] (the rows are what
distill.stats resamples for intervals); `metrics_from_areas` turns summed areas into percent.
"""
from __future__ import annotations

import numpy as np
import torch

from distill.data.base import IGNORE_INDEX


def image_areas(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(H, W) prediction and label (IGNORE_INDEX = ignored) -> (4C,) float64 areas."""
    from mmseg.evaluation import IoUMetric

    areas = IoUMetric.intersect_and_union(pred, label.long(), num_classes, IGNORE_INDEX)
    return torch.cat([a.double().cpu() for a in areas])


def metrics_from_areas(intersect, union, pred_area, label_area) -> dict[str, float]:
    """IoUMetric's totals -> percent; classes absent from both prediction and labels are left out (NaN)."""
    from mmseg.evaluation import IoUMetric
    m = IoUMetric.total_area_to_metrics(intersect, union, pred_area, label_area, ["mIoU"])
    return {"miou": 100.0 * float(np.nanmean(np.asarray(m["IoU"], dtype=np.float64))),
            "aacc": 100.0 * float(m["aAcc"]),
            "macc": 100.0 * float(np.nanmean(np.asarray(m["Acc"], dtype=np.float64)))}
