"""Distillation losses: per-image summary / patch / register matching and relational terms (RKD, ARKD).

Conventions (paper 2512.20157, sec. "token-balanced batching" and "ARKD"):

* Every per-image term is a squared L2 distance between a student output and a (PHI-S standardised)
  teacher target. The patch term of image q is normalised by that image's own token count,
  ``1/N_q * sum_w ||z_w - z_hat_w||^2``, so a 768 px image weighs exactly as much as a 256 px one.
* Per-image terms are averaged over *all images of all ranks*: ``sum over local images / B_global``
  where ``B_global`` is all-reduced. The trainer multiplies the local backward loss by the world size
  because DDP / FSDP average gradients over ranks; see ``GlobalBatch``.
* Relational terms compare pairwise distances of summary vectors over the *global* batch
  (summaries gathered from every rank with an autograd-aware gather).

The channel reduction of the squared distance is configurable: ``"sum"`` is the paper's ||.||^2;
``"mean"`` divides by the width (keeps magnitudes comparable across teacher widths).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

RELATIONAL_KINDS = ("none", "rkd", "arkd")


# ----------------------------------------------------------------------------- per-image terms
def _sq_dist(a: torch.Tensor, b: torch.Tensor, channel_reduction: str) -> torch.Tensor:
    d = (a.float() - b.float()).pow(2)
    if channel_reduction == "sum":
        return d.sum(-1)
    if channel_reduction == "mean":
        return d.mean(-1)
    raise ValueError(f"channel_reduction must be 'sum' or 'mean', got {channel_reduction!r}")


def summary_loss(student: torch.Tensor, teacher: torch.Tensor,
                 channel_reduction: str = "sum") -> torch.Tensor:
    """(N, C) student summaries vs (N, C) teacher summaries -> (N,) per-image losses."""
    if student.shape != teacher.shape:
        raise ValueError(f"summary shapes differ: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}")
    return _sq_dist(student, teacher, channel_reduction)


def patch_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
               channel_reduction: str = "sum") -> torch.Tensor:
    """Lists of (N_q, C) patch tokens -> (N,) per-image losses, each normalised by its own N_q."""
    if len(student) != len(teacher):
        raise ValueError(f"patch lists differ in length: {len(student)} vs {len(teacher)}")
    out = []
    for q, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"image {q}: student patches {tuple(s.shape)} vs teacher "
                             f"{tuple(t.shape)}; align the teacher grid first (align_patch_grid)")
        out.append(_sq_dist(s, t, channel_reduction).mean())
    if not out:
        return torch.zeros(0)
    return torch.stack(out)


def register_loss(student: torch.Tensor, teacher: torch.Tensor,
                  channel_reduction: str = "sum") -> torch.Tensor:
    """(N, R, C) register outputs vs teacher registers -> (N,) per-image mean over the R registers."""
    if student.shape != teacher.shape:
        raise ValueError(f"register shapes differ: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}")
    return _sq_dist(student, teacher, channel_reduction).mean(-1)


def align_patch_grid(teacher_patches: torch.Tensor, teacher_grid: tuple[int, int],
                     student_grid: tuple[int, int]) -> torch.Tensor:
    """Resample a teacher's (h_t*w_t, C) patch map onto the student's (h_s, w_s) grid.

    Same grid: returned unchanged. Along an axis that shrinks, each student cell takes the average of
    the teacher cells it covers ("area", i.e. adaptive average pooling); along an axis that grows,
    bilinear interpolation (align_corners=False). Both are affine with weights summing to 1, so
    aligning before or after PHI-S standardisation gives the same targets.
    """
    ht, wt = teacher_grid
    hs, ws = student_grid
    if teacher_patches.shape[0] != ht * wt:
        raise ValueError(f"teacher patches have {teacher_patches.shape[0]} tokens but grid "
                         f"{ht}x{wt} = {ht * wt}")
    if (ht, wt) == (hs, ws):
        return teacher_patches
    c = teacher_patches.shape[1]
    fmap = teacher_patches.float().T.reshape(1, c, ht, wt)
    mid = (min(ht, hs), min(wt, ws))
    if mid != (ht, wt):
        fmap = F.adaptive_avg_pool2d(fmap, mid)
    if mid != (hs, ws):
        fmap = F.interpolate(fmap, size=(hs, ws), mode="bilinear", align_corners=False)
    return fmap.reshape(c, hs * ws).T.to(teacher_patches.dtype)


# ----------------------------------------------------------------------------- relational terms
def pairwise_normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, B) Euclidean distances divided by their mean non-zero off-diagonal value."""
    x = x.float()
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    b = d.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=d.device)
    vals = d[off]
    nz = vals[vals > 0]
    scale = nz.mean() if nz.numel() else torch.ones((), device=d.device)
    return d / scale.clamp_min(1e-12)


