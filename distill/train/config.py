"""The distillation recipe schema: dataclasses parsed strictly from JSON.

Every hyper-parameter lives in a recipe file (distill/recipes/*.json). Parsing is strict: an unknown
key anywhere raises ConfigError naming the key, its section and the keys that section accepts.
Overrides use dotted paths (``optim.lr=1e-4``, ``teachers.0.relational=rkd``) with JSON values.
String fields may reference ``${world}``, ``${teachers}`` and ``${out}``, filled from the top-level keys
``world``/``teachers_dir`` and the output directory.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import ConfigError, interpolate, parse_dataclass, read_config_file
from distill.config import apply_overrides as apply_dotted
from distill.config import parse_override
from distill.losses import RELATIONAL_KINDS

__all__ = ["ConfigError", "TrainConfig", "load_config", "apply_overrides", "parse_override", "TEACHER_OWN_SIZE"]

TEACHER_OWN_SIZE = "teacher"   # teachers[].resolution: read the teacher at its own default input size


@dataclass
class TeacherConfig:
    name: str                               # teacher key: also the student head it trains ("siglip2", "dinov3")
    spec: str                               # what distill.encoders.registry.load_encoder receives
    head: str | None = None                 # teacher head to read; None = same as name
    weight: float = 1.0                     # teachers are summed with these weights (equal by default)
    summary_weight: float = 1.0
    patch_weight: float = 1.0
    register_weight: float = 0.0            # DINOv3 only: > 0 matches the student's register outputs
    relational: str = "arkd"                # none | rkd | arkd
    relational_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    # teacher input side budget: None = the student's sampled size (teachers that take any size, the
    # paper's); an int = that budget; "teacher" = the teacher's own default, the size it was trained at
    # (fixed-size teachers, the mini-world's: read larger, they are other models; docs/distill.md)
    resolution: int | str | None = None
    dtype: str = "auto"                     # auto = bf16 on GPU, fp32 on CPU


@dataclass
class StudentConfig:
    config: Any = "siglino-0.3B"            # Student.from_config argument: registry name or dict
    init_from: str | None = None            # exported student directory to start from


@dataclass
class PhisConfig:
    enabled: bool = True
    fit_images: int = 256                   # images streamed through each teacher to fit PHI-S
    exclude_registers: list[int] = field(default_factory=lambda: [1])   # DINOv3 register kept raw
    refit: bool = False                     # with student.init_from: fit afresh instead of carrying its PHI-S


@dataclass
class DataSource:
    path: str                               # directory of webdataset shards (*.tar)
    weight: float = 1.0                     # sampling weight among sources (by replication)
    resolutions: list[int] = field(default_factory=lambda: [256])   # side budgets: max pixels = side^2
    resolution_weights: list[float] | None = None
    min_resolution: int = 128               # side budget floor: smaller images are upscaled to it
    limit: int | None = None                # use only the first N images (quick runs)
    manifest: str | None = None             # curated parquet manifest (amoe curate sample): only its samples


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    patch_size: int = 16
    workers: int = 2                        # input-pipeline processes per rank (0: in the training process)
    prefetch: int = 2                       # steps each worker prepares ahead


@dataclass
class BatchingConfig:
    mode: str = "packed"                    # packed (token-balanced) | padded (baseline)
    max_tokens: int = 1024                  # C_max: tokens per packed sequence
    max_images_per_seq: int = 16
    seqs_per_rank: int = 1
    images_per_rank: int = 8                # padded mode only
    lookahead: int = 64


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"                # cosine | constant
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0                  # <= 0 disables


@dataclass
class LossConfig:
    channel_reduction: str = "sum"          # sum = paper's ||.||^2; mean = divided by width


@dataclass
class MoEBalanceConfig:
    enabled: bool = True
    update_rate: float = 1e-3               # aux-loss-free bias step (DeepSeek-V3 style)


@dataclass
class EngineConfig:
    parallel: str = "ddp"                   # ddp | fsdp (FSDP2 fully_shard) | none
    device: str = "auto"                    # auto | cpu | cuda
    precision: str = "auto"                 # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    backend: str = "auto"                   # process-group backend: auto (nccl on GPU, gloo on CPU)


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2


@dataclass
class LoggingConfig:
    every_steps: int = 1
    progress: bool = True
    tensorboard: bool = True                # used only if tensorboard is installed


@dataclass
class RobustnessConfig:
    max_skipped_in_a_row: int = 5            # abort after this many skipped steps in a row
    grad_spike_factor: float | None = 50.0   # also skip a step whose grad norm > factor x running median


@dataclass
class TargetCacheConfig:
    enabled: bool = False                   # cache teacher targets on disk (small experiments)
    dir: str | None = None                  # default: OUT/target_cache
    shared: str | None = None               # another run's cache of the same teachers, read first, never written


@dataclass
class TrainConfig:
    name: str
    steps: int
    teachers: list[TeacherConfig]
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    world: str | None = None                # mini-world directory (${world} in paths)
    teachers_dir: str | None = None         # trained teacher directory (${teachers} in paths)
    phis: PhisConfig = field(default_factory=PhisConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    moe_balance: MoEBalanceConfig = field(default_factory=MoEBalanceConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    target_cache: TargetCacheConfig = field(default_factory=TargetCacheConfig)
    description: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_paths(self, out: str | os.PathLike | None = None) -> "TrainConfig":
        """A copy with ${world}, ${teachers} and ${out} filled in every string field (distill.config's
        one interpolation syntax; recipes do not read the environment)."""
        values = {"world": self.world, "teachers": self.teachers_dir, "out": None if out is None else str(out)}

        def sub(x, where):
            if isinstance(x, str):
                for k in values:
                    if "{" + k + "}" in x.replace("${" + k + "}", ""):
                        raise ConfigError(f"{where}: {x!r} uses {{{k}}}; recipes write ${{{k}}} (one syntax with the "
                                          "suites' ${AMOE_DATA})")
                return interpolate(x, values, where, environment=False,
                                   how_to_set="pass --set {name}=DIR")
            if isinstance(x, list):
                return [sub(v, f"{where}.{i}") for i, v in enumerate(x)]
            if isinstance(x, dict):
                return {k: sub(v, f"{where}.{k}") for k, v in x.items()}
            return x

        raw = self.to_json()
        raw = {k: (v if k in ("world", "teachers_dir") else sub(v, k)) for k, v in raw.items()}
        return parse_config(raw)


def _validate(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(cfg.steps >= 1, "steps must be >= 1")
    need(len(cfg.teachers) >= 1, "at least one teacher is required")
    names = [t.name for t in cfg.teachers]
    need(len(set(names)) == len(names), f"teacher names must be unique, got {names}")
    for i, t in enumerate(cfg.teachers):
        need(t.relational in RELATIONAL_KINDS,
             f"teachers.{i}.relational must be one of {RELATIONAL_KINDS}, got {t.relational!r}")
        need(t.dtype in ("auto", "bf16", "fp32"), f"teachers.{i}.dtype must be auto|bf16|fp32")
        need(not isinstance(t.resolution, str) or t.resolution == TEACHER_OWN_SIZE,
             f"teachers.{i}.resolution must be a side in pixels, null or \"{TEACHER_OWN_SIZE}\", "
             f"got {t.resolution!r}")
    need(cfg.batching.mode in ("packed", "padded"), "batching.mode must be 'packed' or 'padded'")
    need(1 <= cfg.batching.max_images_per_seq <= 16, "batching.max_images_per_seq must be in 1..16")
    need(cfg.optim.schedule in ("cosine", "constant"), "optim.schedule must be 'cosine' or 'constant'")
    need(cfg.loss.channel_reduction in ("sum", "mean"), "loss.channel_reduction must be 'sum' or 'mean'")
    need(cfg.engine.parallel in ("ddp", "fsdp", "none"), "engine.parallel must be ddp|fsdp|none")
    need(cfg.engine.precision in ("auto", "bf16", "fp32"), "engine.precision must be auto|bf16|fp32")
    need(cfg.engine.device in ("auto", "cpu", "cuda"), "engine.device must be auto|cpu|cuda")
    need(cfg.robustness.max_skipped_in_a_row >= 1, "robustness.max_skipped_in_a_row must be >= 1")
    need(cfg.robustness.grad_spike_factor is None or cfg.robustness.grad_spike_factor > 1,
         "robustness.grad_spike_factor must be null (off) or > 1")
    need(len(cfg.data.sources) >= 1, "data.sources needs at least one shard directory")
    need(isinstance(cfg.data.patch_size, int) and cfg.data.patch_size >= 1,
         f"data.patch_size must be a positive int (the student's patch, e.g. 16), got {cfg.data.patch_size!r}")
    need(isinstance(cfg.data.workers, int) and cfg.data.workers >= 0,
         f"data.workers must be an int >= 0 (0 decodes in the training process), got {cfg.data.workers!r}")
    need(isinstance(cfg.data.prefetch, int) and cfg.data.prefetch >= 1,
         f"data.prefetch must be an int >= 1, got {cfg.data.prefetch!r}")
    need(cfg.batching.max_tokens >= 1, "batching.max_tokens must be >= 1")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps must be >= 1")
    need(cfg.logging.every_steps >= 1, "logging.every_steps must be >= 1")
    p = cfg.data.patch_size
    for i, s in enumerate(cfg.data.sources):
        need(len(s.resolutions) >= 1, f"data.sources.{i}.resolutions is empty")
        if s.resolution_weights is not None:
            need(len(s.resolution_weights) == len(s.resolutions),
                 f"data.sources.{i}.resolution_weights must have one weight per resolution")
        if cfg.batching.mode == "packed":
            worst = (max(s.resolutions) // p) ** 2
            need(worst <= cfg.batching.max_tokens,
                 f"data.sources.{i}: a {max(s.resolutions)} px image has up to {worst} tokens but "
                 f"batching.max_tokens is {cfg.batching.max_tokens}; raise max_tokens")


def parse_config(raw: dict) -> TrainConfig:
    cfg = parse_dataclass(TrainConfig, raw, "", top="the recipe's top level")
    _validate(cfg)
    return cfg


# top-level shorthands accepted by --set (the brief's `--set world=DIR teachers=DIR`)
_ALIASES = {"teachers": "teachers_dir"}


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> dict:
    """`distill.config.apply_overrides` with the recipe's shorthands (`--set teachers=DIR`); unknown keys
    are left to `parse_config`, which names them."""
    if not overrides:
        return copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    aliased = {}
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else list(key)
        if len(path) == 1 and path[0] in _ALIASES and not isinstance(value, list):
            path = [_ALIASES[path[0]]]
        aliased[".".join(map(str, path))] = value
    return apply_dotted(raw, aliased, where="the recipe")


def load_config(source: str | os.PathLike | dict, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Recipe path or dict + overrides -> validated TrainConfig (paths not yet resolved)."""
    raw = source if isinstance(source, dict) else read_recipe(source)
    return parse_config(apply_overrides(resolve_base(raw), overrides))


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def read_recipe(source: str | os.PathLike) -> dict:
    """A recipe file by path, or by name from distill/recipes/ (raw JSON, `base` not yet resolved)."""
    return read_config_file(source, RECIPES, "recipe")[0]


def resolve_base(raw: dict, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe may be a variant of another: {"base": NAME, "overrides": {"a.b": v}, ...}.

    The base is read (recursively), the dotted overrides applied, and the variant's own top-level
    keys (name, description, ...) replace the base's. Ablations stay a few lines each.
    """
    if "base" not in raw:
        if "overrides" in raw:
            raise ConfigError("'overrides' in a recipe needs a 'base' recipe to apply them to")
        return raw
    base_name = raw["base"]
    if base_name in _seen:
        raise ConfigError(f"recipe base cycle: {' -> '.join(_seen + (base_name,))}")
    base = resolve_base(read_recipe(base_name), _seen + (base_name,))
    merged = apply_overrides(base, raw.get("overrides") or {})
    merged.update({k: v for k, v in raw.items() if k not in ("base", "overrides")})
    return merged
