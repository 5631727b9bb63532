"""`amoe distill RECIPE --plan --world-size N`: what one rank of a run holds, before any GPU is rented.

Device memory (`per_rank_peak_bytes`, what must fit in the accelerator):
- the student's parameters, gradients and AdamW state, counted from the real `Student` built on the
  meta device, and placed per `engine.parallel`: FSDP2 (`fully_shard` per block + root) keeps a
  1/N shard of each, plus the unsharded parameters and gradients of the blocks in flight (the current
  block and the prefetched one); DDP keeps everything whole, plus its gradient buckets;
- the student's activations at `C_max x seqs_per_rank` tokens, with and without activation
  checkpointing. Measured, not guessed: a forward of the real student (its recipe config) on a probe
  sequence, under bf16 autocast when the run uses it, counting every tensor autograd saves
  (`torch.autograd.graph.saved_tensors_hooks`), per block. The probe runs the dense SDPA path; the
  (L, L) attention probabilities it saves are left out and FlexAttention's log-sum-exp added, since
  the fused kernel saves no scores. Bytes per token are linear in tokens, so they scale to C_max.
  With checkpointing a block keeps only its input, and one block's activations live while it is
  recomputed;
- each teacher: its weights (from its config: a local folder's own `config.json`, or for the paper's
  hub ids the architecture in `PAPER_TEACHERS`, built on the meta device from the transformers class)
  in the run's teacher dtype, and an estimate of its no-grad forward's largest live tensors;
- PHI-S: per teacher and kind, the (C, C) float32 transform and its inverse.
Host memory per rank (`host_per_rank_bytes`): the pool columns and sampler (26 bytes per item,
measured by `amoe distill perf --bench pool`), and the input pipeline's steps in flight (workers x
prefetch + 1 steps of float32 pixels, one stream per student and teacher). The index pages each rank
maps (24 bytes per item) are page cache shared by a node's ranks, listed apart.

Estimates are marked as such in the JSON (`estimated`); everything else is counted from real objects.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

GiB = 2 ** 30
POOL_BYTES_PER_ITEM = 26        # pool columns 18 + sampler counts 4 + permutation 4 (perf --bench pool)
INDEX_PAGE_BYTES_PER_ITEM = 24  # entries.npy record, mapped from the page cache
FSDP_BLOCKS_IN_FLIGHT = 2       # the block being computed and the one prefetched

# The paper teachers' architectures, from their public config.json files (a plan never downloads).
PAPER_TEACHERS = {
    "google/siglip2-so400m-patch16-naflex": ("siglip2", {
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "patch_size": 16, "num_patches": 256},
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                        "num_attention_heads": 16, "vocab_size": 256000, "max_position_embeddings": 64,
                        "projection_size": 1152}}),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": ("dinov3", {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "patch_size": 16, "num_register_tokens": 4}),
}


def _teacher_model(spec: str):
    """(kind, source, transformers model on the meta device, how its config was found)."""
    from transformers import AutoConfig, AutoModel, DINOv3ViTConfig, DINOv3ViTModel, Siglip2Config, Siglip2Model

    from distill.encoders.registry import parse_spec

    try:
        kind, source, _ = parse_spec(spec)     # an unknown kind raises here, listing the known ones
    except FileNotFoundError:                  # a folder that is not on this machine
        kind, source = None, spec
    with torch.device("meta"):
        if source and (Path(source).expanduser() / "config.json").is_file():
            return kind, source, AutoModel.from_config(AutoConfig.from_pretrained(source)), "local config.json"
        if source in PAPER_TEACHERS:
            k, cfg = PAPER_TEACHERS[source]
            model = Siglip2Model(Siglip2Config(**cfg)) if k == "siglip2" else DINOv3ViTModel(DINOv3ViTConfig(**cfg))
            return kind, source, model, "distill.train.memory_plan.PAPER_TEACHERS"
    raise ValueError(f"teacher {spec!r}: no config to plan from; name a local model folder with its "
                     f"config.json (--set teachers=DIR for the mini-world recipes) or one of {sorted(PAPER_TEACHERS)}")


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def count_saved_bytes(fn, exclude=()) -> int:
    """Run `fn(total)` under a hook recording every tensor autograd saves (once per storage; attention
    scores and the storages of the `exclude` tensors, e.g. parameters already counted as weights, left
    out); `total()` gives the bytes recorded so far. Returns the bytes recorded in all."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if not _is_scores(t) and t.untyped_storage().data_ptr() not in skip:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(lambda: sum(seen.values()))
    return sum(seen.values())