def _off_diagonal(b: int, device) -> torch.Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def _distance_pair(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised distance matrices of the student (with grad) and the teacher (a fixed target)."""
    ds = pairwise_normalised_distances(student)
    with torch.no_grad():
        dt = pairwise_normalised_distances(teacher)
    return ds, dt


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Symmetric RKD (Park et al. 2019): smooth-L1 between normalised distance matrices,
    averaged over the B(B-1) off-diagonal pairs."""
    b = student.shape[0]
    if b < 2:
        return student.sum() * 0.0
    ds, dt = _distance_pair(student, teacher)
    off = _off_diagonal(b, ds.device)
    return F.smooth_l1_loss(ds[off], dt[off], reduction="sum", beta=beta) / (b * (b - 1))


def teacher_median(dt: torch.Tensor) -> torch.Tensor:
    """Median of the off-diagonal normalised teacher distances (average of the two middle values
    for an even count; as every pair appears twice this is the median over unordered pairs)."""
    b = dt.shape[0]
    iu = torch.triu_indices(b, b, offset=1, device=dt.device)
    return torch.quantile(dt[iu[0], iu[1]], 0.5)


def arkd_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Asymmetric RKD: pairs the teacher puts close (D_t < median m) are only pulled together
    (shrink = max(D_s - D_t, 0)); pairs at or beyond the median are only pushed apart
    (expand = max(D_t - D_s, 0)). Smooth-L1 of the one-sided error, averaged over B(B-1) pairs."""
    b = student.shape[0]
    if b < 2:
        return student.sum() * 0.0
    ds, dt = _distance_pair(student, teacher)
    with torch.no_grad():
        w_shrink = (dt < teacher_median(dt)).float()
        w_expand = 1.0 - w_shrink
    shrink = (ds - dt).clamp_min(0)
    expand = (dt - ds).clamp_min(0)
    zeros = torch.zeros_like(ds)
    h_shrink = F.smooth_l1_loss(shrink, zeros, reduction="none", beta=beta)
    h_expand = F.smooth_l1_loss(expand, zeros, reduction="none", beta=beta)
    per_pair = w_shrink * h_shrink + w_expand * h_expand
    off = _off_diagonal(b, ds.device)
    return per_pair[off].sum() / (b * (b - 1))


def relational_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor,
                    beta: float = 1.0) -> torch.Tensor:
    if kind == "rkd":
        return rkd_distance_loss(student, teacher, beta)
    if kind == "arkd":
        return arkd_loss(student, teacher, beta)
    if kind == "none":
        return student.sum() * 0.0
    raise ValueError(f"relational loss must be one of {RELATIONAL_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------- global batch
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Implemented with all_reduce (supported by gloo, NCCL, ...) rather than reduce_scatter/all_to_all,
    which gloo lacks on some versions.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_variable_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate (n_r, C) tensors of every rank (n_r may differ) in rank order, keeping gradients
    to the local rows. Rows are padded to the largest n_r for the collective and dropped after."""
    if not distributed_ready():
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, n, group=group)
    counts = [int(c.item()) for c in counts]
    top = max(counts)
    padded = torch.cat([x, x.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))]) if top > x.shape[0] else x
    full = _GatherWithGrad.apply(padded, group)
    pieces = [full[r * top:r * top + c] for r, c in enumerate(counts)]
    return torch.cat(pieces)


