"""`amoe ground train CONFIG`: train the grounding VLM (single process or torchrun, gloo on CPU).

Run folder OUT/:
    config.json          the resolved training config (after --set overrides)
    vlm_config.json      the VLM architecture (VLMConfig.to_dict)
    tokenizer/           the tokenizer (trained offline on the train split, or copied from a path)
    data_report.json     refs / expressions / refs skipped for missing images, per split used
    metrics.jsonl        one line per logged step (distill.train.metrics)
    checkpoints/         atomic safetensors checkpoints with resume (distill.train.checkpoint)

Data order is a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from distill.distributed import all_reduce_sum, barrier, setup, teardown
from distill.errors import AmoeError
from distill.io import fingerprint, portable, resolve_spec, write_json_atomic
from distill.student import update_expert_bias
from distill.train import checkpoint as ckpt
from distill.train.guard import StepGuard, TrainingAborted, guarded_step
from distill.train.metrics import MetricsWriter
from distill.train.optim import build_adamw
from distill.train.parallelize import apply_activation_checkpointing, data_parallel
from distill.train.schedule import warmup_cosine
from distill.config import apply_overrides as apply_dotted
from distill.config import ConfigError, merge, read_config_file

from .data import (ImageCache, build_tokenizer, check_text_lengths, encode_batch, load_split, processor_from,
                   require_data_root, target_loss)
from .gram import AnchorFeatures, gram_anchoring_loss, gram_weight
from .mask import mask_loss
from .init import anchor_student, load_student_source, load_vision_experts
from .model import GroundingVLM, VLMConfig

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULTS: dict[str, Any] = {
    "name": "grounding",
    "data": {"root": None, "dataset": "refcoco", "split_by": None, "image_root": None, "train_split": "train",
             "eval_splits": ["val", "testA", "testB"], "min_pixels": 128 * 128, "max_pixels": 256 * 256},
    "tokenizer": {"path": None, "vocab_size": 2000, "bins": 1000},
    # box_positions: the scratch text side reads where each patch sits (grounding_vlm.model.MoTBlock)
    "model": {"vision": "from_init", "text_ffn_dim": 0, "max_text_len": 64, "box_positions": True},
    # text experts from a pretrained causal LM (grounding_vlm/lm.py): a hub id or local folder with the LM
    # and its tokenizer; null = the scratch text side at the student's width (model.text_ffn_dim)
    "lm": {"path": None, "dtype": None, "gradient_checkpointing": False},
    "init": {"kind": "scratch", "path": None, "config": None},
    "gram": {"weight": 0.0, "start_step": 0, "warmup_steps": 0},
    # referring segmentation: weight > 0 adds the mask head (grounding_vlm/mask.py) and its loss
    "mask": {"weight": 0.0},
    # freeze: parts left untrained, any of "vision" (the vision experts), "text" (text experts, embeddings,
    # LM head), "mask" (the mask head), and with an LM "bridge" and "new_tokens" (the added specials and
    # location tokens); their rates: vision_lr for the vision experts, bridge_lr / new_token_lr (null: lr)
    # for those, lr for the rest
    "optim": {"lr": 1e-3, "vision_lr": 1e-4, "bridge_lr": None, "new_token_lr": None, "weight_decay": 0.01,
              "betas": [0.9, 0.95], "warmup_steps": 20, "min_lr_ratio": 0.1, "grad_clip": 1.0,
              "expert_bias_rate": 1e-3, "freeze": []},
    # activation_checkpointing: recompute the vision blocks (with the scratch text side: whole layers) in
    # the backward pass instead of keeping their activations (distill.train.parallelize)
    # parallel (under torchrun): "ddp", or "fsdp" (FSDP2: each vision block and LM layer sharded, then the
    # rest; distill.train.parallelize, as the distiller does it)
    "train": {"steps": 1000, "batch_size": 8, "seed": 0, "log_every": 10, "checkpoint_every": 200, "keep": 2,
              "device": "auto", "progress": True, "activation_checkpointing": False, "parallel": "ddp"},
    # suite / dataset_id: where results are filed; null = read from the data (evaluate.result_identity)
    "robustness": {"max_skipped_in_a_row": 5, "grad_spike_factor": 50.0},
    # kv_cache: decode with the KV cache (false: re-run the whole sequence per token, the reference)
    "eval": {"batch_size": 16, "limit": None, "ordered_boxes": True, "kv_cache": True, "suite": None,
             "dataset_id": None},
}


# ----------------------------------------------------------------------------- config
def apply_overrides(cfg: dict, sets: list[str]) -> dict:
    """`--set section.key=value` (distill.config's syntax); an unknown key is refused, naming the nearest."""
    return apply_dotted(cfg, sets, strict=True, where="the grounding config")


def load_config(spec: str | Path | Mapping, sets: list[str] | None = None) -> dict:
    """A config file, a built-in config name (grounding_vlm/configs/<name>.json) or a dict, over DEFAULTS
    (strict at every depth: a key DEFAULTS lacks is a typo, not a silent no-op)."""
    raw = dict(spec) if isinstance(spec, Mapping) else read_config_file(spec, CONFIGS_DIR, "grounding config")[0]
    raw = {k: v for k, v in raw.items() if k != "_comment"}
    return apply_overrides(merge(DEFAULTS, raw, strict=True, where="the grounding config"), sets or [])


# ----------------------------------------------------------------------------- model set-up
def build_model(cfg: dict, tok):
    """-> (vlm, init report, student (config, state) or None)."""
    init = cfg["init"]
    source = None
    if init["kind"] != "scratch":
        source = load_student_source(init)
    vision = cfg["model"]["vision"]
    if vision == "from_init":
        if source is None:
            raise ValueError("model.vision='from_init' needs a student init; for init.kind='scratch' give the "
                             "vision architecture (a student config name such as 'moe-cpu-small', or a dict)")
        vision = source[0]
    common = dict(vision=vision, text_ffn_dim=int(cfg["model"]["text_ffn_dim"]),
                  max_text_len=int(cfg["model"]["max_text_len"]), mask_head=float(cfg["mask"]["weight"]) > 0)
    report = {"kind": init["kind"], "path": init.get("path")}
    if cfg["lm"]["path"]:
        from .lm import build_lm_vlm, check_supported

        model = build_lm_vlm(cfg["lm"]["path"], tok, cfg["lm"]["dtype"], **common)
        model.text.gradient_checkpointing = bool(cfg["lm"]["gradient_checkpointing"])
        report["lm"] = {"path": cfg["lm"]["path"], "class": check_supported(model.text.hf_config),
                        "lm_vocab": model.config.lm_vocab, "new_tokens": tok.vocab_size - model.config.lm_vocab}
    else:
        model = GroundingVLM(VLMConfig(**common, vocab_size=tok.vocab_size,
                                       box_positions=bool(cfg["model"]["box_positions"])))
    if source is not None:
        report.update(load_vision_experts(model, source[1]))
        report["copied"] = len(report["copied"])
    return model, report, source


FREEZABLE = ("vision", "text", "mask", "bridge", "new_tokens")


def freeze_parts(model, parts: list[str]) -> None:
    """Leave `parts` of the VLM untrained (requires_grad off, so the optimizer never holds them)."""
    part_of = model.parameter_parts()
    bad = sorted(set(parts) - set(FREEZABLE))
    if bad:
        raise ConfigError(f"optim.freeze: unknown part(s) {bad}; choose from {list(FREEZABLE)}")
    absent = sorted(set(parts) - set(part_of.values()) - {"mask"})
    if absent:
        raise ConfigError(f"optim.freeze: this model has no {absent} (those exist with an LM text side, lm.path)")
    for name, p in model.named_parameters():
        if part_of[name] in parts:
            p.requires_grad_(False)


def rate_groups(model, oc: dict) -> dict:
    """build_adamw's lr groups: the vision experts at vision_lr, the bridge and the new tokens at their
    own rates where the model has them (null: lr); the rest at lr."""
    parts = model.parameter_parts()
    groups = {"vision": (lambda n, _: parts[n] == "vision", oc["vision_lr"])}
    for part, key in (("bridge", "bridge_lr"), ("new_tokens", "new_token_lr")):
        if part in parts.values():
            groups[part] = (lambda n, _, part=part: parts[n] == part, oc[key] if oc[key] is not None else oc["lr"])
    return groups


def _expert_loads(model) -> tuple[list, list[torch.Tensor]]:
    layers = [b.vision.moe for b in model.layers.values() if b.vision.kind == "moe"]
    return layers, [m.tokens_per_expert.clone() for m in layers]


# ----------------------------------------------------------------------------- training
def train(config: str | Path | Mapping, out: str | Path, sets: list[str] | None = None,
          stop_after: int | None = None) -> dict:
    """Train (or resume) into `out`. `stop_after` ends the run early at that step with a checkpoint,
    as an interruption would, without changing the schedule (which follows train.steps). One writer
    per run folder: a second training on the same `out` is refused (`LockHeld`)."""
    import os

    from distill.io import lock_run_folder

    cfg = load_config(config, sets)
    require_data_root(cfg["data"])   # before the run folder is created
    out = Path(out)
    lock = lock_run_folder(out, "grounding training") if os.environ.get("RANK", "0") == "0" else None
    try:
        info = setup(cfg["train"]["device"])
        try:
            return _train(cfg, out, info, stop_after)
        finally:
            teardown(info)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: dict, out: Path, info, stop_after: int | None = None) -> dict:
    t_start = time.time()
    tc, oc = cfg["train"], cfg["optim"]
    out.mkdir(parents=True, exist_ok=True)
    seed = int(tc["seed"])
    train_data = load_split(cfg["data"], cfg["data"]["train_split"])
    if not train_data.examples:
        raise ValueError(f"no training expressions in split {cfg['data']['train_split']!r} under "
                         f"{cfg['data']['root']} ({train_data.missing_images} refs had missing images)")
    tok_dir = out / "tokenizer"
    if info.is_main:
        tok = build_tokenizer(cfg["tokenizer"], train_data.examples, tok_dir, cfg["lm"]["path"])
    barrier()
    if not info.is_main:
        tok = build_tokenizer(cfg["tokenizer"], train_data.examples, tok_dir, cfg["lm"]["path"])

    torch.manual_seed(seed)
    model, init_report, source = build_model(cfg, tok)
    check_text_lengths(train_data.examples, tok, model.config.max_text_len,
                       f"{cfg['data']['dataset']} {cfg['data']['train_split']}")
    for split in cfg["data"].get("eval_splits") or []:   # an eval split that cannot run is found now, too
        check_text_lengths(load_split(cfg["data"], split).examples, tok, model.config.max_text_len,
                           f"{cfg['data']['dataset']} {split}", extra_tokens=3)
    model.to(info.device)
    anchor = None
    if float(cfg["gram"].get("weight", 0.0)) > 0:
        if source is None:
            raise ValueError("gram.weight > 0 needs a student to anchor to; set init.kind to 'student' or "
                             "'official', or gram.weight=0 for a scratch run")
        anchor = AnchorFeatures(anchor_student(*source).to(info.device))

    freeze_parts(model, oc["freeze"])
    if tc["activation_checkpointing"]:
        apply_activation_checkpointing(model, model.checkpoint_blocks())
    fsdp = tc["parallel"] == "fsdp" and info.distributed
    ddp = data_parallel(model, info, tc["parallel"], model.shard_blocks() if fsdp else ())
    # after sharding: FSDP2 replaces the parameters the optimizer must hold
    optim = build_adamw(model.named_parameters(), oc["lr"], oc["weight_decay"], betas=oc["betas"],
                        lr_groups=rate_groups(model, oc))

    step = 0
    writer = ckpt.writer_token()
    guard = StepGuard(max_in_a_row=int(cfg["robustness"]["max_skipped_in_a_row"]),
                      spike_factor=cfg["robustness"]["grad_spike_factor"])
    metrics = MetricsWriter(out, enabled=info.is_main, tensorboard=False)
    latest = ckpt.latest_checkpoint(out)
    # the mask and lm sections and the newer optim keys enter only when used, so older runs still resume
    ident = {k: v for k, v in cfg.items()
             if k != "train" and not (k == "mask" and not v["weight"]) and not (k == "lm" and not v["path"])}
    ident["optim"] = {k: v for k, v in ident["optim"].items()
                      if not (k in ("freeze", "bridge_lr", "new_token_lr") and not v)}
    cfg_fp = fingerprint(ident | {"seed": seed})
    if latest is not None:
        state = ckpt.read_checkpoint(latest, info.rank)
        if state["trainer"].get("fsdp", False) != fsdp:
            raise ckpt.ResumeRefused(f"{latest} was written by a {'FSDP2' if not fsdp else 'DDP / single-process'} run; "
                                     f"resume it with the same train.parallel and number of processes")
        if state["trainer"].get("config_fingerprint") != cfg_fp:
            raise ckpt.ResumeRefused(f"{out} holds a checkpoint of a different config; use a new --out or delete "
                                     f"{ckpt.checkpoint_root(out)} to start over")
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, strict=True)
            set_model_state_dict(model, state["model"], options=opts)
            set_optimizer_state_dict(model, optim, state["optimizer"], options=opts)
        else:
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optimizer"])
        if state["rng"] is not None:
            ckpt.set_rng_state(*state["rng"])
        step = int(state["trainer"]["step"])
        guard.load_state_dict(state["trainer"].get("guard") or {})
        metrics.truncate_after(step)
        if info.is_main:
            print(f"[amoe ground] resumed from {latest.name} (step {step})", flush=True)
    if info.is_main:   # only now: a refused resume leaves the run's files as they were
        # paths relative to the run folder (no path of this machine; `load_run_config` reads them back)
        write_json_atomic(out / "config.json", portable(cfg, out))
        write_json_atomic(out / "vlm_config.json", portable(model.config.to_dict(), out))
        write_json_atomic(out / "data_report.json", portable({"train": train_data.report(), "init": init_report}, out))
        if train_data.missing_images:
            print(f"[amoe ground] {train_data.missing_images} of {train_data.refs} train refs skipped: image "
                  f"file missing (e.g. {train_data.missing_files[0]})", flush=True)

    total = int(tc["steps"])
    bs = int(tc["batch_size"])
    global_bs = bs * info.world_size
    n = len(train_data.examples)
    per_epoch = max(1, n // global_bs)
    cache = ImageCache(processor_from(cfg["data"], model.config.vision.spatial_patch_size))
    order_cache: dict[int, np.ndarray] = {}

    def batch_for(s: int):
        epoch, k = divmod(s, per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order_cache[epoch][(k * global_bs + info.rank * bs + np.arange(bs)) % n]
        return [train_data.examples[int(i)] for i in idx]

    bar = None
    if info.is_main and tc.get("progress", True):
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=f"ground {cfg['name']}", unit="step")
    model.train()
    last = {}
    t_log, tokens_log = time.time(), 0
    end = total if stop_after is None else min(total, int(stop_after))
    while step < end:
        examples = batch_for(step)
        images, ids, prompt_lens, kept = encode_batch(examples, tok, cache)
        if not images:
            raise TrainingAborted(f"no image of step {step + 1}'s batch decodes (first: {examples[0].image_path}); "
                                  f"{len(cache.unreadable)} unreadable so far: check the refer images")
        factor = warmup_cosine(step, total, int(oc["warmup_steps"]), float(oc["min_lr_ratio"]))
        for g in optim.param_groups:
            g["lr"] = g["base_lr"] * factor
        mask_w = float(cfg["mask"]["weight"])
        out_ = ddp(images, ids, mask_at=prompt_lens if mask_w > 0 else None, image_states=anchor is not None)
        ce_sum, n_tgt = target_loss(out_.logits, ids, prompt_lens)
        ce = ce_sum / n_tgt
        seg = torch.zeros((), device=info.device)
        if mask_w > 0:
            seg = torch.stack([mask_loss(lg, e.mask()) for lg, e in zip(out_.masks, kept)]).mean()
        w = gram_weight(step, cfg["gram"]) if anchor is not None else 0.0
        gram = torch.zeros((), device=info.device)
        if anchor is not None:
            gram = gram_anchoring_loss(out_.patch_features, anchor([e.image_path for e in kept], images))
        loss = ce + w * gram + mask_w * seg
        optim.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = all_reduce_sum({"loss": loss.detach().item()}, info.device)["loss"]  # one verdict for all ranks
        skipped, gnorm = guarded_step(optim, model.parameters(), loss_value, float(oc["grad_clip"]), guard)
        if skipped:
            metrics.event({"step": step + 1, "event": "step_skipped", "reason": skipped, "in_a_row": guard.in_a_row})
            if guard.exhausted:
                last = ckpt.latest_checkpoint(out)
                raise TrainingAborted(
                    f"{guard.in_a_row} skipped steps in a row (last at step {step + 1}: {skipped}); "
                    + (f"the last good checkpoint is {last}: resume from it with the same command and "
                       "--set optim.lr=... lower" if last else "no checkpoint yet: start again with a lower optim.lr"))
        layers, loads = _expert_loads(model)
        # frozen vision experts keep their router bias too
        if layers and float(oc["expert_bias_rate"]) > 0 and not skipped and "vision" not in oc["freeze"]:
            if info.distributed:
                stacked = torch.stack(loads)
                dist.all_reduce(stacked)
                loads = list(stacked)
            update_expert_bias(layers, loads, rate=float(oc["expert_bias_rate"]))
        step += 1
        tokens_log += sum(img.shape[1] * img.shape[2] // model.config.vision.spatial_patch_size ** 2
                          for img in images) + sum(len(t) for t in ids)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % int(tc["log_every"]) == 0 or step == total:
            red = all_reduce_sum({"ce": ce.detach().item(), "gram": gram.detach().item(), "mask": seg.detach().item(),
                                  "tokens": tokens_log}, info.device)
            dt = time.time() - t_log
            ws = info.world_size
            last = {"step": step, "loss": (red["ce"] + w * red["gram"] + mask_w * red["mask"]) / ws,
                    "ce": red["ce"] / ws, "gram": red["gram"] / ws, "gram_weight": w, "mask": red["mask"] / ws,
                    "lr": oc["lr"] * factor, "grad_norm": float(gnorm), "tokens_per_s": red["tokens"] / max(dt, 1e-9),
                    "count/unreadable_images": len(cache.unreadable)}
            metrics.write(last)
            t_log, tokens_log = time.time(), 0
        if (step % int(tc["checkpoint_every"]) == 0 or step == end) and not guard.in_a_row:
            _save(out, step, model, optim, cfg_fp, info, int(tc["keep"]), guard, writer, fsdp)
    if bar is not None:
        bar.close()
    metrics.close()
    summary = {"run": str(out), "steps": step, "last": last, "wall_s": round(time.time() - t_start, 2),
               "train": {**train_data.report(), "unreadable_images": cache.unreadable_report(cfg["data"]["root"])[:20]},
               "init": init_report}
    if info.is_main:
        write_json_atomic(out / "train_summary.json", portable(summary, out))
    return summary


def _save(out: Path, step: int, model, optim, cfg_fp: str, info, keep: int, guard: StepGuard, writer: str,
          fsdp: bool) -> None:
    if fsdp:   # the full (unsharded) state, gathered to the CPU of the main rank
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optim, options=opts)
    else:
        model_sd, optim_sd = model.state_dict(), optim.state_dict()
    trainer = {"step": step, "config_fingerprint": cfg_fp, "world_size": info.world_size, "guard": guard.state_dict()}
    if fsdp:
        trainer["fsdp"] = True     # its optimizer state is keyed by parameter names: resumed only by FSDP2
    ckpt.save_checkpoint(out, step, writer, model_sd, optim_sd, trainer, keep, info.rank, info.is_main)


