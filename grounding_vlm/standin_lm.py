"""The mini-world's stand-in for a pretrained language model: a tiny `Qwen2ForCausalLM`, pretrained by
next-token prediction on the pool's captions, saved in hub format (config.json, model.safetensors and
the tokenizer files), so code that loads a real LM by id or path (`from_pretrained`) runs offline on
the mini-world with the same classes.

    amoe ground lm-pretrain --world WORLD --out LM [--steps N]

Only the pool's captions (a training split) are read, never the refer expressions. A seeded tenth
of them is held out: the log reports their loss before and after training, the evidence that the
model learned the captions' language. The folder is trained under `.OUT.partial` (`distill.io.staging_folder`) and renamed into
place with `COMPLETE.json` written last; a complete folder of the same settings and world is kept.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from distill.io import fingerprint, lock_run_folder, publish_folder, staging_folder, write_json_atomic

SETTINGS = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 512, "max_length": 48, "steps": 300, "batch_size": 32,
            "lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.01, "seed": 0}
MARKER = "COMPLETE.json"


def pool_captions(world: str | os.PathLike) -> list[str]:
    """The pool's captions (the `.txt` members of its shards), in shard order; no image is decoded."""
    from distill.data.pool import resolve_shards, tar_members

    pool = Path(world) / "pool"
    if not pool.is_dir():
        raise FileNotFoundError(f"{world} has no pool/ folder; make a world with `amoe world make --out {world}`")
    caps = [data.decode("utf-8", errors="replace").strip()
            for shard in resolve_shards(pool) for _, data in tar_members(shard, suffixes=(".txt",))]
    caps = [c for c in caps if c]
    if len(caps) < 2:
        raise ValueError(f"{pool} holds {len(caps)} caption(s); the stand-in LM needs at least 2")
    return caps


def _batch(tok, texts: list[str], max_length: int):
    enc = tok([f"{tok.bos_token} {t} {tok.eos_token}" for t in texts], padding=True, truncation=True,
              max_length=max_length, return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


@torch.no_grad()
def _loss(model, tok, texts: list[str], max_length: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for s in range(0, len(texts), batch_size):
        ids, mask, labels = _batch(tok, texts[s:s + batch_size], max_length)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        count += n
    return total / max(count, 1)


def pretrain_standin_lm(world: str | os.PathLike, out: str | os.PathLike, settings: dict | None = None,
                        progress: bool = True) -> dict:
    """Train (or keep, when complete for the same settings and world) the stand-in LM in `out`."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from distill.train.guard import StepGuard, optimizer_step, require_finite
    from distill.train.optim import build_adamw
    from distill.train.schedule import warmup_cosine

    from .tokenizer import train_tokenizer

    unknown = set(settings or {}) - set(SETTINGS)
    if unknown:
        from distill.config import unknown_keys_error
        raise unknown_keys_error(unknown, SETTINGS, "the stand-in LM settings")
    s = {**SETTINGS, **(settings or {})}
    out = Path(out)
    captions = pool_captions(world)
    fp = fingerprint({"settings": s, "captions": fingerprint(captions)})
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp:
        return {"status": "skipped (complete)", **json.loads((out / "train_log.json").read_text())}
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(out.parent, "stand-in LM pretraining", name=f".{out.name}.lock")
    try:
        t0 = time.perf_counter()
        rng = random.Random(s["seed"])
        torch.manual_seed(s["seed"])
        order = list(range(len(captions)))
        rng.shuffle(order)
        n_val = max(1, len(captions) // 10)
        val = [captions[i] for i in order[:n_val]]
        train = [captions[i] for i in order[n_val:]] or val
        tok = train_tokenizer(train, vocab_size=int(s["vocab_size"]))
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                          num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                          num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=s["max_length"],
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        model = Qwen2ForCausalLM(cfg)
        before = _loss(model.eval(), tok, val, s["max_length"], s["batch_size"])
        model.train()
        opt = build_adamw(model.named_parameters(), s["lr"], s["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, s["steps"], s["warmup_steps"]))
        guard, losses, queue = StepGuard(), [], []
        bs = min(int(s["batch_size"]), len(train))
        for _ in tqdm(range(int(s["steps"])), desc="stand-in LM", disable=not progress):
            if len(queue) < bs:                        # epochs without replacement
                queue += rng.sample(range(len(train)), len(train))
            idx, queue = queue[:bs], queue[bs:]
            ids, mask, labels = _batch(tok, [train[i] for i in idx], s["max_length"])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            losses.append(optimizer_step(opt, sched, loss, model.parameters(), 1.0, guard, "stand-in LM",
                                         "lower its learning rate (--set lr=...)"))
        model.eval()
        after = _loss(model, tok, val, s["max_length"], s["batch_size"])
        require_finite(model.state_dict(), "the stand-in LM")
        partial = staging_folder(out)
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        probe = _batch(tok, val[:2], s["max_length"])
        back = AutoModelForCausalLM.from_pretrained(partial).eval()
        with torch.no_grad():
            diff = float((back(input_ids=probe[0], attention_mask=probe[1]).logits
                          - model(input_ids=probe[0], attention_mask=probe[1]).logits).abs().max())
        if diff > 1e-4 or len(AutoTokenizer.from_pretrained(partial)) != len(tok):
            raise RuntimeError(f"the saved stand-in LM does not load back the same (max logit diff {diff})")
        log = {"settings": s, "captions": {"train": len(train), "held_out": len(val)},
               "held_out_loss_before": round(before, 4), "held_out_loss_after": round(after, 4),
               "held_out_perplexity_after": round(math.exp(after), 2), "losses": losses,
               "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - t0, 2)}
        write_json_atomic(partial / "train_log.json", log)
        write_json_atomic(partial / MARKER, {"fingerprint": fp})
        publish_folder(partial, out)
        return log
    finally:
        lock.release()
