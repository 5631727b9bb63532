"""`amoe ground perf`: evaluation speed of constrained box decoding with and without the KV cache.

A grounding VLM of a student architecture (random weights: speed does not depend on them) reads
synthetic images and mini-world-like expressions (a BPE trained on them, with the location tokens) and generates the four location tokens of each
expression, batch by batch, as `amoe ground eval` does; once re-running the whole sequence for every
token (the reference) and once with the KV cache (the image prefix and the prompt once, then one
text-expert step per token). Prints JSON: expressions per second each way, their ratio, and whether
the two gave the same tokens. With `lm` (a causal LM folder, e.g. the stand-in of `amoe ground
lm-pretrain`) the text experts are that LM's and the tokenizer its own (`LMGroundingVLM`); with
`train_steps` it also times training steps (forward, loss on the box tokens, backward, AdamW) on
batches of `train_batch` expressions. The machine load is reported too: time it on an idle box.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def run_decode_perf(vision: str = "moe-cpu-small", expressions: int = 64, batch: int = 32, side: int = 128,
                    words: int = 8, bins: int = 64, repeats: int = 3, seed: int = 0, lm: str | None = None,
                    train_steps: int = 0, train_batch: int = 8) -> dict:
    import random

    from .evaluate import greedy_box_tokens
    from .model import GroundingVLM, VLMConfig
    from .tokenizer import GroundingTokenizer, train_tokenizer

    rng = random.Random(seed)
    lexicon = ["circle", "square", "triangle", "star", "red", "green", "blue", "yellow", "left", "right", "top",
               "bottom", "big", "small", "the", "of"]
    texts = [" ".join(rng.choice(lexicon) for _ in range(words)) for _ in range(expressions)]
    torch.manual_seed(seed)
    if lm:
        from .lm import build_lm_vlm, lm_tokenizer

        tok = GroundingTokenizer(lm_tokenizer(lm), bins=bins)
        prompts = [tok.encode_prompt(t) for t in texts]
        model = build_lm_vlm(lm, tok, vision=vision, max_text_len=max(map(len, prompts)) + 5)
    else:
        tok = GroundingTokenizer(train_tokenizer(texts * 4, vocab_size=400), bins=bins)
        prompts = [tok.encode_prompt(t) for t in texts]
        model = GroundingVLM(VLMConfig(vision=vision, vocab_size=tok.vocab_size,
                                       max_text_len=max(map(len, prompts)) + 5))
    model.eval()
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, side, side, generator=g) for _ in range(expressions)]

    def decode(kv: bool):
        out = []
        for s in range(0, expressions, batch):
            out += greedy_box_tokens(model, tok, images[s:s + batch], prompts[s:s + batch], kv_cache=kv)
        return out

    timings, tokens = {}, {}
    for kv in (False, True):
        tokens[kv] = decode(kv)                   # warm-up (allocator, thread pool)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode(kv)
            times.append(time.perf_counter() - t0)
        timings[kv] = statistics.median(times)
    train = _train_step_ms(model, tok, images, prompts, train_steps, train_batch, rng) if train_steps else None
    return {"vision": vision, "text": "lm" if lm else "scratch",
            "params": sum(p.numel() for p in model.parameters()), "expressions": expressions,
            "batch": batch, "image_side": side, "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
            "repeats": repeats,
            "uncached_expressions_per_s": round(expressions / timings[False], 2),
            "cached_expressions_per_s": round(expressions / timings[True], 2),
            "speedup": round(timings[False] / timings[True], 2), "same_tokens": tokens[False] == tokens[True],
            "goal_speedup": 2.0, "train_step_ms": train, "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


def _train_step_ms(model, tok, images, prompts, steps: int, batch: int, rng) -> dict:
    """Median milliseconds of a training step (forward, box-token loss, backward, AdamW) over `steps`
    steps after one warm-up, each on `batch` of the synthetic expressions with random boxes."""
    from distill.train.optim import build_adamw

    from .data import target_loss

    model.train()
    optim = build_adamw(model.named_parameters(), 1e-4, 0.01)
    times = []
    for k in range(steps + 1):
        idx = [rng.randrange(len(prompts)) for _ in range(batch)]
        ids = [prompts[i] + tok.encode_target(sorted(rng.sample(range(tok.bins), 2)) * 2) for i in idx]
        t0 = time.perf_counter()
        out = model([images[i] for i in idx], ids)
        ce_sum, n = target_loss(out.logits, ids, [len(prompts[i]) for i in idx])
        optim.zero_grad(set_to_none=True)
        (ce_sum / n).backward()
        optim.step()
        if k:                                   # the first step warms up
            times.append(1000 * (time.perf_counter() - t0))
    model.eval()
    return {"steps": steps, "batch": batch, "median_ms": round(statistics.median(times), 1)}
