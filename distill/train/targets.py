"""Teacher targets: frozen teachers, PHI-S standardisation, grid alignment, optional disk cache.

For every image the trainer needs, per teacher: the summary vector, the patch map resampled to the
student's grid, and (DINOv3) the register tokens -- all in the teacher's PHI-S-standardised space.

Raw teacher outputs (before PHI-S) can be cached on disk per (teacher fingerprint, image key,
resolution) so that small experiments encode every image once; PHI-S is applied after the cache,
so refitting it does not invalidate cached features. Runs of the same teachers on the same pool (the
arms of an ablation) can also read another run's cache, read-only (`shared`): they never write
into it, so what one arm reads does not depend on what runs beside it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distill.io import load_tensors, save_tensors_atomic
from distill.losses import TeacherTargets, align_patch_grid
from distill.train.config import TEACHER_OWN_SIZE
from distill.lru import TensorLRU

LOADED_OUTPUT_BYTES = 512 * 2**20   # per teacher; a mini-world run reads ~55 MB of outputs per teacher


@dataclass
class RawTeacherOutput:
    """One image's raw teacher output."""

    summary: torch.Tensor               # (C,)
    patches: torch.Tensor               # (h*w, C)
    grid: tuple[int, int]
    registers: torch.Tensor | None      # (R, D) or None