# ----------------------------------------------------------------------------- loading a trained run
class NotARunError(AmoeError, FileNotFoundError):
    """A folder given as a grounding run is not one (or has no finished checkpoint yet)."""


RUN_PATHS = (("data", "root"), ("init", "path"), ("lm", "path"), ("tokenizer", "path"))


def load_run_config(run_dir: str | Path) -> dict:
    """The config a run was trained with (RUN/config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise NotARunError(f"{run_dir} is not a grounding run (no config.json); train one with "
                           "`amoe ground train CONFIG --out DIR`")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NotARunError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None
    for section, key in RUN_PATHS:   # written relative to the run folder
        if isinstance(cfg.get(section, {}).get(key), str):
            cfg[section][key] = resolve_spec(cfg[section][key], run_dir)
    return cfg


def build_vlm(config: VLMConfig) -> torch.nn.Module:
    """The grounding VLM of a saved config, weights not loaded: the scratch text side (`GroundingVLM`) or
    a pretrained LM's (`LMGroundingVLM`, its architecture from the config alone)."""
    if config.text == "lm":
        from .lm import LMGroundingVLM
        return LMGroundingVLM(config)
    return GroundingVLM(config)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, config) of a run folder, weights from its latest checkpoint."""
    from distill.io import load_tensors

    from .tokenizer import GroundingTokenizer

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise NotARunError(f"{run_dir} has no finished checkpoint yet (checkpoints/latest.json); train it first")
    tok = GroundingTokenizer.load(run_dir / "tokenizer", int(cfg["tokenizer"]["bins"]))
    model = build_vlm(VLMConfig.from_dict(json.loads((run_dir / "vlm_config.json").read_text())))
    model.load_state_dict(load_tensors(latest / "model.safetensors"))
    model.to(device).eval()
    return model, tok, cfg, latest
