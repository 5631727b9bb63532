"""`amoe distill perf`: training throughput of token-balanced packing vs the padded baseline.

Both modes train the same student on the same mixed-resolution images with the same token budget
per step (packed: `seqs` sequences of C_max tokens; padded: as many images as fit when each is
padded to the step's longest image). Teacher cost is excluded: targets are fixed random tensors, so
the figure isolates what batching changes (student forward + backward + the trainer's guarded AdamW
step; `guard_pct` is the guard's own share of the step: gradient norm and verdict).
Reported tokens/s counts real (non-padding) tokens, prefix tokens (CLS + registers) included.
"""
from __future__ import annotations

import math
import os
import time

import torch

from distill import losses as L
from distill.train.batching import TokenBalancedSampler
from distill.train.guard import StepGuard, guarded_step


def _images(n: int, sides: list[int], patch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h = sides[int(torch.randint(len(sides), (1,), generator=g))]
        w = sides[int(torch.randint(len(sides), (1,), generator=g))]
        out.append(torch.rand(3, h, w, generator=g) * 2 - 1)
    return out


def _train_step(model, opt, images, sequences, cap, dims, targets, guard, device) -> dict:
    """One trainer step on given targets: packed forward, every teacher's loss, backward, guarded AdamW."""
    out = model(images, sequences, cap, 16)
    batch = L.GlobalBatch(len(images), 1)
    loss = 0.0
    for h in dims:
        pred = L.StudentPredictions(out["summary"][h].float(), [x.float() for x in out["patches"][h]])
        tgt = L.TeacherTargets(torch.stack(targets[h][0]).to(device), [t.to(device) for t in targets[h][1]])
        lt, _ = L.teacher_loss(pred, tgt, L.TeacherLossWeights(relational="arkd"), batch, "mean")
        loss = loss + lt
    opt.zero_grad(set_to_none=True)
    loss.backward()
    timing: dict = {}
    guarded_step(opt, model.parameters(), loss.item(), 0.0, guard, timing)   # as the trainer steps
    return timing


def _input_pipeline(model, opt, prefix, patch, max_tokens, seqs, steps, warmup, dims, device, seed,
                    workers) -> dict:
    """The input pipeline at this perf config: one worker's images/s at 256 and 768 px (decode, student
    resize, both paper teachers' real preprocessing), and the share of step time the packed training
    step waits for `workers` loader processes feeding it 256 px JPEGs (smaller if C_max is)."""
    import tempfile
    from pathlib import Path

    from distill.train.input_perf import jpeg_pool, paper_teacher_preprocessing, worker_rate
    from distill.train.inputs import step_inputs

    prepare = paper_teacher_preprocessing()
    out = {"workers": workers, "teachers_preprocessed": sorted(prepare), "images_per_s_per_worker": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for res in (256, 768):
            pool, size = jpeg_pool(Path(tmp) / f"r{res}", res, 48, patch)
            sampler = TokenBalancedSampler(pool.tokens + prefix, world_size=1, seed=seed, max_tokens=8192,
                                           max_images_per_seq=64)
            rate, _ = worker_rate(pool, prepare, sampler, 48)
            out["images_per_s_per_worker"][str(res)] = {"rate": round(rate, 1), "source_wh": list(size)}
        # 256 px, or the largest side whose square fits one sequence of this C_max
        side = min(256, patch * math.isqrt(max(1, max_tokens - prefix)))
        pool, _ = jpeg_pool(Path(tmp) / "train", side, 96, patch)
        sampler = TokenBalancedSampler(pool.tokens + prefix, world_size=1, seed=seed, max_tokens=max_tokens,
                                       seqs_per_rank=seqs)
        loader = iter(step_inputs(pool, sampler, 0, prepare, workers=workers, prefetch=2))
        g = torch.Generator().manual_seed(seed + 2)
        guard = StepGuard(spike_factor=None)
        wait = total = 0.0
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            inputs = next(loader)
            t1 = time.perf_counter()
            images = inputs.pixels.to(device)
            grids = [(im.shape[1] // patch) * (im.shape[2] // patch) for im in images]
            targets = {h: ([torch.randn(dims[h], generator=g) for _ in images],
                           [torch.randn(n, dims[h], generator=g) for n in grids]) for h in dims}
            _train_step(model, opt, images, inputs.sequences, max_tokens, dims, targets, guard, device)
            if device != "cpu":
                torch.cuda.synchronize()
            if step >= warmup:          # the first step includes the workers' start-up
                wait += t1 - t0
                total += time.perf_counter() - t0
        del loader
    out.update({"train_side_px": side, "steps": steps, "step_s": round(total / steps, 3), "data_wait_fraction": round(wait / total, 4),
                "goal_wait_fraction": 0.05})
    return out


def run_perf(student_config="moe-cpu-small", max_tokens: int = 1024, seqs: int = 2, steps: int = 4,
             warmup: int = 1, sides: tuple[int, ...] = (64, 96, 128, 192, 256), n_images: int = 256,
             seed: int = 0, device: str = "cpu", grow_max_tokens: bool = False, workers: int | None = 2) -> dict:
    from distill.student import Student
    from distill.train.engine import PackedStudent

    torch.manual_seed(seed)
    student = Student.from_config(student_config).to(device)
    student.init_weights()
    model = PackedStudent(student, ["siglip2", "dinov3"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    p = student.config.spatial_patch_size
    prefix = student.n_prefix
    images = _images(n_images, [s for s in sides if s % p == 0], p, seed)
    counts = [prefix + (im.shape[1] // p) * (im.shape[2] // p) for im in images]
    if max(counts) > max_tokens:
        if not grow_max_tokens:
            raise ValueError(f"the largest image has {max(counts)} tokens > max_tokens={max_tokens}")
        max_tokens = max(counts)
    dims = dict(zip(student.config.teachers, student.config.teachers_dim))
    g = torch.Generator().manual_seed(seed + 1)
    targets = {h: ([torch.randn(dims[h], generator=g) for _ in images],
                   [torch.randn(c - prefix, dims[h], generator=g) for c in counts]) for h in dims}
    budget = seqs * max_tokens
    padded_images = max(1, budget // max(counts))
    results = {}
    for mode in ("packed", "padded"):
        sampler = TokenBalancedSampler(counts, world_size=1, seed=seed, mode=mode, max_tokens=max_tokens,
                                       seqs_per_rank=seqs, images_per_rank=padded_images)
        real = reserved = 0
        elapsed = guard_s = 0.0
        guard = StepGuard(spike_factor=None)
        for step in range(warmup + steps):
            plan = sampler.next_step()
            idx = plan.images(0)       # may repeat an image across an epoch boundary: index by position
            sequences, pos = [], 0
            for s in plan.ranks[0]:
                sequences.append(list(range(pos, pos + len(s))))
                pos += len(s)
            cap = plan.capacity
            t0 = time.perf_counter()
            step_targets = {h: ([targets[h][0][i] for i in idx], [targets[h][1][i] for i in idx]) for h in dims}
            timing = _train_step(model, opt, [images[i].to(device) for i in idx], sequences, cap, dims,
                                 step_targets, guard, device)
            if device != "cpu":
                torch.cuda.synchronize()
            if step >= warmup:
                elapsed += time.perf_counter() - t0
                guard_s += timing["guard_s"]
                real += plan.real_tokens()
                reserved += plan.reserved_tokens()
        results[mode] = {"tokens_per_s": real / elapsed, "fill_ratio": real / reserved,
                         # the guarded step's own cost (grad norm + verdict), in percent of step time
                         "guard_pct": round(100.0 * guard_s / elapsed, 3),
                         "real_tokens": real, "reserved_tokens": reserved, "seconds": elapsed,
                         "images_per_step": (padded_images if mode == "padded" else None)}
    pipeline = _input_pipeline(model, opt, prefix, p, max_tokens, seqs, steps, warmup, dims, device, seed,
                               workers) if workers is not None else None
    return {"benchmark": "distill-batching", "student": student_config if isinstance(student_config, str)
            else "custom", "device": device, "threads": torch.get_num_threads(), "max_tokens": max_tokens,
            "sequences_per_step": seqs, "token_budget_per_step": budget, "steps": steps,
            "image_sides": list(sides), "max_tokens_used": max_tokens, "packed": results["packed"], "padded": results["padded"],
            "speedup_tokens_per_s": results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"],
            # token-wise layers gain at most the fill-ratio quotient (attention on padding is skipped by
            # the per-segment backend in both layouts, so it adds nothing to the bound here)
            "speedup_bound": results["packed"]["fill_ratio"] / results["padded"]["fill_ratio"],
            "attention_backend": "segments" if device == "cpu" else "auto",
            "input_pipeline": pipeline,
            "load_average_1min": round(os.getloadavg()[0], 2)}
