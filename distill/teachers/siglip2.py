"""The mini-world SigLIP2 teacher: HF `Siglip2Model` (NaFlex inputs) trained with the sigmoid loss.

Beside it, recipe key `presence_weight`, a weak-supervision term from the world's metadata: a
training-only linear head on the image embedding predicts which shapes and which colours the image's
`objects` hold (`common.presence_cross_entropy`; class-prompt images have no objects and add nothing).
The sigmoid loss alone settles a batch by colour and never gets to shape; this term is what moves
zero-shot (docs/teachers.md). The head is not part of the saved model.

Images go through the real `Siglip2ImageProcessor` (aspect-preserving resize to at most
`max_num_patches` patches, pre-patchified `pixel_values` (B, L, 3*p*p), `pixel_attention_mask`,
`spatial_shapes`), so the saved processor reproduces training-time inputs exactly.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor,
                          Siglip2TextConfig, Siglip2VisionConfig)

from distill.distributed import gather_rows
from distill.train.guard import StepGuard, require_finite

from distill.train.schedule import warmup_cosine
from distill.train.optim import build_adamw

from .common import LoopCheckpoints, Ranks, StepForward, optimizer_step, presence_cross_entropy
from .data import WorldData, object_vocab, presence_vector
from .probe import check_roundtrip, probe_outputs
from .tokenizer import encode, train_tokenizer


def build_model(r: dict, tokenizer) -> Siglip2Model:
    vision = Siglip2VisionConfig(patch_size=r["patch_size"], num_patches=r["max_num_patches"], **r["vision"])
    text = Siglip2TextConfig(vocab_size=len(tokenizer), max_position_embeddings=r["text_max_length"],
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.eos_token_id, projection_size=r["projection_size"], **r["text"])
    config = Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    model = Siglip2Model(config)
    with torch.no_grad():  # SigLIP's initialisation of the temperature and bias (t' = log 10, b = -10)
        model.logit_scale.fill_(math.log(r["init_logit_scale"]))
        model.logit_bias.fill_(r["init_logit_bias"])
    return model


def image_processor(r: dict) -> Siglip2ImageProcessor:
    return Siglip2ImageProcessor(patch_size=r["patch_size"], max_num_patches=r["max_num_patches"])


def shrink(image, max_side: int):
    """Cheap PIL downscale of large pool images before the processor: its own resize of a 768 px image
    costs ~6x more, and the processor's final resize to the patch budget is unchanged."""
    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side))
    return image


def preprocess_images(proc: Siglip2ImageProcessor, images: list, chunk: int = 128, progress: bool = True) -> dict:
    """Every training image through the processor once; stored in fp16 to halve memory."""
    parts: dict[str, list] = {"pixel_values": [], "pixel_attention_mask": [], "spatial_shapes": []}
    # twice the side of a square at the patch budget keeps the processor's resize a true downscale
    max_side = 2 * proc.patch_size * math.ceil(math.sqrt(proc.max_num_patches))
    for i in tqdm(range(0, len(images), chunk), desc="siglip2 preprocess", disable=not progress, leave=False):
        out = proc(images=[shrink(im, max_side) for im in images[i:i + chunk]], return_tensors="pt")
        parts["pixel_values"].append(out["pixel_values"].to(torch.float16))
        parts["pixel_attention_mask"].append(out["pixel_attention_mask"])
        parts["spatial_shapes"].append(out["spatial_shapes"])
    return {k: torch.cat(v) for k, v in parts.items()}


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 txt_groups: torch.Tensor, img_groups: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's texts against the images of the whole global
    batch (gathered from every rank); pairs of one group (same class prompt) count as positives, so
    duplicate classes in a batch are not pushed apart. Averaged over this rank's rows, so DDP's
    average over ranks is the global batch's loss."""
    img = gather_rows(F.normalize(img, dim=-1))
    txt = F.normalize(txt, dim=-1)
    logits = txt @ img.t() * scale.exp() + bias
    labels = 2.0 * (txt_groups[:, None] == img_groups[None, :]).float() - 1.0
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


class TrainingNet(torch.nn.Module):
    """The saved model and the training-only presence head (which shapes and colours an image holds,
    read from its image embedding; never saved)."""

    def __init__(self, model: Siglip2Model, presence_classes: int):
        super().__init__()
        self.model = model
        self.presence_head = torch.nn.Linear(model.config.text_config.projection_size, presence_classes)


