"""`amoe ground plan CONFIG [--world-size N] [--gpu-gib 80] [--json]`: what one rank of a grounding
run holds on the accelerator, before any GPU is rented.

Counted from real objects: the VLM built on the meta device from the config (vision experts from
`init.config` or `model.vision`, text experts from the LM's config: a local folder's `config.json`,
or for the recipes' hub ids the architecture in `PAPER_LMS`), each parameter in its part; weights,
gradients and AdamW's two moments for the parts that train (`optim.freeze` leaves the rest as weights
only), in the LM's `dtype` for the text experts and float32 elsewhere (the trainer runs no autocast),
whole on every rank under DDP, a 1/N shard plus two unsharded blocks in flight under FSDP2
(`train.parallel`); with Gram anchoring a frozen float32 copy of the
student. Activations are measured, not guessed: every tensor autograd saves
(`saved_tensors_hooks`) in a forward and loss of the real widths with one and two layers per side,
on one sample of the config's largest image (`data.max_pixels`) and `model.max_text_len` text
tokens (the parameters autograd keeps a reference to are weights, counted once, not activations); the
differences give each vision and each LM layer's bytes, which scale to the config's
depth and `train.batch_size` (samples are independent sequences, so bytes are linear in them). With
`lm.gradient_checkpointing` (`train.activation_checkpointing` for the vision blocks) a layer keeps only
its input while one layer at a time is recomputed.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from distill.errors import AmoeError

GiB = 2 ** 30


class PlanError(AmoeError, ValueError):
    """A config the plan cannot read; the message names the key to set."""

# Public config.json / tokenizer of the recipes' LMs (a plan never downloads): architecture, the
# tokenizer's length (its token ids, added specials included), and how many of the grounding specials
# (grounding_vlm.tokenizer.SPECIALS) it lacks (Qwen2.5 has eos and pad, not bos, unk and sep)
PAPER_LMS = {
    "Qwen/Qwen2.5-0.5B": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                           "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                           "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                           "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151936},
                          151665, 3),
}


def _lm_config(path: str, bins: int) -> tuple[dict, int, int]:
    """(the LM's config dict, its tokenizer's length, the tokens the grounding tokenizer adds), from a
    local folder or PAPER_LMS."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        from .lm import lm_tokenizer
        from .tokenizer import GroundingTokenizer

        tok = lm_tokenizer(str(folder))
        n = len(tok)                                   # before GroundingTokenizer extends it
        return json.loads((folder / "config.json").read_text()), n, GroundingTokenizer(tok, bins).vocab_size - n
    if path in PAPER_LMS:
        config, n, missing = PAPER_LMS[path]
        return copy.deepcopy(config), n, bins + missing
    raise PlanError(f"lm.path {path!r} is neither a local folder with config.json nor one of the LMs "
                            f"the plan knows offline ({', '.join(PAPER_LMS)})")


def _vision_config(cfg: dict):
    from distill.student import get_config

    vision = cfg["model"]["vision"]
    if vision == "from_init":
        init = cfg["init"]
        if init.get("kind") == "official" and init.get("config"):
            return get_config(init["config"])
        if init.get("kind") == "student" and init.get("path"):
            from distill.encoders.student import read_student_config
            return get_config(read_student_config(init["path"])["student_config"])
        raise PlanError("the plan needs the vision architecture: set init.config (official) or init.path "
                         "(student export), or model.vision to a student config name")
    return get_config(vision)


