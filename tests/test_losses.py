"""Distillation losses against hand-computed values (per-image normalisation, RKD, ARKD median gate)."""
from __future__ import annotations

import math

import pytest
import torch

from distill import losses as L


def test_summary_loss_sum_and_mean_reduction():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert L.summary_loss(s, t, "sum").tolist() == [5.0, 25.0]
    assert L.summary_loss(s, t, "mean").tolist() == [2.5, 12.5]
    with pytest.raises(ValueError, match="summary shapes differ"):
        L.summary_loss(s, t[:, :1])


def test_patch_loss_normalised_per_image_mixed_resolutions():
    # image A: 4 tokens (2x2 grid), each off by 1 in one channel -> 1/4 * 4 * 1 = 1
    # image B: 16 tokens (4x4 grid), 4 of them off by 1 -> 1/16 * 4 = 0.25
    sa, ta = torch.zeros(4, 3), torch.zeros(4, 3)
    sa[:, 0] = 1.0
    sb, tb = torch.zeros(16, 3), torch.zeros(16, 3)
    sb[:4, 2] = 1.0
    per_image = L.patch_loss([sa, sb], [ta, tb])
    assert per_image.tolist() == [1.0, 0.25]
    # each image weighs the same in the global mean regardless of its token count
    batch = L.GlobalBatch(global_images=2, world_size=1)
    assert batch.mean(per_image).item() == pytest.approx(0.625)
    # a token-weighted mean would give (4 + 4) / 20 = 0.4: make sure we are not computing that
    assert batch.mean(per_image).item() != pytest.approx(0.4)


def test_register_loss_mean_over_registers():
    s = torch.zeros(1, 2, 2)
    t = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])   # squared norms 2 and 4 -> mean 3
    assert L.register_loss(s, t).tolist() == [3.0]


def test_normalised_distances_divide_by_mean_nonzero():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    d = L.pairwise_normalised_distances(x)
    # raw off-diagonal distances 1, 3, 2 -> mean 2
    assert d[0, 1].item() == pytest.approx(0.5)
    assert d[0, 2].item() == pytest.approx(1.5)
    assert d[1, 2].item() == pytest.approx(1.0)
    assert torch.diagonal(d).abs().max().item() == 0.0


def test_arkd_median_gate_hand_computed():
    # teacher normalised distances: (0,1)=0.5, (0,2)=1.5, (1,2)=1.0 ; median m = 1.0
    t = torch.tensor([[0.0], [1.0], [3.0]])
    assert L.teacher_median(L.pairwise_normalised_distances(t)).item() == pytest.approx(1.0)
    # student normalised distances: (0,1)=1.0, (0,2)=1.5, (1,2)=0.5
    s = torch.tensor([[0.0], [2.0], [3.0]], requires_grad=True)
    # (0,1): Dt 0.5 < m -> shrink max(1.0-0.5,0)=0.5 -> smooth-L1 0.125
    # (0,2): Dt 1.5 >= m -> expand max(1.5-1.5,0)=0
    # (1,2): Dt 1.0 >= m (the median itself expands) -> expand max(1.0-0.5,0)=0.5 -> 0.125
    # ordered pairs: 2 * 0.25 = 0.5 over B(B-1) = 6
    loss = L.arkd_loss(s, t)
    assert loss.item() == pytest.approx(0.5 / 6)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_arkd_one_sided_vs_rkd_symmetric():
    # teacher as above; student pulls the close pair closer and pushes the far pairs further:
    # student normalised (0,1)=0.25, (0,2)=1.5, (1,2)=1.25 -> every error is in the allowed direction
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [0.5], [3.0]])
    assert L.arkd_loss(s, t).item() == pytest.approx(0.0, abs=1e-7)
    # symmetric RKD penalises both 0.25 errors: 2 * 2 * 0.5 * 0.25^2 / 6
    assert L.rkd_distance_loss(s, t).item() == pytest.approx(4 * 0.5 * 0.0625 / 6)


def test_smooth_l1_linear_region_and_beta():
    # 2 points: normalised distances are always 1 -> zero loss; use 4 points for a large error
    t = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    s = torch.tensor([[0.0], [0.01], [0.02], [30.0]])
    ds = L.pairwise_normalised_distances(s)
    dt = L.pairwise_normalised_distances(t)
    off = ~torch.eye(4, dtype=torch.bool)
    diff = (ds - dt)[off]
    ref = torch.where(diff.abs() < 1, 0.5 * diff ** 2, diff.abs() - 0.5).sum() / 12
    assert L.rkd_distance_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert (diff.abs() > 1).any()   # the linear branch is exercised


def test_relational_needs_two_images_and_rejects_unknown_kind():
    x = torch.zeros(1, 4, requires_grad=True)
    assert L.arkd_loss(x, x).item() == 0.0
    with pytest.raises(ValueError, match="relational loss must be one of"):
        L.relational_loss("contrastive", x, x)


def test_align_patch_grid_identity_area_and_upsample():
    x = torch.arange(16.0).reshape(16, 1)          # 4x4 grid, one channel
    assert L.align_patch_grid(x, (4, 4), (4, 4)) is x
    down = L.align_patch_grid(x, (4, 4), (2, 2))
    # shrinking averages each 2x2 block (area)
    ref = x.reshape(4, 4).unfold(0, 2, 2).unfold(1, 2, 2).mean((-1, -2)).reshape(4, 1)
    assert torch.allclose(down, ref, atol=1e-5)
    up = L.align_patch_grid(torch.ones(4, 3), (2, 2), (3, 5))
    assert up.shape == (15, 3) and torch.allclose(up, torch.ones(15, 3))
    with pytest.raises(ValueError, match="grid"):
        L.align_patch_grid(x, (3, 3), (2, 2))


def test_teacher_loss_combines_terms_with_weights():
    pred = L.StudentPredictions(summary=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                                patches=[torch.ones(4, 2), torch.zeros(16, 2)],
                                registers=torch.zeros(2, 1, 2))
    tgt = L.TeacherTargets(summary=torch.zeros(2, 2), patches=[torch.zeros(4, 2), torch.zeros(16, 2)],
                           registers=torch.ones(2, 1, 2))
    w = L.TeacherLossWeights(weight=2.0, summary=1.0, patch=0.5, register=0.25, relational="none")
    total, terms = L.teacher_loss(pred, tgt, w, L.GlobalBatch(2, 1))
    assert terms["summary"].item() == pytest.approx(0.5)     # (1 + 0) / 2
    assert terms["patch"].item() == pytest.approx(1.0)       # (2 + 0) / 2
    assert terms["register"].item() == pytest.approx(2.0)    # (2 + 2) / 2
    assert total.item() == pytest.approx(2.0 * (0.5 + 0.5 * 1.0 + 0.25 * 2.0))
    assert math.isfinite(total.item())
