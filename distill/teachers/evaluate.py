"""Complementarity check of the trained teachers, loaded back from disk like hub models.

A small, self-contained evaluation (the benchmark harness runs the full protocols): zero-shot
top-1 (SigLIP2's text tower; class prompts from the dataset's templates), kNN top-1 (k=20, T=0.07 on
L2-normalised summary features), retrieval R@1 (SigLIP2), and a linear probe (BN + 1x1 conv on frozen
last-layer patch features) for segmentation, reporting mIoU and pixel accuracy. Only the benchmark
splits are evaluated here; none of them was seen in training.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.data import load_dataset

from .common import TeacherError, is_complete
from .tokenizer import encode


def load_teacher(path: str | os.PathLike):
    """(kind, model, processor) for a saved teacher dir, offline."""
    path = Path(path)
    if not is_complete(path):
        raise TeacherError(f"'{path}' is not a complete teacher dir (no COMPLETE.json); train it with "
                           "`amoe teachers train --world WORLD --out DIR`")
    from transformers import AutoConfig
    kind = AutoConfig.from_pretrained(path).model_type
    if kind == "siglip2":
        from transformers import Siglip2Model, Siglip2Processor
        return kind, Siglip2Model.from_pretrained(path).eval(), Siglip2Processor.from_pretrained(path)
    if kind == "dinov3_vit":
        from transformers import DINOv3ViTImageProcessor, DINOv3ViTModel
        return kind, DINOv3ViTModel.from_pretrained(path).eval(), DINOv3ViTImageProcessor.from_pretrained(path)
    raise TeacherError(f"'{path}' holds a '{kind}' model; expected siglip2 or dinov3_vit")


@torch.no_grad()
def image_features(kind: str, model, proc, images: list, batch: int = 64, progress: bool = False,
                   max_num_patches: int | None = None):
    """Summary (N, C) and patch features (N, h, w, C); images must share a size for the patch grid.
    `max_num_patches` overrides SigLIP2's saved patch budget (to compare both teachers on one grid)."""
    summaries, patches = [], []
    for i in tqdm(range(0, len(images), batch), desc=f"{kind} features", disable=not progress, leave=False):
        chunk = images[i:i + batch]
        if kind == "siglip2":
            kw = {"max_num_patches": max_num_patches} if max_num_patches else {}
            inp = proc.image_processor(images=chunk, return_tensors="pt", **kw)
            out = model.vision_model(pixel_values=inp["pixel_values"], pixel_attention_mask=inp["pixel_attention_mask"],
                                     spatial_shapes=inp["spatial_shapes"])
            h, w = (int(v) for v in inp["spatial_shapes"][0])
            if not (inp["spatial_shapes"] == inp["spatial_shapes"][0]).all():
                raise ValueError("image_features needs images of one size (one patch grid) per call")
            grid = out.last_hidden_state[:, :h * w]
        else:
            inp = proc(images=chunk, return_tensors="pt")
            out = model(pixel_values=inp["pixel_values"])
            h = inp["pixel_values"].shape[-2] // model.config.patch_size
            w = inp["pixel_values"].shape[-1] // model.config.patch_size
            grid = out.last_hidden_state[:, 1 + model.config.num_register_tokens:]
        summaries.append(out.pooler_output)
        patches.append(grid.reshape(len(chunk), h, w, -1))
    return torch.cat(summaries), torch.cat(patches)


@torch.no_grad()
def text_features(model, proc, texts: list[str]) -> torch.Tensor:
    ids = encode(proc.tokenizer, texts, model.config.text_config.max_position_embeddings)
    return model.get_text_features(input_ids=ids).pooler_output


def knn_top1(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, T: float = 0.07) -> float:
    train, test = F.normalize(train, dim=-1), F.normalize(test, dim=-1)
    sims, idx = (test @ train.t()).topk(min(k, len(train)), dim=-1)
    votes = torch.zeros(len(test), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (sims / T).exp())
    return (votes.argmax(-1) == test_y).float().mean().item()


