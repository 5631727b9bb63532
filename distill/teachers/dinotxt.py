"""The mini-world DINOv3 teacher's text branch: a dino.txt-style head trained LiT-style.

dino.txt aligns text to a *frozen* DINOv3: a small vision head (transformer blocks + LayerNorm over
[CLS, patches]) and a text tower are trained with CLIP's contrastive loss, the image side being the
joint embedding [head CLS | mean head patch]. This does the same at mini-world size, on the same
training pairs as the SigLIP2 teacher (pool captions; classification *train* prompts), and saves
the result in the folder layout `distill.encoders.dinotxt` reads (TEACHER/dinov3/dinotxt/), so the
teacher and every student distilled from it get a `dinotxt` zero-shot / retrieval head.

The frozen backbone's tokens are computed once per image (images through the teacher's saved
processor), so training costs only the head and the text tower.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.encoders.dinotxt import SUBFOLDER, MiniDinoTxt, contrastive_loss, save_mini_dinotxt
from distill.distributed import gather_rows
from distill.train.guard import StepGuard, require_finite

from distill.train.schedule import warmup_cosine
from distill.train.optim import build_adamw

from .common import LoopCheckpoints, Ranks, StepForward, optimizer_step
from .data import WorldData
from .tokenizer import encode, train_tokenizer


@torch.no_grad()
def backbone_tokens(backbone, processor, images: list, batch: int = 64, progress: bool = True) -> torch.Tensor:
    """(N, 1 + patches, C) [CLS, patches] of the frozen backbone (registers dropped, as a student has them
    apart), in fp16 to halve memory."""
    skip = 1 + int(backbone.config.num_register_tokens)
    out = []
    for i in tqdm(range(0, len(images), batch), desc="dinotxt tokens", disable=not progress, leave=False):
        x = processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"]
        hidden = backbone(pixel_values=x).last_hidden_state
        out.append(torch.cat([hidden[:, :1], hidden[:, skip:]], 1).half())
    return torch.cat(out)


def _embed(model: MiniDinoTxt, tokens: torch.Tensor, ids: torch.Tensor):
    h = model.visual_model.head(tokens)
    # the temperature as an output (a copy), as in the SigLIP2 teacher's `_towers`
    return torch.cat([h[:, 0], h[:, 1:].mean(1)], -1), model.encode_text(ids), model.logit_scale.clone()


def sharded_contrastive_loss(img, txt, logit_scale, groups_local, groups_all) -> torch.Tensor:
    """`contrastive_loss` with the batch split over ranks: this rank's images against every rank's
    texts and its texts against every rank's images (gathered), averaged over its own rows, so DDP's
    average over ranks is the single-process loss of the global batch."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale = logit_scale.exp().clamp(max=100)
    pos = (groups_local[:, None] == groups_all[None, :]).float()
    target = pos / pos.sum(-1, keepdim=True)
    return (-(target * F.log_softmax(scale * img @ gather_rows(txt).t(), -1)).sum(-1).mean()
            - (target * F.log_softmax(scale * txt @ gather_rows(img).t(), -1)).sum(-1).mean()) / 2


def train_dinotxt(data: WorldData, backbone, processor, r: dict, out_dir: Path, seed: int,
                  progress: bool = True, checkpoints: LoopCheckpoints | None = None,
                  ranks: Ranks | None = None) -> dict:
    """Train the head on the frozen `backbone`; write it to `out_dir/dinotxt/` (main rank); return its
    log. Under a torchrun group (`ranks`) each rank computes its block of every global batch."""
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs = data.pairs(True, True, 1)
    corpus = sorted(set(data.caption_corpus(pairs)))
    tokenizer = train_tokenizer(corpus, r["vocab_size"], r["context_length"])
    token_row = {c: i for i, c in enumerate(corpus)}
    ids = encode(tokenizer, corpus, r["context_length"])
    tokens = backbone_tokens(backbone.eval(), processor, [p.image for p in pairs], progress=progress)
    groups = torch.tensor([p.group for p in pairs])
    width = int(backbone.config.hidden_size)
    model = MiniDinoTxt({"dim": width, "heads": r["heads"], "head_blocks": r["head_blocks"],
                         "vocab_size": len(tokenizer), "context_length": r["context_length"],
                         "text_dim": r["text_dim"], "text_heads": r["text_heads"], "text_layers": r["text_layers"],
                         "pad_id": int(tokenizer.pad_token_id)})
    opt = build_adamw(model.named_parameters(), r["lr"], r["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, r["steps"], r["warmup_steps"]))
    guard = StepGuard()
    checkpoints = checkpoints or LoopCheckpoints(None, "", 1)
    parts = {"model": model}
    start, loop = checkpoints.restore(parts, opt, sched, guard, rng)
    bs = min(r["batch_size"], len(pairs))
    mine = ranks.block(bs, "dinov3.dinotxt")
    embed = ranks.wrap(StepForward(model, _embed))
    order: list[int] = loop.get("order", [])
    losses = loop.get("losses", [])
    for step in tqdm(range(start, r["steps"]), desc="dinotxt train", disable=not progress, leave=False,
                     initial=start, total=r["steps"]):
        if len(order) < bs:
            order += rng.sample(range(len(pairs)), len(pairs))
        idx, order = order[:bs], order[bs:]
        text = torch.stack([ids[token_row[rng.choice(pairs[i].captions)]] for i in idx])
        local = idx[mine]
        img, txt, logit_scale = embed(tokens[local].float(), text[mine])
        if ranks.distributed:
            loss = sharded_contrastive_loss(img, txt, logit_scale, groups[local], groups[idx])
        else:
            loss = contrastive_loss(img, txt, logit_scale, groups[idx])
        losses.append(optimizer_step(opt, sched, loss, model.parameters(), 1.0, guard, "dino.txt head", ranks))
        checkpoints.save(step + 1, r["steps"], parts, opt, sched, guard, rng, {"order": order, "losses": losses})
    model.eval()
    require_finite(model.state_dict(), "the dino.txt head")
    if ranks.main:
        save_mini_dinotxt(model, tokenizer, out_dir / SUBFOLDER)
    return {"steps": r["steps"], "batch_size": bs, "pairs": len(pairs), "losses": losses,
            "seconds": round(time.perf_counter() - t0, 2)}
