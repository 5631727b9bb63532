"""Linear-probe semantic segmentation on cached, frozen patch features (mmsegmentation head and metric).

The backbone never runs inside the training loop: the harness extracts the last-layer patch features
of every train and test image once (`ctx.features(role, patches=True)`, cached on disk), and the probe
-- mmseg's decode-head machinery with a BN + 1x1 conv head (`BNHead`, as in the DINOv2/RADIO linear
probes) -- is trained on those. That keeps a sweep cell at the cost of training a linear layer.

Both BN and a 1x1 conv act on each patch independently, so the patches of a whole batch (images of
any grid sizes) are laid side by side as one (1, C, 1, P) map: BN then normalises over the batch's
patches exactly as it would over a (B, C, h, w) batch, without padding.

Loss: `train_loss_at = "patch"` (official AMoE eval) compares the logits on the patch grid with labels
nearest-downsampled to that grid; `"pixel"` (mmseg, RADIO, DINOv3) upsamples the logits bilinearly to
the label's size first. Evaluation always upsamples each image's logits to its full label size and
accumulates mmseg's `IoUMetric` areas (ignore index 255) -> mIoU, aAcc, mAcc (percent).

Protocols (lrs, epochs or iterations, warmup + poly schedule, selection) are data:
benchmarks/tasks/presets/segmentation.json. See docs/tasks.md for how crop / slide inference maps
onto features computed per whole image at the harness resolution.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.data.base import IGNORE_INDEX
from distill.seg_metrics import image_areas, metrics_from_areas
from distill.stats import ItemScores

from .base import TaskConfigError, register_task, select_heads, unknown_keys

PRESETS_PATH = Path(__file__).resolve().parent / "presets" / "segmentation.json"
PROTOCOL_FIELDS = ("epochs", "iterations", "batch_size", "lrs", "weight_decay", "warmup_iters",
                   "warmup_start_factor", "poly_power", "min_lr", "train_loss_at", "select", "dropout")


# ---------------------------------------------------------------- protocol presets

def load_presets(path: str | Path = PRESETS_PATH) -> dict[str, dict]:
    return json.loads(Path(path).read_text())


def resolve_protocol(cfg: dict) -> dict:
    """The preset named by cfg["preset"], with every non-null protocol field of cfg overriding it."""
    presets = load_presets()
    name = cfg.get("preset") or "amoe"
    if name not in presets:
        raise TaskConfigError(f"segmentation: unknown preset '{name}'; known: {', '.join(sorted(presets))} "
                              f"({PRESETS_PATH})")
    proto = {k: presets[name].get(k) for k in PROTOCOL_FIELDS}
    proto.update({k: cfg[k] for k in PROTOCOL_FIELDS if cfg.get(k) is not None})
    if (proto["epochs"] is None) == (proto["iterations"] is None):
        raise TaskConfigError("segmentation: set exactly one of 'epochs' and 'iterations' (the other null)")
    if proto["select"] not in ("last", "best_epoch"):
        raise TaskConfigError("segmentation: 'select' must be 'last' or 'best_epoch'")
    if proto["select"] == "best_epoch" and proto["epochs"] is None:
        raise TaskConfigError("segmentation: 'select': 'best_epoch' needs 'epochs' (evaluation after each epoch)")
    if proto["train_loss_at"] not in ("patch", "pixel"):
        raise TaskConfigError("segmentation: 'train_loss_at' must be 'patch' or 'pixel'")
    if not proto["lrs"] or any(float(lr) <= 0 for lr in proto["lrs"]):
        raise TaskConfigError("segmentation: 'lrs' must be a non-empty list of positive learning rates")
    proto["preset"] = name
    return proto


def lr_at(step: int, total: int, base_lr: float, warmup_iters: int = 0, warmup_start_factor: float = 1e-6,
          poly_power: float | None = None, min_lr: float = 0.0) -> float:
    """Linear warmup from base_lr * start_factor, then poly decay to min_lr (mmengine's LinearLR +
    PolyLR); poly_power null = constant after warmup."""
    if step < warmup_iters:
        f = warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_iters
        return base_lr * f
    if poly_power is None:
        return base_lr
    progress = min(step, total) / max(total, 1)
    return (base_lr - min_lr) * (1.0 - progress) ** poly_power + min_lr


# ---------------------------------------------------------------- the mmseg head

_HEAD_CLASS = None


def bn_head_class():
    """`BNHead` registered in mmseg's MODELS registry (mmseg ships none; DINOv2 and RADIO define the same)."""
    global _HEAD_CLASS
    if _HEAD_CLASS is not None:
        return _HEAD_CLASS
    from mmcv.cnn import build_norm_layer
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.registry import MODELS

    class BNHead(BaseDecodeHead):
        """BatchNorm over the input channels, then mmseg's (dropout +) 1x1 `conv_seg`."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = build_norm_layer(self.norm_cfg or dict(type="BN"), self.in_channels)[1]

        def forward(self, inputs):
            return self.cls_seg(self.bn(self._transform_inputs(inputs)))

    existing = MODELS.get("BNHead")
    _HEAD_CLASS = existing if existing is not None else MODELS.register_module(name="BNHead", module=BNHead)
    return _HEAD_CLASS


def build_head(in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    from mmseg.registry import MODELS
    bn_head_class()
    head = MODELS.build(dict(
        type="BNHead", in_channels=in_channels, channels=in_channels, num_classes=num_classes,
        out_channels=num_classes,  # softmax over every class, binary included (no sigmoid threshold)
        dropout_ratio=dropout, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
        ignore_index=IGNORE_INDEX,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True)))
    # mmseg's init_cfg for conv_seg (Normal std 0.01, bias 0), done directly: head.init_weights() would
    # log every parameter through mmengine's logger
    nn.init.normal_(head.conv_seg.weight, std=0.01)
    nn.init.zeros_(head.conv_seg.bias)
    return head


def head_logits(head: nn.Module, patches: list[torch.Tensor], grids: list[tuple[int, int]],
                device) -> list[torch.Tensor]:
    """Per-image (K, h, w) logits for a batch of flat (h*w, C) patch features of any grid sizes."""
    flat = torch.cat([p.to(device, torch.float32) for p in patches])          # (P, C)
    out = head([flat.T.reshape(1, flat.shape[1], 1, -1)])                      # (1, K, 1, P)
    out = out.reshape(out.shape[1], -1)
    pieces, start = [], 0
    for h, w in grids:
        pieces.append(out[:, start:start + h * w].reshape(-1, h, w))
        start += h * w
    return pieces


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


# ---------------------------------------------------------------- labels

class Labels:
    """Label maps of one dataset role, loaded once and kept while they fit in `budget_mb`.

    `full(i)` is the (H, W) map at the image's own size; `grid(i, h, w)` the map nearest-downsampled to
    a patch grid (small, always kept)."""

    def __init__(self, ds, num_classes: int, budget_mb: float = 2048):
        self.ds, self.num_classes = ds, num_classes
        self.budget = budget_mb * 2 ** 20
        self.used = 0
        self._full: dict[int, torch.Tensor] = {}
        self._grid: dict[tuple[int, int, int], torch.Tensor] = {}

    def _load(self, i: int) -> torch.Tensor:
        label = self.ds.load_label(i) if hasattr(self.ds, "load_label") else self.ds[i][1]
        label = torch.from_numpy(np.asarray(label, dtype=np.int64))
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            vals = sorted(set(label[bad].tolist()))[:10]
            raise ValueError(f"segmentation: label map {i} holds values {vals} outside 0..{self.num_classes - 1} "
                             f"(and {IGNORE_INDEX} = ignore); the dataset's class list has {self.num_classes} "
                             "names -- check reduce_zero_label and the class names")
        return label

    def full(self, i: int) -> torch.Tensor:
        if i in self._full:
            return self._full[i]
        label = self._load(i)
        if self.used + label.numel() <= self.budget:     # uint8 copy: labels are 0..K-1 or 255
            self._full[i] = label.to(torch.uint8)
            self.used += label.numel()
        return label

    def grid(self, i: int, h: int, w: int) -> torch.Tensor:
        key = (i, h, w)
        if key not in self._grid:
            full = self.full(i).float()[None, None]
            self._grid[key] = F.interpolate(full, size=(h, w), mode="nearest")[0, 0].to(torch.uint8)
        return self._grid[key]


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_head(head: nn.Module, patches: list[torch.Tensor], grids, labels: Labels, num_classes: int,
                  device, batch_size: int = 16) -> dict[str, float]:
    """mIoU / aAcc / mAcc (percent) with mmseg's IoUMetric area accounting, at full label resolution;
    "areas": each image's (4C,) areas, from which distill.stats recomputes the three on resamples."""
    head.eval()
    per_image = []   # (4C,) areas of each image: [intersect | union | pred | label], for bootstrap intervals
    for start in range(0, len(patches), batch_size):
        idx = range(start, min(start + batch_size, len(patches)))
        logits = head_logits(head, [patches[i] for i in idx], [grids[i] for i in idx], device)
        for i, lg in zip(idx, logits):
            label = labels.full(i).long()
            # max(0).indices: argmax's answer (the first maximum) at a tenth of its CPU time over (K, H, W)
            pred = upsample(lg, tuple(label.shape)).max(0).indices.cpu()
            per_image.append(image_areas(pred, label, num_classes))
    rows = torch.stack(per_image) if per_image else torch.zeros(0, 4 * num_classes, dtype=torch.float64)
    totals = rows.sum(0).view(4, num_classes)
    return {**metrics_from_areas(*totals), "areas": rows.numpy()}


