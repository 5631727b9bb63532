"""Weighted k-nearest-neighbour classification on frozen summary features (DINOv2/v3, RADIO, AMoE).

Per head: L2-normalise train and test summary vectors; for each test image take the k train images
with the highest cosine similarity; each votes for its label with weight exp(sim / T) (T = 0.07);
the class with the largest summed weight wins. top-5 ranks the classes by the same summed weights.

Ensemble (the official AMoE kNN eval, `fuse_votes_entropy_weighted`, beta = 5): where the encoder has
both teacher branches (`siglip2` and `dinov3` summaries), their class votes are fused per image:
    p_h = v_h / sum_c v_h[c];  H_h = -sum_c p_h[c] log p_h[c];  w_h = softmax_h(-beta * H_h)
    v_ens = sum_h w_h * v_h
reported as 'ensemble/top1'. A teacher has one branch, so it gets no ensemble.

Two implementations of the neighbour search:
- `knn_topk_reference`: the whole (test x train) similarity matrix in float64 on the CPU, one topk.
- `knn_topk`: streaming, on `device` (the GPU when the encoder is on one): test images in chunks of
  `test_chunk`, the train bank in chunks of `bank_chunk`, a running top-k merged chunk by chunk, so
  memory stays at test_chunk x (bank_chunk + k) similarities whatever the bank size.
Both give the same neighbours (tests check them against each other and against scikit-learn).
"""
from __future__ import annotations

import torch

from .base import TaskConfigError, normalize, percent, register_task, select_heads, unknown_keys
from .metrics import classification_items, topk_accuracy, train_test_labels


def knn_topk(test: torch.Tensor, bank: torch.Tensor, k: int, device: torch.device | str = "cpu",
             test_chunk: int = 1024, bank_chunk: int = 65536, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) of the k most similar bank rows for every test row, sorted descending.

    Inputs must already be normalised. Returned on the CPU, float32 / int64."""
    device = torch.device(device)
    k = min(k, len(bank))
    # the bank moves to the device once, chunk by chunk; on the CPU these are views, not copies
    bank_parts = [(start, bank[start:start + bank_chunk].to(device, torch.float32))
                  for start in range(0, len(bank), bank_chunk)]
    sims_out, idx_out = [], []
    starts = range(0, len(test), test_chunk)
    for start in (progress(starts, total=len(starts)) if progress else starts):
        q = test[start:start + test_chunk].to(device, torch.float32)
        best_v = torch.empty(len(q), 0, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
        for offset, part in bank_parts:
            s = q @ part.T
            top = s.topk(min(k, s.shape[1]), dim=1)
            v = torch.cat([best_v, top.values], dim=1)
            i = torch.cat([best_i, top.indices + offset], dim=1)
            merged = v.topk(min(k, v.shape[1]), dim=1)
            best_v, best_i = merged.values, i.gather(1, merged.indices)
        sims_out.append(best_v.cpu())
        idx_out.append(best_i.cpu())
    return torch.cat(sims_out), torch.cat(idx_out)


def knn_topk_reference(test: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain version: full float64 similarity matrix on the CPU (the reference for `knn_topk`)."""
    s = test.double().cpu() @ bank.double().cpu().T
    top = s.topk(min(k, len(bank)), dim=1)
    return top.values.float(), top.indices


def knn_vote(sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int, k: int,
             temperature: float) -> torch.Tensor:
    """(N, C) class scores: sum over the k nearest of exp(sim / T) for each neighbour's label."""
    w = (sims[:, :k].double() / temperature).exp()
    scores = torch.zeros(len(sims), num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, train_labels[idx[:, :k]], w)


def entropy_weighted_votes(votes: list[torch.Tensor], beta: float) -> torch.Tensor:
    """Fuse per-head (N, C) class votes: each image weighs a head by softmax(-beta * entropy) of its
    normalised votes, so the more decided head counts more (see the module docstring)."""
    ents = []
    for v in votes:
        p = (v / v.sum(dim=-1, keepdim=True).clamp_min(1e-8)).clamp_min(1e-8)
        ents.append(-(p * p.log()).sum(dim=-1))
    w = torch.softmax(-beta * torch.stack(ents, dim=-1), dim=-1)          # (N, heads)
    return sum(w[:, i:i + 1] * v for i, v in enumerate(votes))


class KNNTask:
    name = "knn"
    version = "2"   # 2: the ensemble head
    roles = ("train", "test")
    needs_patches = False
    defaults = {
        "k": [20],              # an int or a list; the first is reported as top1/top5, every k as top1@k<k>
        "temperature": 0.07,
        "heads": None,          # null: every summary head of the encoder
        "ensemble_heads": ["siglip2", "dinov3"],   # fused when all are among the heads run; [] turns it off
        "ensemble_beta": 5.0,
        "test_chunk": 1024,
        "bank_chunk": 65536,
    }

    def run(self, ctx, cfg: dict) -> dict[str, float]:
        unknown_keys(cfg, self.defaults, self.name)
        cfg = {**self.defaults, **cfg}
        ks = [cfg["k"]] if isinstance(cfg["k"], int) else list(cfg["k"])
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise TaskConfigError(f"knn: 'k' must be a positive int or a list of them, got {cfg['k']!r}")
        temperature = float(cfg["temperature"])
        if temperature <= 0:
            raise TaskConfigError("knn: 'temperature' must be > 0")
        ytr, yte, _, num_classes = train_test_labels(ctx, self.name)
        train, test = ctx.features("train"), ctx.features("test")
        heads = select_heads([h for h in ctx.encoder.heads if h in train.summary] or list(train.summary),
                             cfg["heads"], self.name, ctx.encoder.name)
        fused = list(cfg["ensemble_heads"] or [])
        if len(fused) == 1:
            raise TaskConfigError("knn: 'ensemble_heads' needs two heads or more (or [] for none)")
        fused = fused if fused and all(h in heads for h in fused) else []
        votes: dict[int, dict[str, torch.Tensor]] = {k: {} for k in ks}
        out: dict[str, float] = {}
        for head in heads:
            sims, idx = knn_topk(normalize(test.summary[head]), normalize(train.summary[head]), max(ks),
                                 device=ctx.device, test_chunk=int(cfg["test_chunk"]),
                                 bank_chunk=int(cfg["bank_chunk"]),
                                 progress=lambda it, total: ctx.progress(it, f"knn {head}", total=total))
            for k in ks:
                votes[k][head] = knn_vote(sims, idx, ytr, num_classes, k, temperature)
        for head in heads + (["ensemble"] if fused else []):
            for j, k in enumerate(ks):
                scores = votes[k][head] if head != "ensemble" else \
                    entropy_weighted_votes([votes[k][h] for h in fused], float(cfg["ensemble_beta"]))
                top1 = percent(topk_accuracy(scores, yte, 1))
                top5 = percent(topk_accuracy(scores, yte, 5))
                items = classification_items(scores, yte, num_classes)
                names = [f"@k{k}"] + ([""] if j == 0 else [])   # the first k is also reported plain
                for suffix in names:
                    out[f"{head}/top1{suffix}"], out[f"{head}/top5{suffix}"] = top1, top5
                    for metric, rows in items.items():
                        ctx.record_items(f"{head}/{metric}{suffix}", rows)
        return out


register_task(KNNTask())