def seg_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              classes: int, steps: int = 300, lr: float = 1e-2, batch: int = 32, seed: int = 0) -> dict:
    """BN + 1x1 conv on frozen patch features (N, h, w, C); logits upsampled to label size."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm2d(train_x.shape[-1]), nn.Conv2d(train_x.shape[-1], classes, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    tx = train_x.permute(0, 3, 1, 2)
    for _ in range(steps):
        i = torch.randint(len(tx), (min(batch, len(tx)),), generator=g)
        logits = F.interpolate(head(tx[i]), size=train_y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, train_y[i], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        logits = F.interpolate(head(val_x.permute(0, 3, 1, 2)), size=val_y.shape[-2:], mode="bilinear",
                               align_corners=False)
    return seg_scores(logits.argmax(1), val_y, classes)


def seg_scores(pred: torch.Tensor, target: torch.Tensor, classes: int) -> dict:
    """mIoU and pixel accuracy (fractions) over pixels whose target is not 255, as mmseg's IoUMetric
    computes them: per-class IoU over the whole split, averaged over classes with a non-empty union."""
    valid = target != 255
    p, t = pred[valid], target[valid]
    inter = torch.bincount(t[p == t], minlength=classes).float()
    union = (torch.bincount(p, minlength=classes) + torch.bincount(t, minlength=classes)).float() - inter
    seen = union > 0
    return {"miou": (inter[seen] / union[seen]).mean().item(), "pixel_acc": (p == t).float().mean().item()}


def _load_cls(world: Path, split: str, limit: int | None):
    ds = load_dataset("imagefolder", world / "classification", split)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return ds, [im for im, _ in items], torch.tensor([y for _, y in items])


def evaluate_teachers(world: str | os.PathLike, teachers: str | os.PathLike, limit: int | None = None,
                      probe_steps: int = 300, progress: bool = True,
                      names: tuple[str, ...] = ("siglip2", "dinov3")) -> dict:
    """Metrics per teacher: zeroshot/retrieval (siglip2), knn and segmentation (both)."""
    world, teachers = Path(world), Path(teachers)
    t0 = time.perf_counter()
    cls_train, train_imgs, train_y = _load_cls(world, "train", None)
    cls_val, val_imgs, val_y = _load_cls(world, "val", limit)
    seg_tr = load_dataset("ade20k", world / "segmentation", "training")
    seg_va = load_dataset("ade20k", world / "segmentation", "validation")
    seg_train = [seg_tr[i] for i in range(len(seg_tr) if limit is None else min(limit, len(seg_tr)))]
    seg_val = [seg_va[i] for i in range(len(seg_va) if limit is None else min(limit, len(seg_va)))]
    sy_tr = torch.stack([torch.as_tensor(y) for _, y in seg_train]).long()
    sy_va = torch.stack([torch.as_tensor(y) for _, y in seg_val]).long()
    results: dict = {}
    seg_grid = _dinov3_grid(teachers / "dinov3")
    for name in names:
        kind, model, proc = load_teacher(teachers / name)
        m: dict = {}
        tr_sum, _ = image_features(kind, model, proc, train_imgs, progress=progress)
        va_sum, _ = image_features(kind, model, proc, val_imgs, progress=progress)
        m["knn_top1"] = knn_top1(tr_sum, train_y, va_sum, val_y)
        if kind == "siglip2":
            templates = cls_val.templates or ["a photo of a {}."]
            w = torch.stack([F.normalize(F.normalize(text_features(model, proc, [t.format(c) for t in templates]),
                                                     dim=-1).mean(0), dim=0) for c in cls_val.classes])
            m["zeroshot_top1"] = ((F.normalize(va_sum, dim=-1) @ w.t()).argmax(-1) == val_y).float().mean().item()
            m.update(_retrieval(world, kind, model, proc, limit, progress))
        # both teachers on DINOv3's grid for the same images (SigLIP2's patch budget raised to match)
        budget = (seg_grid[0] * seg_grid[1]) if kind == "siglip2" and seg_grid else None
        _, p_tr = image_features(kind, model, proc, [im for im, _ in seg_train], progress=progress,
                                 max_num_patches=budget)
        _, p_va = image_features(kind, model, proc, [im for im, _ in seg_val], progress=progress,
                                 max_num_patches=budget)
        seg = seg_probe(p_tr, sy_tr, p_va, sy_va, len(seg_tr.classes), steps=probe_steps)
        m["seg_miou"], m["seg_pixel_acc"] = seg["miou"], seg["pixel_acc"]
        results[name] = {k: round(v, 4) for k, v in m.items()}
    results["seconds"] = round(time.perf_counter() - t0, 2)
    return results


def _dinov3_grid(path: Path) -> tuple[int, int] | None:
    """Patch grid of the DINOv3 teacher's processor (its fixed resize), if that teacher exists."""
    cfg, pre = path / "config.json", path / "preprocessor_config.json"
    if not (cfg.is_file() and pre.is_file()):
        return None
    import json
    p = json.loads(cfg.read_text())["patch_size"]
    size = json.loads(pre.read_text())["size"]
    return size["height"] // p, size["width"] // p


def _retrieval(world: Path, kind: str, model, proc, limit: int | None, progress: bool) -> dict:
    ds = load_dataset("karpathy", world / "retrieval", "test", json_name="dataset_miniworld.json")
    n = len(ds) if limit is None else min(limit, len(ds))
    images = [ds[i] for i in range(n)]
    img = F.normalize(torch.cat([image_features(kind, model, proc, [im], progress=False)[0] for im in images])
                      if len({im.size for im in images}) > 1 else image_features(kind, model, proc, images)[0], dim=-1)
    caps = [(c, i) for i in range(n) for c in ds.captions[i]]
    txt = F.normalize(torch.cat([text_features(model, proc, [c for c, _ in caps[j:j + 256]])
                                 for j in range(0, len(caps), 256)]), dim=-1)
    owner = torch.tensor([i for _, i in caps])
    sim = txt @ img.t()
    t2i = (sim.argmax(-1) == owner).float().mean().item()
    i2t = (owner[sim.t().argmax(-1)] == torch.arange(n)).float().mean().item()
    return {"retrieval_t2i_r1": t2i, "retrieval_i2t_r1": i2t}