def _is_scores(t: torch.Tensor) -> bool:
    # attention probabilities (..., L, L) or with the sink column (..., L, L + 1): a fused kernel saves none
    return t.dim() >= 3 and t.shape[-2] >= 16 and t.shape[-1] in (t.shape[-2], t.shape[-2] + 1)


def _probe(model, images, autocast_bf16: bool) -> tuple[list[int], int]:
    """Saved bytes of each block and of the rest of one forward_packed over `images` (one sequence)."""
    marks: list[int] = []
    tokens = sum(model.config.n_prefix_tokens + (im.shape[1] // model.config.spatial_patch_size)
                 * (im.shape[2] // model.config.spatial_patch_size) for im in images)

    def run(total):
        hooks = []
        for block in model.layers.values():
            hooks.append(block.register_forward_pre_hook(lambda m, a: marks.append(total())))
            hooks.append(block.register_forward_hook(lambda m, a, o: marks.append(total())))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        try:
            with ctx:
                model.forward_packed(images, max_tokens=tokens, max_images_per_seq=len(images))
        finally:
            for h in hooks:
                h.remove()

    total = count_saved_bytes(run)
    per_block = [b - a for a, b in zip(marks[0::2], marks[1::2])]
    return per_block, total - sum(per_block)


def student_activations(config, tokens_per_rank: int, autocast_bf16: bool, probe_side: int = 256) -> dict:
    """Measured saved-activation bytes of the real student, as (fixed + per token) fitted on probes of
    one and two images, scaled to `tokens_per_rank` tokens. The fixed part is mostly bf16 copies of
    the weights, which autocast keeps for backward."""
    from distill.student import Student

    torch.manual_seed(0)
    model = Student(config, attention_backend="sdpa", expert_backend="loop")   # CPU autocast covers the loop
    model.train()
    p = model.config.spatial_patch_size
    side = probe_side // p * p
    per_image = model.config.n_prefix_tokens + (side // p) ** 2
    with warnings.catch_warnings():      # CPU autocast: "mismatch dtype ... cannot dispatch to fused"
        warnings.simplefilter("ignore", UserWarning)
        (b1, r1), (b2, r2) = (_probe(model, [torch.randn(3, side, side) for _ in range(n)], autocast_bf16)
                              for n in (1, 2))
    lse = model.config.n_heads * 4            # FlexAttention's own saved log-sum-exp, float32 per head
    slope = [(y - x) / per_image + lse for x, y in zip(b1, b2)]          # bytes per token, per block
    fixed = [x - (s - lse) * per_image for x, s in zip(b1, slope)]       # bytes per block at any size
    rest_slope, rest_fixed = (r2 - r1) / per_image, r1 - (r2 - r1)
    n_layers = len(slope)
    residual = 4 * model.config.dim          # a checkpointed block keeps its input: the fp32 residual stream
    T = tokens_per_rank
    no_ckpt = sum(fixed) + sum(slope) * T + rest_fixed + rest_slope * T
    biggest = max(range(n_layers), key=lambda i: fixed[i] + slope[i] * T)
    ckpt = sum(fixed) + n_layers * residual * T + slope[biggest] * T + rest_fixed + rest_slope * T
    return {"probe_tokens": [per_image, 2 * per_image], "probe_autocast_bf16": autocast_bf16,
            "n_layers": n_layers, "bytes_per_token_per_block": round(max(slope), 1),
            "fixed_bytes_per_block": int(max(fixed)), "bytes_per_token_outside_blocks": round(rest_slope, 1),
            "without_checkpointing": int(no_ckpt), "with_checkpointing": int(ckpt)}


def plan_recipe(cfg, world_size: int, pool_images: int = 0, gpu_gib: float = 80.0,
                host_gib_per_rank: float = 128.0, measure_activations: bool = True) -> dict:
    from distill.student import Student

    if world_size < 1:
        raise ValueError("--world-size must be >= 1")
    e, b, d = cfg.engine, cfg.batching, cfg.data
    on_gpu = e.device in ("auto", "cuda")
    bf16 = on_gpu and e.precision in ("auto", "bf16") or e.precision == "bf16"
    N = world_size

    with torch.device("meta"):
        student = Student(cfg.student.config)
    P = _numel(student.parameters())
    block = max(_numel(bl.parameters()) for bl in student.layers.values())
    sharded = e.parallel == "fsdp" and N > 1
    if sharded:
        params = 4 * P / N + FSDP_BLOCKS_IN_FLIGHT * 4 * block
        grads = 4 * P / N + FSDP_BLOCKS_IN_FLIGHT * 4 * block
        optim = 8 * P / N
    else:
        params, grads, optim = 4 * P, 4 * P + (4 * P if e.parallel == "ddp" and N > 1 else 0), 8 * P
    tokens = b.max_tokens * (b.seqs_per_rank if b.mode == "packed" else b.images_per_rank)

    teachers, phis, target_bytes = {}, {}, 0
    teacher_dtype = 2 if on_gpu else 4
    for t in cfg.teachers:
        kind, source, model, origin = _teacher_model(t.spec)
        n = _numel(model.parameters())
        vc = getattr(model.config, "vision_config", model.config)
        width, inter = int(vc.hidden_size), int(vc.intermediate_size)
        # the largest live tensors of a no-grad block: its input, qkv, the MLP's hidden layer
        live = tokens * (2 * width + 3 * width + inter) * teacher_dtype
        teachers[t.name] = {"source": source, "config_from": origin, "params": n,
                            "weights_bytes": n * teacher_dtype, "forward_peak_bytes": live,
                            "estimated": ["forward_peak_bytes"]}
        target_bytes += 2 * tokens * width * 4    # float32 targets and the student's predictions for them
        kinds = 3 if int(getattr(model.config, "num_register_tokens", 0) or 0) else 2
        phis[t.name] = kinds * 2 * width * width * 4 if cfg.phis.enabled else 0

    acts = student_activations(cfg.student.config, tokens, bf16) if measure_activations else None
    act_bytes = (acts["with_checkpointing"] if e.activation_checkpointing else acts["without_checkpointing"]) \
        if acts else 0
    device = {"student_params": int(params), "student_grads": int(grads), "optimizer_adamw": int(optim),
              "activations": int(act_bytes), "targets": int(target_bytes),
              "teachers": int(sum(v["weights_bytes"] + v["forward_peak_bytes"] for v in teachers.values())),
              "phis": int(sum(phis.values()))}
    peak = sum(device.values())
    steps_in_flight = d.workers * d.prefetch + 1 if d.workers else 1
    step_pixels = tokens * 3 * 16 * 16 * 4 * (1 + len(cfg.teachers))
    host = {"pool_and_sampler": POOL_BYTES_PER_ITEM * pool_images, "input_pipeline": steps_in_flight * step_pixels}
    host_total = sum(host.values())
    return {
        "recipe": cfg.name, "world_size": N, "parallel": e.parallel, "activation_checkpointing":
            e.activation_checkpointing, "bf16": bf16, "tokens_per_rank_step": tokens, "pool_images": pool_images,
        "student": {"config": cfg.student.config if isinstance(cfg.student.config, str) else "inline",
                    "params": P, "largest_block_params": block, "activations": acts},
        "teachers": teachers, "phis_bytes": phis,
        "device_bytes": device, "per_rank_peak_bytes": int(peak),
        "device_budget_bytes": int(gpu_gib * GiB), "device_headroom_bytes": int(gpu_gib * GiB - peak),
        "fits_device": peak <= gpu_gib * GiB,
        "host_bytes": host, "host_per_rank_bytes": int(host_total),
        "host_budget_bytes": int(host_gib_per_rank * GiB), "fits_host": host_total <= host_gib_per_rank * GiB,
        "shared_page_cache_bytes_per_node": INDEX_PAGE_BYTES_PER_ITEM * pool_images,
        "advice": [],
        "estimated": ["teachers.*.forward_peak_bytes", "device_bytes.targets",
                      "host_bytes.input_pipeline (float32 pixels, 16 px patches)"],
    }


def advice(plan: dict) -> list[str]:
    """What overflows, by how much, and which settings move it (empty when the plan fits)."""
    out = []
    if not plan["fits_device"]:
        d = plan["device_bytes"]
        top = sorted(d.items(), key=lambda kv: -kv[1])[:3]
        out.append(f"device overflows by {(plan['per_rank_peak_bytes'] - plan['device_budget_bytes']) / GiB:.1f} GiB "
                   f"per rank; largest: " + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in top))
        acts = plan["student"]["activations"] or {}
        if not plan["activation_checkpointing"] and acts:
            out.append(f"set engine.activation_checkpointing=true (activations {acts['without_checkpointing'] / GiB:.1f}"
                       f" -> {acts['with_checkpointing'] / GiB:.1f} GiB)")
        if plan["parallel"] != "fsdp":
            out.append("set engine.parallel=fsdp to shard parameters, gradients and optimizer state over the ranks")
        else:
            out.append("more ranks (--world-size) shrink the FSDP shards of the student state")
        out.append(f"lower batching.max_tokens (C_max) or batching.seqs_per_rank: activations and targets scale "
                   f"with the {plan['tokens_per_rank_step']} tokens per rank-step")
    if not plan["fits_host"]:
        out.append(f"host overflows by {(plan['host_per_rank_bytes'] - plan['host_budget_bytes']) / GiB:.1f} GiB per "
                   "rank; fewer data.workers or data.prefetch shrink the input pipeline's steps in flight, a smaller "
                   "pool (a curated manifest) the pool columns")
    return out


def format_plan(plan: dict) -> str:
    g = lambda v: f"{v / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"memory plan: {plan['recipe']} on {plan['world_size']} ranks ({plan['parallel']}, activation "
             f"checkpointing {'on' if plan['activation_checkpointing'] else 'off'}, "
             f"{plan['tokens_per_rank_step']} tokens per rank-step)", "device, per rank:"]
    lines += [f"  {k:18s} {g(v)}" for k, v in plan["device_bytes"].items()]
    acts = plan["student"]["activations"]
    if acts:
        lines.append(f"    (activations without checkpointing {g(acts['without_checkpointing']).strip()}, "
                     f"with {g(acts['with_checkpointing']).strip()})")
    lines.append(f"  {'peak':18s} {g(plan['per_rank_peak_bytes'])}  of {g(plan['device_budget_bytes']).strip()}: "
                 + ("fits, " if plan["fits_device"] else "DOES NOT FIT, ")
                 + f"headroom {g(plan['device_headroom_bytes']).strip()}")
    lines.append("host, per rank:")
    lines += [f"  {k:18s} {g(v)}" for k, v in plan["host_bytes"].items()]
    lines.append(f"  {'total':18s} {g(plan['host_per_rank_bytes'])}  of {g(plan['host_budget_bytes']).strip()}: "
                 + ("fits" if plan["fits_host"] else "DOES NOT FIT"))
    return "\n".join(lines)