def _towers(net: TrainingNet, pixel_values, pixel_attention_mask, spatial_shapes, input_ids):
    model = net.model
    img = model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                                   spatial_shapes=spatial_shapes)
    txt = model.get_text_features(input_ids=input_ids)
    # the temperature and bias as outputs of the forward (copies): DDP counts a parameter ready once per
    # backward, and one read outside the wrapped forward would be counted again
    return (img.pooler_output, txt.pooler_output, model.logit_scale.clone(), model.logit_bias.clone(),
            net.presence_head(img.pooler_output))


def train(data: WorldData, r: dict, out_dir: Path, seed: int, progress: bool = True,
          checkpoints: LoopCheckpoints | None = None, ranks: Ranks | None = None) -> dict:
    """Train the teacher and save it to `out_dir` (main rank); returns its log. Under a torchrun group
    (`ranks`) each rank computes its block of every global batch (see `Ranks`)."""
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs = data.pairs(r["use_pool"], r["use_classification_train"], r["classification_repeat"], r["use_pretrain"])
    corpus = sorted(set(data.caption_corpus(pairs)))
    tokenizer = train_tokenizer(corpus, r["vocab_size"], r["text_max_length"])
    token_row = {c: i for i, c in enumerate(corpus)}
    tokens = encode(tokenizer, corpus, r["text_max_length"])
    proc = image_processor(r)
    inputs = preprocess_images(proc, [p.image for p in pairs], progress=progress)
    groups = torch.tensor([p.group for p in pairs])
    vocab = object_vocab([o for p in pairs for o in p.objects])
    presence = torch.tensor([presence_vector(p.objects, vocab, r["presence_by_area"]) for p in pairs])
    t_data = time.perf_counter() - t0

    model = build_model(r, tokenizer)
    net = TrainingNet(model, presence.shape[1]).train()
    opt = build_adamw(net.named_parameters(), r["lr"], r["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, r["steps"], r["warmup_steps"]))
    guard = StepGuard()
    checkpoints = checkpoints or LoopCheckpoints(None, "", 1)
    parts = {"model": net}
    start, loop = checkpoints.restore(parts, opt, sched, guard, rng)
    order: list[int] = loop.get("order", [])
    losses = loop.get("losses", [])
    presence_losses = loop.get("presence_losses", [])
    bs = min(r["batch_size"], len(pairs))
    mine = ranks.block(bs, "siglip2")
    towers = ranks.wrap(StepForward(net, _towers))
    bar = tqdm(range(start, r["steps"]), desc="siglip2 train", disable=not progress, initial=start, total=r["steps"])
    for step in bar:
        if len(order) < bs:  # epochs without replacement
            order += rng.sample(range(len(pairs)), len(pairs))
        idx, order = order[:bs], order[bs:]
        ids = torch.stack([tokens[token_row[rng.choice(pairs[i].captions)]] for i in idx])
        local = idx[mine]
        img, txt, scale, bias, presence_logits = towers(
            inputs["pixel_values"][local].float(), inputs["pixel_attention_mask"][local],
            inputs["spatial_shapes"][local], ids[mine])
        loss = sigmoid_loss(img, txt, scale, bias, groups[local], groups[idx])
        # rows without metadata objects (class-prompt images) add nothing; divided by this rank's row
        # count, so that DDP's average over equal blocks is the global batch's mean
        weak = presence_cross_entropy(presence_logits, presence[local], len(vocab[0])).sum() / len(local)
        loss = loss + r["presence_weight"] * weak
        losses.append(optimizer_step(opt, sched, loss, net.parameters(), 1.0, guard, "SigLIP2 teacher", ranks))
        presence_losses.append(round(ranks.mean(weak), 5))
        checkpoints.save(step + 1, r["steps"], parts, opt, sched, guard, rng,
                         {"order": order, "losses": losses, "presence_losses": presence_losses})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    processor = Siglip2Processor(image_processor=proc, tokenizer=tokenizer)
    probe = probe_outputs("siglip2", model, processor)
    require_finite(model.state_dict(), "the SigLIP2 teacher")
    if ranks.main:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        check_roundtrip(probe, probe_outputs("siglip2", Siglip2Model.from_pretrained(out_dir),
                                             Siglip2Processor.from_pretrained(out_dir)), str(out_dir))
    return {"probe": probe, "steps": r["steps"], "batch_size": bs, "pairs": len(pairs), "captions": len(corpus),
            "vocab_size": len(tokenizer), "losses": losses, "presence_losses": presence_losses, "data_seconds": round(t_data, 2),
            "seconds": round(time.perf_counter() - t0, 2),
            "logit_scale": round(model.logit_scale.exp().item(), 4), "logit_bias": round(model.logit_bias.item(), 4)}
