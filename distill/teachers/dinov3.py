"""The mini-world DINOv3 teacher: HF `DINOv3ViTModel` (RoPE, 4 registers) trained self-supervised.

Objective (DINO + iBOT with a masked-pixel term), all label-free, on the pool images (and the
world's pretraining set, recipe key `use_pretrain`):
- DINO: the student's CLS on every crop (2 global + local crops) predicts the momentum teacher's
  centred, sharpened prototype distribution of the *other* global crops;
- iBOT: on the student's global crops a random subset of patches is replaced by the mask token; each
  masked patch predicts the teacher's prototype distribution of the same, unmasked, patch;
- pixels: each masked patch also regresses its own per-patch-normalised pixels through a linear head
  (MAE's target). On a CPU budget of minutes this dense term is what makes the patch features carry
  shape layout quickly; the self-distillation terms make them invariant to crops and colour jitter.
- dense (box) term: every patch of the student's global crops classifies the shape and the colour of
  the pool object whose box covers the patch centre (or background), from the pool's own metadata
  (`objects[].bbox/shape/colour`). This weak dense supervision is what a CPU budget of minutes needs
  for patch features that carry object layout; without it (`dense_weight` 0) the SSL terms alone
  left both the kNN and the segmentation probe near chance after ~10 CPU-minutes (measured, see
  docs/teachers.md).
- presence term (`presence_weight`): the student's CLS on each global crop predicts which shapes and
  colours the crop's patch labels hold, each weighed by its patch count with `presence_by_area` (the
  same weak supervision the SigLIP2 teacher uses); with whole-image views it is what taught this
  teacher some shape (docs/teachers.md).
The saved backbone is the student's or the momentum teacher's, as the recipe's `save` says.
"""
from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from tqdm.auto import tqdm
from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

from distill.train.guard import StepGuard, require_finite

from distill.train.schedule import warmup_cosine
from distill.train.optim import build_adamw

from .common import LoopCheckpoints, Ranks, StepForward, optimizer_step, presence_cross_entropy
from .data import WorldData, object_vocab
from .probe import check_roundtrip, probe_outputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_model(r: dict) -> DINOv3ViTModel:
    config = DINOv3ViTConfig(patch_size=r["patch_size"], hidden_size=r["hidden_size"],
                             intermediate_size=r["intermediate_size"], num_hidden_layers=r["num_hidden_layers"],
                             num_attention_heads=r["num_attention_heads"],
                             num_register_tokens=r["num_register_tokens"], image_size=r["image_size"],
                             initializer_range=r["initializer_range"])
    return DINOv3ViTModel(config)


