"""Zero-shot classification: class prototypes from prompt templates, per text head, plus an ensemble.

Per class c and text head h: embed every template filled with the class name, L2-normalise each
embedding, average them, re-normalise -> W_h[c]. Images: L2-normalised summary features of head h.
cos_h = img_h @ W_h^T; logits_h = s * cos_h (s = 1 for the official eval's raw cosines, or the
encoder's `logit_scale(h)`; the choice changes nothing for a single head, only the ensemble weights).

Ensemble of >= 2 heads (the official AMoE eval's `combine_logits(mode="entropy_weighted")`, beta = 5):
    p_h   = softmax(logits_h)                              per image, over classes
    H_h   = -sum_c p_h[c] * log(max(p_h[c], 1e-8))         entropy in nats (not normalised by log C)
    w_h   = exp(-beta * H_h) / sum_g exp(-beta * H_g)      per image: the more confident head weighs more
    logits_ens = sum_h w_h * logits_h
Metrics (percent): top1, top5 (NaN under 5 classes), mean_per_class_recall; keys 'head/metric' and
'ensemble/metric'.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from .base import TaskConfigError, normalize, percent, register_task, select_heads, unknown_keys
from .metrics import check_targets, classification_items, mean_per_class_recall, topk_accuracy

TEMPLATE_SETS = ("openai_imagenet", "simple_imagenet")


def _read_list(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise TaskConfigError(f"zeroshot: {what} file {path} not found")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise TaskConfigError(f"zeroshot: {path} must hold a JSON list of strings")
        return data
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def resolve_templates(spec, dataset_templates: Sequence[str] | None) -> list[Callable[[str], str]]:
    """Template functions class name -> prompt.

    spec: None (the dataset's own templates, else the 80 OpenAI ImageNet templates), "openai_imagenet",
    "simple_imagenet" (both from open_clip), a list of strings with "{}", or a .json/.txt file of them."""
    if spec is None:
        spec = list(dataset_templates) if dataset_templates else "openai_imagenet"
    if isinstance(spec, str) and spec in TEMPLATE_SETS:
        from open_clip import zero_shot_metadata as meta  # open_clip ships both sets as callables
        return list(meta.OPENAI_IMAGENET_TEMPLATES if spec == "openai_imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES)
    if isinstance(spec, (str, Path)):
        spec = _read_list(Path(spec), "templates")
    if not isinstance(spec, list) or not spec:
        raise TaskConfigError(f"zeroshot: 'templates' must be null, one of {TEMPLATE_SETS}, a non-empty list "
                              "or a file path")
    bad = [t for t in spec if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise TaskConfigError(f"zeroshot: templates must contain '{{}}' where the class name goes; bad: {bad[:3]}")
    return [lambda c, t=t: t.replace("{}", c) for t in spec]


def resolve_classnames(spec, dataset_classes: Sequence[str] | None, targets: torch.Tensor) -> list[str]:
    """Class names in label order: the dataset's own, "imagenet" (open_clip's 1000), a list, or a file."""
    if spec is None:
        if not dataset_classes:
            raise TaskConfigError("zeroshot: the dataset has no 'classes'; set 'classnames' in the task config")
        names = list(dataset_classes)
    elif spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES
        names = list(IMAGENET_CLASSNAMES)
    elif isinstance(spec, (str, Path)):
        names = _read_list(Path(spec), "classnames")
    else:
        names = list(spec)
    if dataset_classes and len(names) != len(dataset_classes):
        raise ValueError(f"zeroshot: {len(names)} class names given but the dataset has {len(dataset_classes)} "
                         "classes; the names must list every class in label order")
    check_targets(targets, len(names), "zeroshot")
    return names


def class_weights(text_emb: torch.Tensor, num_classes: int, num_templates: int) -> torch.Tensor:
    """(C*T, D) template embeddings, class-major -> (C, D) normalised prototypes."""
    if text_emb.shape[0] != num_classes * num_templates:
        raise ValueError(f"zeroshot: got {text_emb.shape[0]} text embeddings for {num_classes} classes x "
                         f"{num_templates} templates")
    per = normalize(text_emb).reshape(num_classes, num_templates, -1)
    return normalize(per.mean(dim=1))


def entropy_weighted_logits(logits: list[torch.Tensor], beta: float) -> torch.Tensor:
    """The official AMoE ensemble (see the module docstring): per-image softmax(-beta * entropy) weights."""
    ents = []
    for lg in logits:
        p = torch.softmax(lg.double(), dim=-1).clamp_min(1e-8)
        ents.append(-(p * p.log()).sum(dim=-1))
    w = torch.softmax(-beta * torch.stack(ents, dim=-1), dim=-1)          # (N, heads)
    return sum(w[:, i:i + 1] * lg.double() for i, lg in enumerate(logits)).float()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    pred = logits.argmax(dim=1)
    return {"top1": percent(topk_accuracy(logits, targets, 1)),
            "top5": percent(topk_accuracy(logits, targets, 5)),
            "mean_per_class_recall": percent(mean_per_class_recall(pred, targets, num_classes))}


class ZeroShotTask:
    name = "zeroshot"
    version = "1"
    roles = ("test",)
    needs_patches = False
    defaults = {
        "templates": None,            # null: the dataset's templates, else open_clip's 80 OpenAI templates
        "classnames": None,           # null: the dataset's classes
        "heads": None,                # null: every text head of the encoder that also has image features
        "ensemble": True,             # entropy-weighted ensemble when >= 2 heads
        "ensemble_beta": 5.0,
        "ensemble_logits": "cosine",  # "cosine" (official eval: raw cosines, T = 1) or "logit_scale"
        "batch_size": 8192,           # images scored per matmul
    }

    def run(self, ctx, cfg: dict) -> dict[str, float]:
        unknown_keys(cfg, self.defaults, self.name)
        cfg = {**self.defaults, **cfg}
        if cfg["ensemble_logits"] not in ("cosine", "logit_scale"):
            raise TaskConfigError("zeroshot: 'ensemble_logits' must be 'cosine' or 'logit_scale'")
        ds = ctx.dataset("test")
        feats = ctx.features("test")
        targets = torch.as_tensor(list(ds.targets), dtype=torch.long)
        classes = resolve_classnames(cfg["classnames"], getattr(ds, "classes", None), targets)
        templates = resolve_templates(cfg["templates"], getattr(ds, "templates", None))
        texts = [t(c) for c in classes for t in templates]
        heads = select_heads([h for h in ctx.encoder.text_heads if h in feats.summary], cfg["heads"],
                             self.name, ctx.encoder.name, "text tower")
        out: dict[str, float] = {}
        all_logits = []
        for head in heads:
            weights = class_weights(ctx.text_features(texts, head), len(classes), len(templates))
            img = feats.summary[head]
            if img.shape[1] != weights.shape[1]:
                raise ValueError(f"zeroshot: head '{head}' gives {img.shape[1]}-d image features but "
                                 f"{weights.shape[1]}-d text embeddings; the encoder must project both into "
                                 "one space")
            cos = self._cosines(ctx, img, weights, cfg["batch_size"])
            self._report(ctx, out, head, cos, targets, len(classes))
            scale = 1.0 if cfg["ensemble_logits"] == "cosine" else float(ctx.encoder.logit_scale(head))
            all_logits.append(scale * cos)
        if cfg["ensemble"] and len(all_logits) >= 2:
            ens = entropy_weighted_logits(all_logits, float(cfg["ensemble_beta"]))
            self._report(ctx, out, "ensemble", ens, targets, len(classes))
        return out

    @staticmethod
    def _report(ctx, out: dict, head: str, logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
        items = classification_items(logits, targets, num_classes, ("top1", "top5", "mean_per_class_recall"))
        for k, v in classification_metrics(logits, targets, num_classes).items():
            out[f"{head}/{k}"] = v
            if k in items:
                ctx.record_items(f"{head}/{k}", items[k])

    @staticmethod
    def _cosines(ctx, img: torch.Tensor, weights: torch.Tensor, batch: int) -> torch.Tensor:
        w = weights.to(ctx.device)
        parts = [(normalize(img[i:i + batch].to(ctx.device)) @ w.T).cpu() for i in range(0, len(img), batch)]
        return torch.cat(parts)


register_task(ZeroShotTask())
