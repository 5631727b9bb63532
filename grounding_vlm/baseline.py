"""The constant-box baseline: one box for every expression, the mean training box.

    amoe ground baseline CONFIG --set data.root=REFER --split all

A grounding model that reads neither the image nor the expression can still score by predicting where
referred objects usually are. This baseline is that floor, made from the training split only: the mean
of the training boxes, each normalised by its image's width and height, rescaled to every evaluated
image. It is scored as `amoe ground eval` scores a model (IoU >= 0.5 in the original image's pixels,
and in the 0-1000 convention), on the same items with the same dataset fingerprint and task settings,
so a model's paired difference against it has an interval (`amoe leaderboard compare`, the evidence
page). Filed as the row `grounding-baseline:constant-box`.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .boxes import GroundingScore, to_norm1000
from .data import GroundingExample, load_split

MODEL = "grounding-baseline:constant-box"


def mean_box(examples: list[GroundingExample]) -> list[float]:
    """The mean of the boxes, each as (x1 / W, y1 / H, x2 / W, y2 / H)."""
    if not examples:
        raise ValueError("the constant-box baseline needs training expressions; the train split has none")
    norm = np.array([[e.box_xyxy[0] / e.width, e.box_xyxy[1] / e.height, e.box_xyxy[2] / e.width,
                      e.box_xyxy[3] / e.height] for e in examples], dtype=np.float64)
    return norm.mean(0).tolist()


def evaluate_constant_box(cfg: dict, split: str, results_dir: str | Path, *, limit: int | None = None,
                          suite: str | None = None, dataset_id: str | None = None) -> dict:
    """Score the mean training box on `split` of `cfg["data"]` (a grounding config); writes a result JSON."""
    from distill.results import Cell, jsonable, make_record, settings_digest, write_result
    from distill.stats import DEFAULTS as STATS_DEFAULTS, metric_intervals

    from .evaluate import TASK, result_identity, scored_fingerprint

    t0 = time.time()
    box = mean_box(load_split(cfg["data"], cfg["data"]["train_split"]).examples)
    data = load_split(cfg["data"], split)
    examples = data.examples[:limit] if limit else data.examples
    if not examples:
        raise ValueError(f"split {split!r} has no expressions to evaluate")
    score, score_1000 = GroundingScore(), GroundingScore()
    for e in examples:
        pred = [box[0] * e.width, box[1] * e.height, box[2] * e.width, box[3] * e.height]
        score.add(pred, list(e.box_xyxy))
        score_1000.add(to_norm1000(pred, e.width, e.height), to_norm1000(list(e.box_xyxy), e.width, e.height))
    m = score.metrics() | {"acc@0.5_norm1000": score_1000.metrics()["acc@0.5"],
                           "missing_images": float(data.missing_images)}
    items = score.items() | {"acc@0.5_norm1000": score_1000.items()["acc@0.5"]}
    suite, dataset_id = result_identity(cfg, split, suite, dataset_id)
    ordered = bool(cfg.get("eval", {}).get("ordered_boxes", True))
    cell = Cell(model=MODEL, task="grounding", dataset=dataset_id, resolution=None, limit=limit,
                settings=settings_digest(TASK["version"], {"ordered_boxes": ordered}))
    record = make_record(
        cell, "ok", metrics=m,
        config=jsonable({"suite": suite, "split": split, "limit": limit, "baseline": "constant box",
                         "box_normalised_xyxy": [round(v, 6) for v in box], "train_split": cfg["data"]["train_split"],
                         "boxes": {"scored_in": "pixels of the original image, xyxy (acc@0.5)",
                                   "also": "0-1000 normalised integers, xyxy (acc@0.5_norm1000)"}}),
        model={"name": MODEL, "params": 4, "active_params": 4, "init": "mean training box"},
        dataset={"dataset": cfg["data"].get("dataset"), "split": split, "fingerprint": scored_fingerprint(examples),
                 "split_by": cfg["data"].get("split_by"), **data.report(), "evaluated": len(examples)},
        task=TASK, timings={"total_s": time.time() - t0}, intervals=metric_intervals(m, items, **STATS_DEFAULTS))
    path = write_result(Path(results_dir), record, items=items)
    record["_path"] = str(path)
    return record