def image_processor(r: dict) -> DINOv3ViTImageProcessor:
    return DINOv3ViTImageProcessor(size={"height": r["image_size"], "width": r["image_size"]},
                                   image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


class ProjectionHead(nn.Module):
    """DINO head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class SSLModel(nn.Module):
    def __init__(self, r: dict):
        super().__init__()
        self.backbone = build_model(r)
        h = r["hidden_size"]
        self.dino_head = ProjectionHead(h, r["head_hidden"], r["head_bottleneck"], r["prototypes"])
        self.ibot_head = ProjectionHead(h, r["head_hidden"], r["head_bottleneck"], r["prototypes"])
        self.pixel_head = nn.Linear(h, 3 * r["patch_size"] ** 2)
        self.shape_head = nn.Linear(h, r["dense_classes"][0] + 1)   # + background
        self.colour_head = nn.Linear(h, r["dense_classes"][1] + 1)
        self.presence_head = nn.Linear(h, sum(r["dense_classes"]))  # which shapes and colours a crop holds
        self.skip = 1 + r["num_register_tokens"]  # [CLS, registers, patches]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        hidden = self.backbone(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        return hidden[:, 0], hidden[:, self.skip:]


def load_images(samples: list, side: int, progress: bool, vocab=None) -> list[torch.Tensor]:
    """Images as uint8 CHW tensors, shorter side at most `side`, with two extra channels:
    the per-pixel shape id and colour id (1-based, 0 = background) painted from the object boxes,
    larger boxes first so a smaller object on top keeps its pixels. Crops cut all five together."""
    shapes, colours = vocab or ([], [])
    out = []
    for s in tqdm(samples, desc="dinov3 load images", disable=not progress, leave=False):
        w, h = s.image.size
        k = min(1.0, side / min(w, h))   # never up: every crop is resized to its view's size anyway
        W, H = max(1, round(w * k)), max(1, round(h * k))
        img = TF.pil_to_tensor(s.image if k == 1.0 else s.image.resize((W, H)))
        labels = torch.zeros(2, H, W, dtype=torch.uint8)
        objs = sorted(s.metadata.get("objects", []), key=lambda o: -o["bbox"][2] * o["bbox"][3])
        for o in objs:
            if o.get("shape") not in shapes or o.get("colour") not in colours:
                continue
            x, y, bw, bh = o["bbox"]  # COCO xywh in original pixels
            x0, y0 = int(x * W / w), int(y * H / h)
            x1, y1 = max(x0 + 1, int((x + bw) * W / w)), max(y0 + 1, int((y + bh) * H / h))
            labels[0, y0:y1, x0:x1] = shapes.index(o["shape"]) + 1
            labels[1, y0:y1, x0:x1] = colours.index(o["colour"]) + 1
        out.append(torch.cat([img, labels]))
    return out


def random_crop(img: torch.Tensor, size: int, scale: tuple[float, float], r: dict, rng: random.Random):
    """RandomResizedCrop + flip + brightness jitter + optional grayscale, as float in [0, 1]."""
    _, H, W = img.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= W and 0 < h <= H:
            break
    else:
        w, h = min(W, H), min(W, H)
    top, left = rng.randint(0, H - h), rng.randint(0, W - w)
    p = r["patch_size"]
    # label channels: nearest sample at each patch centre of the output crop
    labels = TF.resized_crop(img[3:], top, left, h, w, [size // p, size // p],
                             interpolation=TF.InterpolationMode.NEAREST).long()
    crop = TF.resized_crop(img[:3], top, left, h, w, [size, size], antialias=True).float() / 255.0
    if rng.random() < 0.5:
        crop, labels = crop.flip(-1), labels.flip(-1)
    if r["brightness_jitter"]:
        crop = crop * (1 + rng.uniform(-r["brightness_jitter"], r["brightness_jitter"]))
    if r["hue_jitter"]:
        crop = TF.adjust_hue(crop.clamp(0, 1), rng.uniform(-r["hue_jitter"], r["hue_jitter"]))
    if rng.random() < r["grayscale_prob"]:
        crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
    return crop.clamp(0, 1), labels


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def patch_targets(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3*p*p) pixels, each patch normalised to zero mean / unit variance (MAE)."""
    t = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


def random_masks(n: int, tokens: int, r: dict, rng: random.Random) -> torch.Tensor:
    mask = torch.zeros(n, tokens, dtype=torch.bool)
    for i in range(n):
        if rng.random() < r["mask_prob"]:
            k = max(1, round(tokens * rng.uniform(*r["mask_ratio"])))
            mask[i, rng.sample(range(tokens), k)] = True
    return mask


def _student_views(m: SSLModel, g_in: torch.Tensor, mask: torch.Tensor, l_in: torch.Tensor | None,
                   masked: bool, dense: bool, presence: bool):
    """Everything of one step the trained network computes: DINO logits of every view (global crops
    first), on the global crops' patches the iBOT logits and pixel predictions of the masked ones
    (when any patch of the global batch is masked) and the dense shape / colour logits, and on the
    global crops' CLS the presence logits."""
    s_cls, s_patch = m(g_in, mask)
    views = [m.dino_head(s_cls)]
    if l_in is not None:
        l_cls, _ = m(l_in)
        views.append(m.dino_head(l_cls))
    ibot = m.ibot_head(s_patch[mask]) if masked else None
    pixels = m.pixel_head(s_patch[mask]) if masked else None
    dense_logits = (m.shape_head(s_patch), m.colour_head(s_patch)) if dense else None
    presence_logits = m.presence_head(s_cls) if presence else None
    return torch.cat(views), ibot, pixels, dense_logits, presence_logits


def presence_targets(labels: torch.Tensor, classes: tuple[int, int], by_area: bool = False) -> torch.Tensor:
    """(B, 2, tokens) per-patch shape / colour ids (0 = background) -> (B, shapes + colours): multi-hot
    of the ids present anywhere in the crop, or with `by_area` the number of patches each covers."""
    hot = [F.one_hot(labels[:, k], n + 1)[:, :, 1:] for k, n in enumerate(classes)]   # (B, tokens, n) each
    return torch.cat([h.sum(1) if by_area else h.amax(1) for h in hot], 1).float()


def train(data: WorldData, r: dict, out_dir: Path, seed: int, progress: bool = True,
          checkpoints: LoopCheckpoints | None = None, ranks: Ranks | None = None) -> dict:
    """Train the teacher (and its dino.txt head) and save it to `out_dir` (main rank); returns its log.
    Under a torchrun group (`ranks`) each rank computes its block of every global batch (see `Ranks`)."""
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    samples = data.images(use_pretrain=r["use_pretrain"])
    vocab = object_vocab([o for s in samples for o in s.metadata.get("objects", [])])
    images = load_images(samples, r["load_side"], progress, vocab)
    t_data = time.perf_counter() - t0

    student = SSLModel({**r, "dense_classes": (len(vocab[0]), len(vocab[1]))})
    teacher = copy.deepcopy(student).requires_grad_(False)
    dim = r["prototypes"]
    center_cls = torch.zeros(dim)
    center_patch = torch.zeros(dim)
    opt = build_adamw(student.named_parameters(), r["lr"], r["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, r["steps"], r["warmup_steps"]))
    guard = StepGuard()
    checkpoints = checkpoints or LoopCheckpoints(None, "", 1)
    parts = {"student": student, "teacher": teacher, "center_cls": center_cls, "center_patch": center_patch}
    start, loop = checkpoints.restore(parts, opt, sched, guard, rng)
    p, g_tokens = r["patch_size"], (r["global_size"] // r["patch_size"]) ** 2
    bs = min(r["batch_size"], len(images))
    mine = ranks.block(bs, "dinov3")
    n = mine.stop - mine.start                                   # this rank's samples of a global batch
    views = ranks.wrap(StepForward(student, _student_views))
    ts, tt = r["student_temp"], r["teacher_temp"]
    log = loop.get("log", {"loss": [], "dino": [], "ibot": [], "pixel": [], "dense": [], "presence": []})
    order: list[int] = loop.get("order", [])
    bar = tqdm(range(start, r["steps"]), desc="dinov3 train", disable=not progress, initial=start, total=r["steps"])
    for step in bar:
        if len(order) < bs:
            order += rng.sample(range(len(images)), len(images))
        idx, order = order[:bs], order[bs:]
        # the whole global batch's crops and masks from the one seeded stream, then this rank's rows:
        # crop v of sample i sits at row v * bs + i
        g_crops = [random_crop(images[i], r["global_size"], r["global_scale"], r, rng) for _ in range(2) for i in idx]
        l_crops = [random_crop(images[i], r["local_size"], r["local_scale"], r, rng)[0]
                   for _ in range(r["local_crops"]) for i in idx]
        mask = random_masks(2 * bs, g_tokens, r, rng)
        masked_total = int(mask.sum())
        g_rows = [v * bs + i for v in range(2) for i in range(mine.start, mine.stop)]
        l_rows = [v * bs + i for v in range(r["local_crops"]) for i in range(mine.start, mine.stop)]
        globals_ = torch.stack([g_crops[j][0] for j in g_rows])                       # (2n, 3, g, g)
        g_labels = torch.stack([g_crops[j][1] for j in g_rows]).flatten(2)            # (2n, 2, tokens)
        locals_ = [l_crops[j] for j in l_rows]
        mask = mask[g_rows]
        g_in = normalise(globals_)

        with torch.no_grad():
            t_cls, t_patch = teacher(g_in)
            t_cls_logits = teacher.dino_head(t_cls)
            t_cls_p = F.softmax((t_cls_logits - center_cls) / tt, dim=-1)
            t_patch_logits = teacher.ibot_head(t_patch[mask]) if masked_total else None

        s_all, s_ibot, s_pixels, dense_logits, presence_logits = views(
            g_in, mask, normalise(torch.stack(locals_)) if locals_ else None, masked_total > 0,
            bool(r["dense_weight"]), bool(r["presence_weight"]))
        # DINO: every student view (2n + Ln rows) against each teacher global view except its own
        t_views = t_cls_p.view(2, n, -1)
        s_logp = F.log_softmax(s_all / ts, dim=-1)
        n_views = s_all.shape[0] // n
        dino, terms = 0.0, 0
        for tv in range(2):
            for sv in range(n_views):
                if sv == tv:
                    continue
                dino = dino + -(t_views[tv] * s_logp[sv * n:(sv + 1) * n]).sum(-1).mean()
                terms += 1
        dino = dino / terms
        if t_patch_logits is not None:    # means over the masked patches of the whole global batch
            t_patch_p = F.softmax((t_patch_logits - center_patch) / tt, dim=-1)
            ibot = ranks.masked_mean(-(t_patch_p * F.log_softmax(s_ibot / ts, dim=-1)).sum(-1), masked_total)
            target = patch_targets(globals_, p)[mask]
            pixel = F.mse_loss(s_pixels, target) if not ranks.distributed else \
                ranks.masked_mean((s_pixels - target) ** 2, masked_total)
        else:
            ibot = pixel = torch.zeros(())
        if dense_logits is not None:
            dense = (F.cross_entropy(dense_logits[0].flatten(0, 1), g_labels[:, 0].flatten())
                     + F.cross_entropy(dense_logits[1].flatten(0, 1), g_labels[:, 1].flatten())) / 2
        else:
            dense = torch.zeros(())
        presence = torch.zeros(()) if presence_logits is None else presence_cross_entropy(
            presence_logits, presence_targets(g_labels, (len(vocab[0]), len(vocab[1])), r["presence_by_area"]),
            len(vocab[0])).mean()
        loss = (r["dino_weight"] * dino + r["ibot_weight"] * ibot + r["pixel_weight"] * pixel
                + r["dense_weight"] * dense + r["presence_weight"] * presence)
        optimizer_step(opt, sched, loss, student.parameters(), 3.0, guard, "DINOv3 teacher", ranks)
        with torch.no_grad():
            m = r["ema"][1] - (r["ema"][1] - r["ema"][0]) * (math.cos(math.pi * step / r["steps"]) + 1) / 2
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            cm = r["center_momentum"]
            center_cls.mul_(cm).add_(ranks.mean0(t_cls_logits), alpha=1 - cm)
            if t_patch_logits is not None:
                center_patch.mul_(cm).add_(ranks.masked_mean(t_patch_logits, masked_total, dim=0), alpha=1 - cm)
        for k, v in (("loss", loss), ("dino", dino), ("ibot", ibot), ("pixel", pixel), ("dense", dense),
                     ("presence", presence)):
            log[k].append(round(ranks.mean(v) if torch.is_tensor(v) else float(v), 5))
        checkpoints.save(step + 1, r["steps"], parts, opt, sched, guard, rng, {"order": order, "log": log})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", pix=f"{float(pixel.detach()):.3f}")
    # which backbone ships: DINO keeps the momentum teacher, but over a few hundred steps the EMA
    # lags far behind the student (measured: near-chance probes), so the recipe chooses
    backbone = (student if r["save"] == "student" else teacher).backbone.eval()
    probe = probe_outputs("dinov3", backbone, image_processor(r))
    require_finite(backbone.state_dict(), "the DINOv3 teacher")
    if ranks.main:
        backbone.save_pretrained(out_dir)
        image_processor(r).save_pretrained(out_dir)
        check_roundtrip(probe, probe_outputs("dinov3", DINOv3ViTModel.from_pretrained(out_dir),
                                             DINOv3ViTImageProcessor.from_pretrained(out_dir)), str(out_dir))
    text = None
    if r["dinotxt"].get("enabled", True):  # the DINOv3 text branch (dino.txt) on the frozen, saved backbone
        from .dinotxt import train_dinotxt
        text = train_dinotxt(data, backbone, image_processor(r), r["dinotxt"], out_dir, seed, progress,
                             checkpoints.sub("dinotxt"), ranks)
    return {"dinotxt": text, "probe": probe, "steps": r["steps"], "batch_size": bs, "images": len(images), "losses": log["loss"],
            "dino_losses": log["dino"], "ibot_losses": log["ibot"], "pixel_losses": log["pixel"], "dense_losses": log["dense"],
            "presence_losses": log["presence"],
            "dense_vocab": {"shapes": vocab[0], "colours": vocab[1]},
            "data_seconds": round(t_data, 2), "seconds": round(time.perf_counter() - t0, 2)}