@dataclass
class GlobalBatch:
    """How local per-image sums become the global mean and how the backward loss is scaled."""

    global_images: int
    world_size: int

    @staticmethod
    def from_local(local_images: int, device) -> "GlobalBatch":
        if distributed_ready():
            t = torch.tensor([local_images], dtype=torch.long, device=device)
            dist.all_reduce(t)
            return GlobalBatch(int(t.item()), dist.get_world_size())
        return GlobalBatch(local_images, 1)

    def mean(self, per_image: torch.Tensor) -> torch.Tensor:
        """Local contribution to the global mean: sum(local) / B_global (sums to the mean over ranks)."""
        return per_image.sum() / max(self.global_images, 1)


# ----------------------------------------------------------------------------- per-teacher config
@dataclass
class TeacherLossWeights:
    weight: float = 1.0            # multiplies the whole teacher's loss
    summary: float = 1.0
    patch: float = 1.0
    register: float = 0.0          # > 0 only for teachers with registers (DINOv3)
    relational: str = "arkd"       # none | rkd | arkd
    relational_weight: float = 1.0
    smooth_l1_beta: float = 1.0


@dataclass
class TeacherTargets:
    """One teacher's (standardised) targets for the local images, already on the student grid."""

    summary: torch.Tensor                      # (N, C)
    patches: list[torch.Tensor]                # N x (N_q, C)
    registers: torch.Tensor | None = None      # (N, R, C)


@dataclass
class StudentPredictions:
    summary: torch.Tensor                      # (N, C)
    patches: list[torch.Tensor]                # N x (N_q, C)
    registers: torch.Tensor | None = None      # (N, R, C)


def teacher_loss(pred: StudentPredictions, target: TeacherTargets, w: TeacherLossWeights,
                 batch: GlobalBatch, channel_reduction: str = "sum",
                 gathered: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one teacher on this rank's images.

    Returns (backward_loss, terms). ``terms`` holds the *local contributions* to each global term
    (sum over local images / B_global for per-image terms, already global for relational); all-reduce
    them (SUM) to log the global values. ``backward_loss`` is scaled so that DDP's gradient averaging
    yields the gradient of the global loss: per-image terms x world_size, relational terms x 1 (their
    gradient already arrives summed over ranks through the gather).
    """
    terms: dict[str, torch.Tensor] = {}
    terms["summary"] = batch.mean(summary_loss(pred.summary, target.summary, channel_reduction))
    terms["patch"] = batch.mean(patch_loss(pred.patches, target.patches, channel_reduction)) \
        if pred.patches else pred.summary.sum() * 0.0
    if w.register > 0:
        if pred.registers is None or target.registers is None:
            raise ValueError("register loss requested but the student or teacher has no registers")
        terms["register"] = batch.mean(register_loss(pred.registers, target.registers, channel_reduction))
    per_image = w.summary * terms["summary"] + w.patch * terms["patch"] + \
        (w.register * terms["register"] if "register" in terms else 0.0)
    backward = per_image * batch.world_size
    if w.relational != "none" and w.relational_weight > 0:
        s_all, t_all = gathered if gathered is not None else (pred.summary, target.summary)
        rel = relational_loss(w.relational, s_all, t_all, w.smooth_l1_beta)
        # every rank computes the same global value: log 1/world of it so a SUM all-reduce gives it back
        terms[w.relational] = rel.detach() / batch.world_size
        backward = backward + w.relational_weight * rel
    return w.weight * backward, {k: v.detach() for k, v in terms.items()}