def _build(cfg: dict, vision, lm_cfg: dict, lm_vocab: int, n_new: int, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .lm import LMGroundingVLM
    from .model import VLMConfig

    with torch.device(device):
        hf = AutoConfig.for_model(**lm_cfg)
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(hf)
        vcfg = VLMConfig(vision=vision, vocab_size=lm_vocab + n_new, max_text_len=int(cfg["model"]["max_text_len"]),
                         mask_head=float(cfg["mask"]["weight"]) > 0, text="lm", lm=hf.to_dict(), lm_vocab=lm_vocab)
        return LMGroundingVLM(vcfg, lm)


def _probe_bytes(cfg: dict, vision, lm_cfg: dict, lm_vocab: int, n_new: int, side: int, layers: tuple[int, int]) -> int:
    """Saved bytes of one training forward + loss at (vision layers, LM layers), real widths."""
    from dataclasses import replace

    from distill.train.memory_plan import count_saved_bytes

    v = replace(vision, n_layers=layers[0])
    lm = dict(lm_cfg, num_hidden_layers=layers[1])
    if lm.get("layer_types"):        # per-layer attention kinds (transformers 5): the probe's first layers
        lm["layer_types"] = lm["layer_types"][: layers[1]]
    model = _build(cfg, v, lm, lm_vocab, n_new, "cpu").train()
    T = int(cfg["model"]["max_text_len"])
    ids = [[int(i) for i in torch.randint(0, lm_vocab, (T,))]]

    def run(_):
        out = model([torch.randn(3, side, side)], ids)
        out.logits[0].float().logsumexp(-1).sum().backward()
    return count_saved_bytes(run, exclude=list(model.parameters()))   # weights are counted apart


def plan_grounding(cfg: dict, world_size: int = 1, gpu_gib: float = 80.0, measure_activations: bool = True) -> dict:
    """The per-rank device plan of a grounding config with text experts from an LM (`lm.path`)."""
    if not cfg["lm"]["path"]:
        raise PlanError("the grounding plan covers the LM route: set lm.path (a local LM folder or "
                         f"one of {', '.join(PAPER_LMS)})")
    vision = _vision_config(cfg)
    lm_cfg, lm_vocab, n_new = _lm_config(cfg["lm"]["path"], int(cfg["tokenizer"]["bins"]))
    model = _build(cfg, vision, lm_cfg, lm_vocab, n_new, "meta")
    parts = model.parameter_parts()
    frozen = set(cfg["optim"]["freeze"])
    text_bytes = {None: 4, "float32": 4, "bfloat16": 2, "float16": 2}[cfg["lm"]["dtype"]]
    per_part: dict[str, dict] = {}
    for name, p in model.named_parameters():
        part = parts[name]
        width = text_bytes if part == "text" else 4
        d = per_part.setdefault(part, {"params": 0, "trains": part not in frozen, "weights": 0, "grads": 0,
                                       "optimizer_adamw": 0})
        d["params"] += p.numel()
        d["weights"] += p.numel() * width
        if d["trains"]:
            d["grads"] += p.numel() * width
            d["optimizer_adamw"] += 2 * p.numel() * width
    n_params = sum(d["params"] for d in per_part.values())
    device = {k: sum(d[k] for d in per_part.values()) for k in ("weights", "grads", "optimizer_adamw")}
    parallel = cfg["train"]["parallel"] if world_size > 1 else "none"
    if parallel == "fsdp":     # a 1/N shard of everything, plus the unsharded block in flight and the prefetched one
        block = max(sum(q.numel() for q in b.parameters()) for b in model.shard_blocks()) * 4
        device = {k: v / world_size for k, v in device.items()}
        device["fsdp_blocks_in_flight"] = 2 * 2 * block             # weights and gradients of two blocks
    elif parallel == "ddp":
        device["ddp_buckets"] = device["grads"]            # DDP's gradient buckets: a second copy at most
    if float(cfg["gram"]["weight"]) > 0:
        device["gram_anchor_student"] = 4 * sum(d["params"] for k, d in per_part.items() if k == "vision")
    p = vision.spatial_patch_size
    side = int(int(cfg["data"]["max_pixels"]) ** 0.5) // p * p
    tokens = vision.n_prefix_tokens + (side // p) ** 2 + int(cfg["model"]["max_text_len"])
    B = int(cfg["train"]["batch_size"])
    acts = None
    if measure_activations:
        base = _probe_bytes(cfg, vision, lm_cfg, lm_vocab, n_new, side, (1, 1))
        per_v = _probe_bytes(cfg, vision, lm_cfg, lm_vocab, n_new, side, (2, 1)) - base
        per_t = _probe_bytes(cfg, vision, lm_cfg, lm_vocab, n_new, side, (1, 2)) - base
        fixed = base - per_v - per_t
        Lv, Lt = vision.n_layers, int(lm_cfg["num_hidden_layers"])
        T = int(cfg["model"]["max_text_len"])
        # a recomputed layer keeps only its input; one layer's activations live again while it is recomputed
        kept_v = (tokens - T) * vision.dim * 4
        kept_t = T * int(lm_cfg["hidden_size"]) * text_bytes
        ckpt_v, ckpt_t = bool(cfg["train"]["activation_checkpointing"]), bool(cfg["lm"]["gradient_checkpointing"])
        vision_side = Lv * kept_v + per_v if ckpt_v else Lv * per_v
        text_side = Lt * kept_t + per_t if ckpt_t else Lt * per_t
        acts = {"per_sample_bytes": int(fixed + vision_side + text_side), "per_vision_layer_bytes": int(per_v),
                "per_lm_layer_bytes": int(per_t), "fixed_bytes": int(fixed),
                "per_sample_without_checkpointing": int(fixed + Lv * per_v + Lt * per_t),
                "vision_checkpointing": ckpt_v, "lm_checkpointing": ckpt_t,
                "probe": {"image_side": side, "text_tokens": T}}
        device["activations"] = acts["per_sample_bytes"] * B
    peak = sum(device.values())
    device = {k: int(v) for k, v in device.items()}
    return {"config": cfg["name"], "world_size": world_size, "parallel": parallel, "batch_size_per_rank": B,
            "tokens_per_sample": tokens, "lm": {"path": cfg["lm"]["path"], "dtype": cfg["lm"]["dtype"] or "float32",
                                                "gradient_checkpointing": bool(cfg["lm"]["gradient_checkpointing"])},
            "vision_activation_checkpointing": bool(cfg["train"]["activation_checkpointing"]),
            "params": n_params, "parts": per_part, "activations": acts, "device_bytes": device,
            "per_rank_peak_bytes": int(peak), "device_budget_bytes": int(gpu_gib * GiB),
            "device_headroom_bytes": int(gpu_gib * GiB - peak), "fits_device": peak <= gpu_gib * GiB,
            "estimated": ["device_bytes.ddp_buckets (at most one copy of the gradients)",
                          "device_bytes.fsdp_blocks_in_flight (two blocks, float32)"]}


def format_plan(plan: dict) -> str:
    g = lambda v: f"{v / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"grounding memory plan: {plan['config']} on {plan['world_size']} rank(s) ({plan['parallel']}), "
             f"{plan['batch_size_per_rank']} "
             f"samples of {plan['tokens_per_sample']} tokens per rank, LM {plan['lm']['path']} "
             f"({plan['lm']['dtype']}, gradient checkpointing {'on' if plan['lm']['gradient_checkpointing'] else 'off'}; "
             f"vision blocks {'recomputed' if plan['vision_activation_checkpointing'] else 'kept'})",
             f"parameters: {plan['params'] / 1e6:.1f}M (" + ", ".join(
                 f"{k} {d['params'] / 1e6:.1f}M{'' if d['trains'] else ' frozen'}" for k, d in plan["parts"].items()) + ")",
             "device, per rank:"]
    lines += [f"  {k:20s} {g(v)}" for k, v in plan["device_bytes"].items()]
    lines.append(f"  {'peak':20s} {g(plan['per_rank_peak_bytes'])}  of {g(plan['device_budget_bytes']).strip()}: "
                 + ("fits" if plan["fits_device"] else "DOES NOT FIT"))
    return "\n".join(lines)