# ---------------------------------------------------------------- training

def train_and_evaluate(train_patches, train_grids, train_labels: Labels, test_patches, test_grids,
                       test_labels: Labels, num_classes: int, proto: dict, lr: float, device, seed: int = 0,
                       progress=None) -> list[dict]:
    """Train one probe at `lr`; returns the evaluations made: one per epoch ("best_epoch") or the last."""
    torch.manual_seed(seed)
    device = torch.device(device)
    head = build_head(train_patches[0].shape[1], num_classes, float(proto["dropout"])).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=float(proto["weight_decay"]))
    n, bs = len(train_patches), int(proto["batch_size"])
    per_epoch = math.ceil(n / bs)
    total = int(proto["iterations"]) if proto["iterations"] is not None else int(proto["epochs"]) * per_epoch
    gen = torch.Generator().manual_seed(seed)
    evals, order, step = [], [], 0
    steps = range(total)
    for step in (progress(steps, total=total) if progress else steps):
        if not order:
            order = torch.randperm(n, generator=gen).tolist()
        batch = [order.pop() for _ in range(min(bs, len(order)))]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, int(proto["warmup_iters"]), float(proto["warmup_start_factor"]),
                                proto["poly_power"], float(proto["min_lr"]))
        head.train()
        logits = head_logits(head, [train_patches[i] for i in batch], [train_grids[i] for i in batch], device)
        if proto["train_loss_at"] == "patch":
            flat = torch.cat([lg.reshape(num_classes, -1).T for lg in logits])
            target = torch.cat([train_labels.grid(i, *train_grids[i]).reshape(-1) for i in batch])
        else:
            labs = [train_labels.full(i) for i in batch]
            flat = torch.cat([upsample(lg, tuple(lab.shape)).reshape(num_classes, -1).T
                              for lg, lab in zip(logits, labs)])
            target = torch.cat([lab.reshape(-1) for lab in labs])
        loss = head.loss_decode(flat, target.long().to(device), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if proto["select"] == "best_epoch" and (step + 1) % per_epoch == 0:
            evals.append({"epoch": (step + 1) // per_epoch, "lr": lr,
                          **evaluate_head(head, test_patches, test_grids, test_labels, num_classes, device, bs)})
    if proto["select"] == "last":
        evals.append({"epoch": None, "step": total, "lr": lr,
                      **evaluate_head(head, test_patches, test_grids, test_labels, num_classes, device, bs)})
    return evals


class SegmentationTask:
    name = "segmentation"
    version = "1"
    roles = ("train", "test")
    needs_patches = True
    defaults = {"preset": "amoe", "heads": None, "seed": 0, "label_cache_mb": 2048,
                **{k: None for k in PROTOCOL_FIELDS}}   # null = the preset's value

    def run(self, ctx, cfg: dict) -> dict[str, float]:
        unknown_keys(cfg, self.defaults, self.name)
        cfg = {**self.defaults, **cfg}
        proto = resolve_protocol(cfg)
        train_ds, test_ds = ctx.dataset("train"), ctx.dataset("test")
        classes = getattr(train_ds, "classes", None)
        if not classes:
            raise TaskConfigError(f"segmentation: dataset '{ctx.dataset_cfg.get('id')}' has no class list; use a "
                                  "segmentation reader (ade20k, cityscapes)")
        k = len(classes)
        if proto["preset"] == "miniworld" and len(train_ds) > 5000:
            warnings.warn(f"segmentation: the 'miniworld' preset (a short schedule for the generated mini-world) "
                          f"is training on {len(train_ds)} images; for paper numbers set \"preset\": \"amoe\" "
                          "(or radio / dinov3) in task_cfg.segmentation", stacklevel=2)
        train, test = ctx.features("train", patches=True), ctx.features("test", patches=True)
        heads = select_heads([h for h in ctx.encoder.heads if h in train.patches] or list(train.patches),
                             cfg["heads"], self.name, ctx.encoder.name, "patch head")
        train_labels = Labels(train_ds, k, cfg["label_cache_mb"] / 2)
        test_labels = Labels(test_ds, k, cfg["label_cache_mb"] / 2)
        out: dict[str, float] = {}
        for head in heads:
            evals = []
            for lr in proto["lrs"]:
                evals += train_and_evaluate(
                    train.patches[head], train.grids, train_labels, test.patches[head], test.grids, test_labels,
                    k, proto, float(lr), ctx.device, int(cfg["seed"]),
                    progress=lambda it, total: ctx.progress(it, f"seg probe {head} lr={lr:g}", total=total))
            best = max(evals, key=lambda e: (e["miou"], -e["lr"]))
            for metric in ("miou", "aacc", "macc"):
                out[f"{head}/{metric}"] = best[metric]
                ctx.record_items(f"{head}/{metric}", ItemScores(best["areas"], metric))
            if len(evals) > 1:
                out[f"{head}/best_lr"] = float(best["lr"])
                if best["epoch"] is not None:
                    out[f"{head}/best_epoch"] = float(best["epoch"])
        return out


register_task(SegmentationTask())