class TeacherRunner:
    """A frozen teacher encoder plus everything to turn images into standardised targets."""

    def __init__(self, name: str, encoder, head: str, resolution: int | str | None, cache_dir: str | None,
                 shared_cache_dir: str | None = None):
        self.name, self.encoder, self.head = name, encoder, head
        self.resolution = resolution
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / name
        self.shared_cache_dir = None if shared_cache_dir is None or cache_dir is None \
            else Path(shared_cache_dir) / name
        self.standardizers: dict[str, object] = {}    # "summary" / "patches" / "registers" -> PhiS
        # outputs read from the disk cache, kept (a run visits each image once per epoch; reading the
        # files was ~5 % of a cached mini-world arm's profile); never mutated by their readers
        self._loaded = TensorLRU(LOADED_OUTPUT_BYTES)
        encoder.require_head(head)
        self._fingerprint = str(encoder.fingerprint())

    # ------------------------------------------------------------------ raw outputs
    def _cache_file(self, key: str, resolution: int | str, folder: Path | None = None) -> Path:
        h = hashlib.sha1(f"{self._fingerprint}|{key}|{resolution}".encode()).hexdigest()
        return (folder or self.cache_dir) / h[:2] / f"{h}.safetensors"

    def _cached(self, key: str, resolution: int | str) -> Path | None:
        """The cache file holding this output (this run's own first, then the shared one), or None."""
        if self.cache_dir is None:
            return None
        for folder in (self.cache_dir, self.shared_cache_dir):
            if folder is not None and (f := self._cache_file(key, resolution, folder)).exists():
                return f
        return None

    def input_size(self, student_resolution: int) -> int | str:
        """The size this teacher reads an image at (also its outputs' cache key): its configured budget,
        its own default (`TEACHER_OWN_SIZE`), or else the student's sampled one."""
        return self.resolution or student_resolution

    def prepare(self, image: Callable[[], object], key: str, resolution: int) -> torch.Tensor | None:
        """The teacher's preprocessed pixels, or None when its output is cached; `image()` gives the PIL
        image, called only when it is not (the input pipeline decodes lazily). Pure CPU work on picklable
        inputs: the input pipeline runs it in DataLoader workers."""
        res = self.input_size(resolution)
        if self._loaded.lookup((key, res)) is not None or self._cached(key, res) is not None:
            return None
        return self.encoder.preprocess(image(), resolution=None if res == TEACHER_OWN_SIZE else res)

    @torch.no_grad()
    def raw_prepared(self, pixels: list[torch.Tensor | None], keys: list[str],
                     resolutions: list[int]) -> list[RawTeacherOutput]:
        """Raw outputs from `prepare`d pixels (None = read the cache); new outputs are cached."""
        out: list[RawTeacherOutput | None] = [None] * len(pixels)
        todo = []
        for i, (px, k, r) in enumerate(zip(pixels, keys, resolutions)):
            res = self.input_size(r)
            if px is None:
                out[i] = self._loaded.lookup((k, res))
                if out[i] is not None:
                    continue
                f = self._cached(k, res)
                if f is None:
                    raise FileNotFoundError(f"teacher {self.name}: no cached output for {k} at {res} px and no "
                                            "pixels to compute it (was the target cache deleted during the run?)")
                t = load_tensors(f)
                out[i] = RawTeacherOutput(t["summary"], t["patches"], tuple(t["grid"].tolist()), t.get("registers"))
                self._loaded.put((k, res), out[i], nbytes=sum(v.nbytes for v in t.values()))
            else:
                todo.append((i, px, self._cache_file(k, res) if self.cache_dir is not None else None))
        if todo:
            enc = self.encoder
            feats = enc.encode([px.to(enc.device, enc.dtype) for _, px, _ in todo])
            for j, (i, _, f) in enumerate(todo):
                regs = None if feats.registers is None else feats.registers[j].float().cpu()
                o = RawTeacherOutput(feats.summary[self.head][j].float().cpu(),
                                     feats.patches[self.head][j].float().cpu(),
                                     tuple(int(v) for v in feats.grids[j]), regs)
                out[i] = o
                if f is not None:
                    t = {"summary": o.summary, "patches": o.patches, "grid": torch.tensor(o.grid)}
                    if regs is not None:
                        t["registers"] = regs
                    save_tensors_atomic(f, t)
        return out  # type: ignore[return-value]

    def raw(self, images, keys: list[str], resolutions: list[int]) -> list[RawTeacherOutput]:
        """PIL images -> raw outputs (cached when a cache dir is set): `prepare` then `raw_prepared`."""
        prepared = [self.prepare(lambda im=im: im, k, r) for im, k, r in zip(images, keys, resolutions)]
        return self.raw_prepared(prepared, keys, resolutions)

    # ------------------------------------------------------------------ standardised targets
    def _std(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        s = self.standardizers.get(kind)
        return x if s is None else s.transform(x)

    def targets(self, raws: list[RawTeacherOutput], student_grids: list[tuple[int, int]],
                device, exclude_registers: list[int] = ()) -> TeacherTargets:
        summary = self._std("summary", torch.stack([r.summary for r in raws]))
        patches = [align_patch_grid(self._std("patches", r.patches), r.grid, g)
                   for r, g in zip(raws, student_grids)]
        registers = None
        if all(r.registers is not None for r in raws) and raws:
            regs = torch.stack([r.registers for r in raws])           # (N, R, D)
            if "registers" in self.standardizers:
                n, R, d = regs.shape
                keep = [j for j in range(R) if j not in set(exclude_registers)]
                std = regs.clone()
                if keep:
                    std[:, keep] = self._std("registers", regs[:, keep].reshape(-1, d)).reshape(n, len(keep), d)
                regs = std
            registers = regs.to(device)
        return TeacherTargets(summary=summary.to(device), patches=[p.to(device) for p in patches],
                              registers=registers)


def encoder_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def load_teacher(cfg, device: torch.device, cache_dir: str | os.PathLike | None,
                 shared_cache_dir: str | os.PathLike | None = None) -> TeacherRunner:
    """Load a frozen teacher through the encoder registry (bf16 on GPU by default)."""
    from distill.encoders.registry import load_encoder

    enc = load_encoder(cfg.spec)
    enc = enc.to(device, encoder_dtype(cfg.dtype, device))
    for m in _modules_of(enc):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return TeacherRunner(cfg.name, enc, cfg.head or cfg.name, cfg.resolution,
                         None if cache_dir is None else str(cache_dir),
                         None if shared_cache_dir is None else str(shared_cache_dir))


def _modules_of(enc):
    """nn.Modules an encoder holds (to freeze them); encoders keep their model in attributes."""
    from torch import nn

    if isinstance(enc, nn.Module):
        return [enc]
    return [v for v in vars(enc).values() if isinstance(v, nn.Module)]


def fill_target_cache(cfg, out_dir: str | os.PathLike, teacher: str, batch: int = 32, progress: bool = False,
                      encoder=None) -> dict:
    """Cache every output of `teacher` that a run of recipe `cfg` (a recipe path, dict or TrainConfig,
    as `run_distillation` takes; `encoder` injects the teacher as its `teachers` does) could ask for: each
    image of each data source (manifests ignored: their samples are a subset) at each side budget the
    source can draw, into the run's target cache (OUT/target_cache). Runs of other seeds, pool samples
    or batching modes that read this cache as `target_cache.shared` then encode nothing themselves
    (a seed draws each image's side budget anew, so one run's own cache covers about a third of what
    another seed asks for). Resumable: cached outputs are skipped. Returns counts."""
    from tqdm.auto import tqdm

    from distill.train.config import TrainConfig, load_config
    from distill.train.pool import UndecodableImage, build_index, lazy_image

    cfg = (cfg if isinstance(cfg, TrainConfig) else load_config(cfg)).resolve_paths(out_dir)
    if not cfg.target_cache.enabled:
        raise ValueError("fill_target_cache: the recipe has target_cache.enabled false; nothing would read the cache")
    t_cfg = next((t for t in cfg.teachers if t.name == teacher), None)
    if t_cfg is None:
        raise KeyError(f"teacher {teacher!r} is not in the recipe ({', '.join(t.name for t in cfg.teachers)})")
    cache = str(cfg.target_cache.dir or Path(out_dir) / "target_cache")
    runner = load_teacher(t_cfg, torch.device("cpu"), cache) if encoder is None else \
        TeacherRunner(t_cfg.name, encoder, t_cfg.head or t_cfg.name, t_cfg.resolution, cache)
    counts = {"encoded": 0, "cached": 0, "undecodable": 0}
    for i, src in enumerate(cfg.data.sources):
        index = build_index(src.path, Path(out_dir) / "index" / f"source_{i}")
        budgets = list(dict.fromkeys(runner.input_size(r) for r in src.resolutions))   # what the trainer can ask
        rows = range(len(index)) if src.limit is None else range(min(src.limit, len(index)))
        for lo in tqdm(range(0, len(rows), batch), desc=f"{teacher} targets", disable=not progress, leave=False):
            pending: dict[int | str, tuple[list, list]] = {r: ([], []) for r in budgets}   # budget -> (pixels, keys)
            for row in rows[lo:lo + batch]:
                entry = index.entry(row)
                image = lazy_image(entry)   # decoded only on a miss
                try:
                    prepared = [(r, runner.prepare(image, entry.key, r)) for r in budgets]
                except UndecodableImage:   # the trainer skips it too
                    counts["undecodable"] += 1
                    continue
                for r, px in prepared:
                    if px is None:
                        counts["cached"] += 1
                    else:
                        pending[r][0].append(px)
                        pending[r][1].append(entry.key)
            for r, (pixels, keys) in pending.items():
                if pixels:
                    runner.raw_prepared(pixels, keys, [r] * len(keys))
                    counts["encoded"] += len(keys)
    return counts
