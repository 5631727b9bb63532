"""Gram anchoring: keep the VLM's patch-to-patch similarity structure close to the frozen student's.

For one image with N patch tokens, X (N, C) the VLM's vision-token features and Y (N, D) the frozen
student's, both L2-normalised per token, the Gram matrices are X X^T and Y Y^T (N, N, cosine
similarities, so the two widths need not match). The per-image loss is the mean squared difference
of the two Gram matrices (||.||_F^2 / N^2). Images differ in token count, so the loss is averaged
per image, not per element: every image weighs the same whatever its resolution.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from distill.lru import TensorLRU


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    x = F.normalize(features.float(), dim=-1)
    return x @ x.T


def gram_anchoring_loss(vlm_patches: list[torch.Tensor], anchor_patches: list[torch.Tensor]) -> torch.Tensor:
    """Mean over images of mean((G_vlm - G_anchor)^2). The anchor side carries no gradient."""
    if len(vlm_patches) != len(anchor_patches) or not vlm_patches:
        raise ValueError(f"need one anchor per image: got {len(vlm_patches)} VLM and "
                         f"{len(anchor_patches)} anchor feature sets")
    per_image = []
    for x, y in zip(vlm_patches, anchor_patches):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"token counts differ for one image: VLM {x.shape[0]} vs anchor {y.shape[0]}")
        per_image.append((gram_matrix(x) - gram_matrix(y.detach())).pow(2).mean())
    return torch.stack(per_image).mean()


def gram_weight(step: int, cfg: dict) -> float:
    """Gram anchoring weight at a step: `weight`, optionally ramped linearly from `start_step`
    over `warmup_steps` (0 = on from the start). Configured in the training config."""
    weight = float(cfg.get("weight", 0.0))
    start, warmup = int(cfg.get("start_step", 0)), int(cfg.get("warmup_steps", 0))
    if weight == 0.0 or step < start:
        return 0.0
    if warmup > 0:
        return weight * min(1.0, (step - start + 1) / warmup)
    return weight


class AnchorFeatures:
    """The frozen student's patch features per image, computed once and kept (`capacity_bytes`).

    The anchor never trains and an image's processed tensor never changes, and the student's MoE has
    no capacity limit (each token's result is independent of the batch), so an image's anchor
    features are the same at every step: recomputing them was a sixth of a Gram-anchored arm's time."""

    def __init__(self, anchor: torch.nn.Module, capacity_bytes: int = 2 ** 28):
        self.anchor = anchor
        self.store = TensorLRU(capacity_bytes)

    @torch.no_grad()
    def __call__(self, keys: Sequence[str], images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(N, C) patch features for each image, `keys[i]` naming `images[i]` (its path)."""
        feats = [self.store.lookup(k) for k in keys]
        missing = [i for i, f in enumerate(feats) if f is None]
        if missing:
            for i, o in zip(missing, self.anchor.forward_packed([images[i] for i in missing])):
                feats[i] = o.patch_features["siglino"][0]
                self.store.put(keys[i], feats[i])
        return feats
