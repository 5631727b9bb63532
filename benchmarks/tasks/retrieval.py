"""Image-text retrieval (COCO 5k / Flickr30k Karpathy test) with every caption of every image.

Per text head: L2-normalised image summary features and caption embeddings; similarity = cosine.
image -> text: a query image is a hit at k if any of its own captions is among the k most similar
captions. text -> image: a caption is a hit at k if its image is among the k most similar images.
Metrics (percent): i2t_r1/5/10 and t2i_r1/5/10 per head ('head/t2i_r1'...). With fewer candidates
than k, k is capped at the number of candidates.

Ensemble of >= 2 text heads (as the official AMoE eval fuses its SigLIP2 and dino.txt branches): the
entropy-weighted fusion of zero-shot (beta 5, raw cosines) applied to the image x caption similarity
matrices, the softmax taken over the captions of each image; both directions rank the fused matrix
('ensemble/t2i_r1'...).
"""
from __future__ import annotations

import torch

from distill.stats import ItemScores, hits

from .base import TaskConfigError, normalize, percent, register_task, select_heads, unknown_keys


def first_hit_ranks(sim: torch.Tensor, positives: torch.Tensor, kmax: int, chunk: int = 4096,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(Q,) rank (0-based) of each query's first positive among its top-kmax candidates; kmax if none."""
    kmax = min(kmax, sim.shape[1])
    out = []
    for start in range(0, len(sim), chunk):
        s = sim[start:start + chunk].to(device)
        top = s.topk(kmax, dim=1).indices
        pos = positives[start:start + chunk].to(device).gather(1, top)     # (q, kmax): is rank r a positive?
        out.append(torch.where(pos.any(1), pos.float().argmax(1),
                               torch.full_like(pos[:, 0], kmax, dtype=torch.long)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks: list[int], chunk: int = 4096,
                device: torch.device | str = "cpu") -> dict[int, float]:
    """sim: (Q, N) query x candidate scores; positives: (Q, N) bool. Share of queries with a positive
    among their top-k candidates, for every k (k capped at N)."""
    first = first_hit_ranks(sim, positives, max(ks), chunk, device)
    return {k: float((first < min(k, sim.shape[1])).float().mean()) for k in ks}


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks=(1, 5, 10),
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """img (N, D), txt (M, D) normalised; owner[j] = index of the image caption j describes."""
    return similarity_metrics(img.to(device) @ txt.to(device).T, owner, ks, device)


def similarity_metrics(sim: torch.Tensor, owner: torch.Tensor, ks=(1, 5, 10),
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """Recall@k both ways from an (N images, M captions) similarity matrix."""
    return similarity_scores(sim, owner, ks, device)[0]


def similarity_scores(sim: torch.Tensor, owner: torch.Tensor, ks=(1, 5, 10),
                      device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, ItemScores]]:
    """(metrics, per-query hits): i2t items are the images, t2i items the captions."""
    ks = list(ks)
    sim = sim.to(device)
    pos = owner.to(device).view(1, -1) == torch.arange(len(sim), device=device).view(-1, 1)
    metrics, items = {}, {}
    for name, s, p in (("i2t", sim, pos), ("t2i", sim.T.contiguous(), pos.T.contiguous())):
        first = first_hit_ranks(s, p, max(ks), device=device)
        for k in ks:
            hit = (first < min(k, s.shape[1])).double()
            metrics[f"{name}_r{k}"] = percent(hit.mean()) if len(hit) else float("nan")
            items[f"{name}_r{k}"] = hits(hit.numpy())
    order = [f"i2t_r{k}" for k in ks] + [f"t2i_r{k}" for k in ks]
    return {k: metrics[k] for k in order}, items


class RetrievalTask:
    name = "retrieval"
    version = "2"
    roles = ("test",)
    needs_patches = False
    defaults = {"ks": [1, 5, 10], "heads": None, "ensemble": True, "ensemble_beta": 5.0}

    def run(self, ctx, cfg: dict) -> dict[str, float]:
        unknown_keys(cfg, self.defaults, self.name)
        cfg = {**self.defaults, **cfg}
        ks = list(cfg["ks"])
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise TaskConfigError(f"retrieval: 'ks' must be a list of positive ints, got {cfg['ks']!r}")
        ds = ctx.dataset("test")
        captions = getattr(ds, "captions", None)
        if captions is None:
            raise TaskConfigError(f"retrieval: dataset '{ctx.dataset_cfg.get('id')}' has no captions; use a "
                                  "retrieval reader (karpathy, coco_karpathy, flickr30k_karpathy)")
        empty = [i for i, c in enumerate(captions) if not c]
        if empty:
            raise ValueError(f"retrieval: {len(empty)} image(s) have no caption (first index {empty[0]}); "
                             "every image needs at least one to be an image->text query")
        texts = [t for caps in captions for t in caps]
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        feats = ctx.features("test")
        if len(feats) != len(captions):
            raise ValueError(f"retrieval: {len(feats)} image features but {len(captions)} caption lists")
        heads = select_heads([h for h in ctx.encoder.text_heads if h in feats.summary], cfg["heads"],
                             self.name, ctx.encoder.name, "text tower")
        out: dict[str, float] = {}
        sims = []
        for head in heads:
            txt = normalize(ctx.text_features(texts, head))
            img = normalize(feats.summary[head])
            if img.shape[1] != txt.shape[1]:
                raise ValueError(f"retrieval: head '{head}' gives {img.shape[1]}-d image features but "
                                 f"{txt.shape[1]}-d text embeddings")
            sims.append((img.to(ctx.device) @ txt.to(ctx.device).T).cpu())
            _record(ctx, out, head, *similarity_scores(sims[-1], owner, ks, device=ctx.device))
        if cfg["ensemble"] and len(sims) >= 2:
            from .zeroshot import entropy_weighted_logits
            rows = 1024   # images per fusion chunk: bounds the float64 softmax's memory
            fused = torch.cat([entropy_weighted_logits([s[i:i + rows] for s in sims], float(cfg["ensemble_beta"]))
                               for i in range(0, len(sims[0]), rows)])
            _record(ctx, out, "ensemble", *similarity_scores(fused, owner, ks, device=ctx.device))
        return out


def _record(ctx, out: dict, head: str, metrics: dict, items: dict) -> None:
    for k, v in metrics.items():
        out[f"{head}/{k}"] = v
        ctx.record_items(f"{head}/{k}", items[k])


register_task(RetrievalTask())
