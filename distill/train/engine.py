"""The distillation engine: one training loop for 1 process or many (torchrun; DDP or FSDP2).

Per step, on every rank:
  1. the token-balanced sampler plans this rank's sequences (same plan computed on every rank);
  2. images are decoded (corrupt ones dropped and counted), resized to their planned native size and
     preprocessed for each teacher, ahead of time in DataLoader workers (distill.train.inputs);
  3. frozen teachers produce targets (PHI-S standardised, patch grids aligned to the student's);
  4. the student runs packed (images of a sequence attend only to themselves), per-teacher losses are
     computed with global normalisation (distill.losses), backward, clip, AdamW step, LR schedule;
  5. the aux-loss-free MoE bias update uses the expert loads all-reduced over ranks;
  6. metrics (JSONL, TensorBoard) and, every `checkpoint.every_steps`, an atomic checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from distill import losses as L
from distill.config import ConfigError
from distill.distributed import DistInfo, all_reduce_sum, barrier, setup, teardown
from distill.io import fingerprint, portable, write_json_atomic
from distill.train import checkpoint as ckpt
from distill.train.batching import SamplerStateError, TokenBalancedSampler
from distill.train.checkpoint import ResumeRefused
from distill.train.config import TrainConfig
from distill.train.guard import StepGuard, TrainingAborted, guarded_step, require_finite
from distill.train.inputs import StepInputs, step_inputs
from distill.train.metrics import MetricsWriter
from distill.train.optim import build_adamw, exempt_from_decay
from distill.train.parallelize import apply_activation_checkpointing, data_parallel
from distill.train.schedule import warmup_cosine
from distill.train.pool import TrainingPool, read_image


# keys a resume may change (recorded in OUT/history.jsonl): what the abort message suggests changing
RESUME_MAY_CHANGE = ("optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.schedule", "optim.grad_clip",
                     "robustness.max_skipped_in_a_row", "robustness.grad_spike_factor",
                     "data.workers", "data.prefetch", "target_cache.shared")
_UNFINGERPRINTED = ("steps", "checkpoint", "logging", "description")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- student wrapper
class PackedStudent(nn.Module):
    """Routes the packed forward through `forward` so DDP / FSDP2 hooks see it, and returns plain
    tensors per head: summary (N, C), patches (list of (L_i, C)), registers (N, R, C)."""

    def __init__(self, student: nn.Module, heads: list[str]):
        super().__init__()
        self.student = student
        self.heads = heads

    def forward(self, images: list[torch.Tensor], sequences: list[list[int]], max_tokens: int,
                max_images: int) -> dict[str, Any]:
        from distill.student import PackingPlan

        counts = [self.student.n_prefix + (im.shape[1] // self.patch) * (im.shape[2] // self.patch)
                  for im in images]
        plan = PackingPlan(sequences=sequences, token_counts=counts, max_tokens=max_tokens, max_images=max_images)
        outs = self.student.forward_packed(images, max_tokens=max_tokens, max_images_per_seq=max_images, plan=plan)
        res: dict[str, Any] = {"summary": {}, "patches": {}, "registers": {}}
        for h in self.heads:
            res["summary"][h] = torch.cat([o.summary_features[h] for o in outs])
            res["patches"][h] = [o.patch_features[h][0] for o in outs]
            if h in outs[0].register_features:
                res["registers"][h] = torch.cat([o.register_features[h] for o in outs])
        return res

    @property
    def patch(self) -> int:
        return self.student.config.spatial_patch_size


# ----------------------------------------------------------------------------- the trainer
class Distiller:
    """Owns model, teachers, optimiser, sampler and outputs of one run in `out_dir`.

    `student` / `teachers` may be injected (tests, notebooks); otherwise they are built from the
    config through `distill.student.Student` and `distill.encoders.registry.load_encoder`.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike, *, student: nn.Module | None = None,
                 teachers: dict | None = None, info: DistInfo | None = None, resume: bool = True):
        self.out = Path(out_dir)
        self.cfg = cfg.resolve_paths(self.out)
        self.info = info or setup(self.cfg.engine.device, self.cfg.engine.backend)
        self.device = self.info.device
        self.writer = ckpt.writer_token()   # names this run's checkpoint staging folders
        torch.manual_seed(self.cfg.seed + 1000 * self.info.rank)
        self.out.mkdir(parents=True, exist_ok=True)
        self.counters = {"corrupt_images": 0, "skipped_steps": 0}
        self.guard = StepGuard(max_in_a_row=self.cfg.robustness.max_skipped_in_a_row,
                               spike_factor=self.cfg.robustness.grad_spike_factor)
        self.step = 0

        self._build_data()
        self._build_teachers(teachers)
        self._build_student(student)
        self._check_widths()
        self._fit_phis()
        self._build_optimizer()
        self.metrics = MetricsWriter(self.out, enabled=self.info.is_main,
                                     tensorboard=self.cfg.logging.tensorboard)
        if self.phis_origin:
            self.metrics.event({"step": self.step, "event": "phis", "origin": self.phis_origin})
        if resume:
            self._maybe_resume()
        if self.info.is_main:   # only now: a refused resume leaves the run's config.json as it was
            write_json_atomic(self.out / "config.json", portable(self.cfg.to_json(), self.out))

    # ------------------------------------------------------------------ construction
    def _build_data(self) -> None:
        c = self.cfg
        self.pool = TrainingPool(c.data.sources, c.data.patch_size, c.seed, index_dir=self.out / "index",
                                 rank=self.info.rank, world_size=self.info.world_size, barrier=barrier)
        self.counters["corrupt_images"] += self.pool.corrupt_at_index
        self._prefix = None  # set once the student is known (CLS + registers per image)

    def _make_sampler(self) -> None:
        c = self.cfg.batching
        self.sampler = TokenBalancedSampler(
            self.pool.tokens + self._prefix, world_size=self.info.world_size, seed=self.cfg.seed, mode=c.mode,
            max_tokens=c.max_tokens, max_images_per_seq=c.max_images_per_seq,
            seqs_per_rank=c.seqs_per_rank, images_per_rank=c.images_per_rank, lookahead=c.lookahead)
        self._reset_inputs()

    def _reset_inputs(self) -> None:
        """Restart the input pipeline from the sampler's state (at start and after a resume). The
        pipeline plans ahead; checkpoints save the state of the last step consumed, in `_consumed`."""
        self._inputs = None
        self._consumed = self.sampler.state_dict()

    def _next_inputs(self) -> StepInputs:
        if self._inputs is None:
            d = self.cfg.data
            self._inputs = iter(step_inputs(self.pool, self.sampler, self.info.rank,
                                            {n: r.prepare for n, r in self.teachers.items()},
                                            workers=d.workers, prefetch=d.prefetch))
        inputs = next(self._inputs)
        self._consumed = inputs.ticket.state
        return inputs

    def _build_teachers(self, injected: dict | None) -> None:
        from distill.train.targets import TeacherRunner, load_teacher

        cache, shared = None, None
        if self.cfg.target_cache.enabled:
            cache = self.cfg.target_cache.dir or str(self.out / "target_cache")
            shared = self.cfg.target_cache.shared
            if shared is not None and not Path(shared).is_dir():
                raise ConfigError(f"target_cache.shared: '{shared}' is not a folder; point it at another run's "
                                  "OUT/target_cache (of the same teachers), or drop the key")
        self.teachers: dict[str, TeacherRunner] = {}
        for t in self.cfg.teachers:
            if injected is not None:
                if t.name not in injected:
                    raise KeyError(f"teacher '{t.name}' of the recipe was not provided")
                self.teachers[t.name] = TeacherRunner(t.name, injected[t.name], t.head or t.name, t.resolution,
                                                      cache, shared)
            else:
                self.teachers[t.name] = load_teacher(t, self.device, cache, shared)
        self.weights = {t.name: L.TeacherLossWeights(
            weight=t.weight, summary=t.summary_weight, patch=t.patch_weight, register=t.register_weight,
            relational=t.relational, relational_weight=t.relational_weight, smooth_l1_beta=t.smooth_l1_beta)
            for t in self.cfg.teachers}

    def _teacher_widths(self) -> dict[str, int]:
        """Probe each teacher once on an image of the pool to learn its output width (the first one that
        decodes: a corrupt first image is skipped and counted like any other)."""
        for i in range(min(256, len(self.pool))):
            item = self.pool.item(i)
            try:
                img = read_image(item.entry)
                break
            except Exception:  # undecodable despite a valid header
                self.counters["corrupt_images"] += 1
        else:
            raise TrainingAborted("none of the pool's first 256 images decodes; check the pool shards")
        self._probe = {n: r.raw([img], [item.entry.key], [item.resolution])[0]   # a cached output serves too
                       for n, r in self.teachers.items()}
        return {n: int(o.summary.shape[-1]) for n, o in self._probe.items()}

    def _build_student(self, injected: nn.Module | None) -> None:
        self.teacher_widths = self._teacher_widths()
        if injected is None:
            from distill.student import Student

            spec = self.cfg.student.config
            if isinstance(spec, dict) and "teachers_dim" not in spec:
                # recipe leaves the adapter widths to the teachers it is distilled from
                names = spec.get("teachers", ["siglip2", "dinov3"])
                spec = dict(spec, teachers=list(names), teachers_dim=[self.teacher_widths[n] for n in names])
            # identical initial weights on every rank (FSDP2 does not broadcast them like DDP does):
            # module constructors draw from the global RNG, so seed it with the run seed, not the rank's
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                student = Student.from_config(spec)
                g = torch.Generator().manual_seed(self.cfg.seed)
                student.init_weights(g) if _accepts_generator(student.init_weights) else student.init_weights()
            if self.cfg.student.init_from:
                self._load_init(student, self.cfg.student.init_from)
        else:
            student = injected
        self.student = student.to(self.device)
        # kept in release checkpoints for key compatibility but never used in forward: freeze it so
        # the optimiser holds no state for it (and resuming finds state for every trained parameter)
        unused = getattr(self.student, "layer_norm_dinov3", None)
        if unused is not None:
            unused.requires_grad_(False)
        self._prefix = int(self.student.n_prefix)
        self._make_sampler()
        model = PackedStudent(self.student, [t.name for t in self.cfg.teachers])
        e = self.cfg.engine
        def blocks() -> list[nn.Module]:   # after activation checkpointing: the wrapped blocks
            return list(self.student.layers.values()) if hasattr(self.student, "layers") else []
        if e.activation_checkpointing:
            apply_activation_checkpointing(self.student, blocks())
        if e.compile:
            self.student.forward_packed = torch.compile(self.student.forward_packed, dynamic=True)
        self.model = data_parallel(model, self.info, e.parallel, blocks())

    def _load_init(self, student: nn.Module, path: str) -> None:
        from distill.io import load_tensors

        p = Path(path)
        f = p / "model.safetensors" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"student.init_from={path}: no model.safetensors found")
        student.load_state_dict(load_tensors(f))

    def _check_widths(self) -> None:
        """A teacher whose width differs from the student's adapter, or a data patch size that is not
        the student's, fails here, before step 1."""
        patch = self.student.config.spatial_patch_size
        if patch != self.cfg.data.patch_size:
            raise ConfigError(f"data.patch_size is {self.cfg.data.patch_size} but the student's patch is "
                              f"{patch}; set both to the same value (student.config.spatial_patch_size)")
        cfg_dims = dict(zip(self.student.config.teachers, self.student.config.teachers_dim))
        for name, width in self.teacher_widths.items():
            if name not in cfg_dims:
                raise ValueError(f"teacher '{name}' has no student head; the student has heads for "
                                 f"{sorted(cfg_dims)}")
            if cfg_dims[name] != width:
                raise ValueError(
                    f"teacher '{name}' outputs width {width} but the student's {name} adapter produces "
                    f"{cfg_dims[name]}; set student.config teachers_dim to match (or omit teachers_dim "
                    "in a dict config to take the teachers' widths)")
            if self.weights[name].register > 0:
                regs = self._probe[name].registers
                n_student = int(self.student.config.n_storage_tokens)
                if regs is None:
                    raise ValueError(f"teacher '{name}' has register_weight > 0 but returns no registers; "
                                     f"set teachers.<{name}>.register_weight=0")
                if tuple(regs.shape) != (n_student, width):
                    raise ValueError(f"teacher '{name}' registers are {tuple(regs.shape)} but the student "
                                     f"predicts ({n_student}, {width}); match n_storage_tokens or set "
                                     "register_weight=0")

    def _fit_phis(self) -> None:
        from distill.train.phis_fit import fit_or_load_phis

        self.phis_state = None
        self.phis_origin: dict[str, str] = {}   # teacher -> fitted / carried from the init / reused
        if not self.cfg.phis.enabled:
            return
        fit_or_load_phis(self)

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = build_adamw(self.model.named_parameters(), o.lr, o.weight_decay, betas=o.betas, eps=o.eps,
                                     no_decay=exempt_from_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        return warmup_cosine(step, self.cfg.steps, o.warmup_steps, o.min_lr_ratio, constant=o.schedule == "constant")

    # ------------------------------------------------------------------ checkpoints
    def _resumable_settings(self) -> dict:
        """The RESUME_MAY_CHANGE settings of this run, as flat dotted keys (paths relative to OUT: they are
        written into checkpoints and history.jsonl)."""
        return portable({k: v for k, v in _flat(self.cfg.to_json()).items() if k in RESUME_MAY_CHANGE}, self.out)

    def _config_fingerprint(self) -> str:
        """What a resume must not change: everything but steps, checkpoint, logging, description and
        the RESUME_MAY_CHANGE keys."""
        d = {k: v for k, v in self.cfg.to_json().items() if k not in _UNFINGERPRINTED}
        return fingerprint({k: v for k, v in _flat(d).items() if k not in RESUME_MAY_CHANGE})

    def save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        trainer = {"step": self.step, "scheduler": self.scheduler.state_dict(),
                   "sampler": self._consumed, "counters": self.counters,
                   "guard": self.guard.state_dict(), "world_size": self.info.world_size,
                   "config_fingerprint": self._config_fingerprint(),
                   "resumable": self._resumable_settings()}

        def phis(folder):
            if self.phis_state is not None:
                from distill.train.phis_fit import save_phis
                save_phis(self, folder / "phis")

        ckpt.save_checkpoint(self.out, self.step, self.writer, model_sd, optim_sd, trainer, self.cfg.checkpoint.keep,
                             self.info.rank, self.info.is_main, extra=phis)

    def _maybe_resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        folder = ckpt.latest_checkpoint(self.out)
        if folder is None:
            return
        data = ckpt.read_checkpoint(folder, self.info.rank)
        tr = data["trainer"]
        if tr["config_fingerprint"] != self._config_fingerprint():
            raise ResumeRefused(f"{self.out} holds a checkpoint of a different recipe (only steps, logging, "
                                f"checkpoint settings and {', '.join(RESUME_MAY_CHANGE)} may change on resume); "
                                "use a new --out directory")
        if tr["world_size"] != self.info.world_size:
            raise ResumeRefused(f"checkpoint was written with {tr['world_size']} ranks, this run has "
                                f"{self.info.world_size}; the sampler plan depends on the world size, so resume "
                                f"with {tr['world_size']} ranks or use a new --out directory")
        opts = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(self.model, data["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, data["optimizer"], options=opts)
        self.scheduler.load_state_dict(tr["scheduler"])
        try:
            self.sampler.load_state_dict(tr["sampler"])
        except SamplerStateError as e:
            raise ResumeRefused(f"{self.out}: {e}") from None
        self._reset_inputs()
        self.counters = dict(tr["counters"])
        self.guard.load_state_dict(tr.get("guard") or {})
        self.step = int(tr["step"])
        self._apply_resume_changes(tr.get("resumable") or {})
        if data["rng"] is not None:
            ckpt.set_rng_state(*data["rng"])
        if self.phis_state is not None and (folder / "phis").exists():
            from distill.train.phis_fit import load_phis
            load_phis(self, folder / "phis")
        self.metrics.truncate_after(self.step)
        if self.info.is_main:
            print(f"[amoe distill] resumed from {folder} at step {self.step}", flush=True)

    def _apply_resume_changes(self, before: dict) -> None:
        """A resume that changed a RESUME_MAY_CHANGE key (e.g. --set optim.lr=1e-4 after an abort):
        the optimiser and schedule take the new values from this step on, and OUT/history.jsonl
        records what changed, when."""
        now = self._resumable_settings()
        changed = {k: [before.get(k), now[k]] for k in now if before.get(k) != now[k]}
        if not changed:
            return
        # the loaded optimiser and scheduler states carry the old base lr: re-base them on the new one
        self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.cfg.optim.lr
            g["lr"] = self.cfg.optim.lr * self._lr_factor(self.scheduler.last_epoch)
        if self.info.is_main:
            with open(self.out / "history.jsonl", "a") as f:
                f.write(json.dumps({"event": "resumed_with_changes", "step": self.step, "changed": changed}) + "\n")
            print(f"[amoe distill] resumed at step {self.step} with changed settings: "
                  + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), flush=True)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        p = self.cfg.engine.precision
        if self.device.type == "cuda" and p in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if p == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        inputs = self._next_inputs()
        t_wait = time.perf_counter()
        self.counters["corrupt_images"] += inputs.corrupt
        sequences, local_n = inputs.sequences, len(inputs.items)
        batch = L.GlobalBatch.from_local(local_n, self.device)
        if batch.global_images == 0:
            raise TrainingAborted("a whole step had no decodable image; check the pool shards")
        keys = [it.entry.key for it in inputs.items]
        res = [it.resolution for it in inputs.items]
        p = self.cfg.data.patch_size
        grids = [(it.size[0] // p, it.size[1] // p) for it in inputs.items]
        targets = {}
        for name, runner in self.teachers.items():
            raws = runner.raw_prepared(list(inputs.teacher_pixels[name]), keys, res) if local_n else []
            targets[name] = runner.targets(raws, grids, self.device, self.cfg.phis.exclude_registers) \
                if local_n else None
        images = inputs.pixels.to(self.device)
        if not local_n:
            # This rank decoded nothing, but the others did: it still takes part in the step (DDP's
            # gradient all-reduce, FSDP's gathers and the relational gather are collectives), by running
            # one blank placeholder image whose predictions are all sliced away below, so it adds
            # nothing to any loss and a zero gradient (its 4 tokens do enter the experts' load counts).
            side = 2 * self.cfg.data.patch_size
            images, sequences = [torch.zeros(3, side, side, device=self.device)], [[0]]
        t_data = time.perf_counter()

        self.model.train()
        with self._autocast():
            out = self.model(images, sequences, self.cfg.batching.max_tokens,
                             self.cfg.batching.max_images_per_seq)
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for t in self.cfg.teachers:
            w = self.weights[t.name]
            pred = L.StudentPredictions(summary=out["summary"][t.name].float(),
                                        patches=[p.float() for p in out["patches"][t.name]],
                                        registers=out["registers"].get(t.name)
                                        if w.register > 0 else None)
            tgt = targets[t.name]
            if tgt is None:   # the placeholder of a rank without images: no rows on either side
                pred = L.StudentPredictions(summary=pred.summary[:0], patches=[],
                                            registers=None if pred.registers is None else pred.registers[:0])
                tgt = L.TeacherTargets(summary=pred.summary.detach(), patches=[],
                                       registers=None if pred.registers is None else pred.registers.detach())
            gathered = None
            if w.relational != "none" and self.info.distributed:
                gathered = (L.gather_variable_rows(pred.summary), L.gather_variable_rows(tgt.summary))
            if w.register > 0 and pred.registers is not None:
                pred.registers = pred.registers.float()
            loss_t, terms_t = L.teacher_loss(pred, tgt, w, batch, self.cfg.loss.channel_reduction, gathered)
            total = total + loss_t
            for k, v in terms_t.items():
                terms[f"loss/{t.name}/{k}"] = v
        # global values of every term (sum of local contributions) and of the total objective
        reduced = all_reduce_sum({k: v.item() for k, v in terms.items()}, self.device)
        objective = 0.0
        for t in self.cfg.teachers:
            w = self.weights[t.name]
            per = sum(getattr(w, k) * reduced.get(f"loss/{t.name}/{k}", 0.0)
                      for k in ("summary", "patch", "register"))
            rel = reduced.get(f"loss/{t.name}/{w.relational}", 0.0) * w.relational_weight
            reduced[f"loss/{t.name}/total"] = w.weight * (per + rel)
            objective += reduced[f"loss/{t.name}/total"]
        reduced["loss/total"] = objective

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        why_skipped, grad_norm = guarded_step(self.optimizer, self.model.parameters(), objective,
                                              self.cfg.optim.grad_clip, self.guard)
        applied = why_skipped is None
        if applied:
            self.scheduler.step()
        else:
            self.counters["skipped_steps"] += 1
        load = self._balance_experts(update=applied)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = inputs.ticket.real_tokens
        rec = {"step": self.step, **reduced, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": grad_norm, "fill_ratio": inputs.fill_ratio, "images": batch.global_images,
               "tokens": tokens, "tokens_per_s": tokens / dt, "step_s": dt,
               "data_wait_s": t_wait - t0, "targets_s": t_data - t_wait,
               "skipped": not applied, **({"skip_reason": why_skipped} if why_skipped else {}),
               **{f"count/{k}": v for k, v in self.counters.items()}, **load}
        return rec

    def _balance_experts(self, update: bool) -> dict[str, Any]:
        from distill.student import update_expert_bias

        layers = self.student.moe_layers() if hasattr(self.student, "moe_layers") else []
        if not layers:
            return {}
        loads = torch.stack([m.tokens_per_expert.detach().float() for m in layers])   # (layers, E)
        if self.info.distributed:
            dist.all_reduce(loads)
        if update and self.cfg.moe_balance.enabled:
            update_expert_bias(layers, list(loads), rate=self.cfg.moe_balance.update_rate)
        mean = loads.mean(1).clamp_min(1e-9)
        imbalance = (loads.max(1).values / mean)
        return {"moe/max_over_mean": imbalance.mean().item(),
                "moe/load": [[int(v) for v in row] for row in loads.tolist()]}

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        from tqdm import tqdm

        c = self.cfg
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.logging.progress and self.info.is_main),
                   desc=f"distill {c.name}", dynamic_ncols=True)
        # which kernels this run uses, for whoever reads its numbers later (events.jsonl)
        self.metrics.event({"step": self.step, "event": "runtime", "device": str(self.device),
                            "attention": self.student.attention_path(self.device),
                            "precision": c.engine.precision, "data_workers": c.data.workers})
        try:
            while self.step < c.steps:
                rec = self.train_step()
                if rec["skipped"]:
                    self.metrics.event({"step": self.step, "event": "step_skipped", "reason": rec["skip_reason"],
                                        "loss/total": rec["loss/total"], "grad_norm": rec["grad_norm"],
                                        "in_a_row": self.guard.in_a_row})
                    if self.guard.exhausted:
                        last = ckpt.latest_checkpoint(self.out)
                        raise TrainingAborted(
                            f"{self.guard.in_a_row} skipped steps in a row (last at step {self.step}: "
                            f"{rec['skip_reason']}); "
                            + (f"the last good checkpoint is {last}: resume from it with the same command and a "
                               f"lower learning rate (--set optim.lr=...)" if last else
                               "no checkpoint was written yet: start again with a lower optim.lr")
                            + ", or check the teachers' outputs and PHI-S statistics")
                if self.step % c.logging.every_steps == 0 or self.step == c.steps:
                    self.metrics.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss/total']:.4g}", fill=f"{rec['fill_ratio']:.2f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
                # never while steps are being skipped: a checkpoint is a state the run could continue from
                if (self.step % c.checkpoint.every_steps == 0 or self.step == c.steps) and not self.guard.in_a_row:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.metrics.close()
        export_dir = self.out / "export"
        state = self.full_student_state()          # collective under FSDP: every rank takes part
        if self.info.is_main:
            last = ckpt.latest_checkpoint(self.out)
            require_finite(state, "the student export", str(last) if last else None)
            from distill.train.export import export_student
            export_student(self, export_dir, state)
        barrier()
        return export_dir

    def full_student_state(self) -> dict[str, torch.Tensor]:
        """The unsharded student state dict on CPU, official key names (no wrapper prefixes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        prefix = "student."
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    def close(self) -> None:
        self._inputs = None     # stops the input pipeline's workers
        teardown(self.info)


def _accepts_generator(fn: Callable) -> bool:
    import inspect

    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


