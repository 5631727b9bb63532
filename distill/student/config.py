"""Student configuration: field names follow the release's `SigLinoArgs` / `MoEArgs`.

A release config dict (e.g. the `args` of `released_configs.json`) maps onto `StudentConfig`
field for field. Named configurations live as data in `configs.json` beside this module.

Two default sets exist in the release and are easy to mix up (SIGLINO_FACTS.md §2):
- `MoEArgs` *class* defaults (sigmoid, route_norm False, route_scale 1.0, silu experts) apply to
  every field a config's explicit `moe_args` leaves out — this is what the MoE releases get.
- The `SigLinoArgs` default *factory* (16 experts, 1 shared, top-3, route_norm True,
  route_scale 0.8633, relu2) applies only when a config gives no `moe_args` at all.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from distill.config import parse_dataclass
from distill.errors import AmoeError

CONFIGS_FILE = Path(__file__).with_name("configs.json")

ACTIVATIONS = ("silu", "relu2")


@dataclass
class MoEArgs:
    """Router + expert settings. Defaults are the release's `MoEArgs` class defaults for the
    fields the fact sheet documents (score_func, route_norm, route_scale, activation); the
    count fields are always given explicitly by every released config."""

    num_experts: int = 8
    num_shared_experts: int = 0
    score_func: str = "sigmoid"
    route_norm: bool = False
    route_scale: float = 1.0
    score_before_experts: bool = False
    top_k: int = 1
    use_grouped_mm: bool = False  # accepted for key compatibility; the release ignores it too
    activation: str = "silu"

    def __post_init__(self):
        if self.score_func != "sigmoid":
            raise ValueError(f"score_func={self.score_func!r} is not supported: the SigLino router "
                             "is sigmoid-scored; use score_func='sigmoid'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {self.activation!r}; known: {ACTIVATIONS}")
        if self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")


def siglino_default_moe_args() -> MoEArgs:
    """The `SigLinoArgs.moe_args` default factory (used only when a config omits moe_args)."""
    return MoEArgs(num_experts=16, num_shared_experts=1, top_k=3, route_norm=True,
                   route_scale=0.8633, activation="relu2")


@dataclass
class StudentConfig:
    """Architecture of a SigLino student. Shape fields have no default on purpose: a config
    that forgets `dim` should fail loudly, not silently build some other model."""

    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    n_kv_heads: int | None = None
    moe_dim: int = 0
    moe_args: MoEArgs = field(default_factory=siglino_default_moe_args)
    first_n_layers_dense: int = 0
    ffn_dim: int | None = None
    activation: str = "silu"
    channel_size: int = 3
    spatial_patch_size: int = 16
    temporal_patch_size: int = 1
    enable_3d_rope: bool = True       # no effect in the release either (3-D path always taken)
    rope_theta: float = 100000.0      # only feeds the identity 1-D half (time position is 0)
    rope_min_freqs: float = 1.0
    rope_max_freqs: float = 20.0
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    use_qk_norm: bool = True
    use_tok_norm: bool = True         # no effect in the release (input norm is commented out)
    parameterized_norm: bool = True
    n_storage_tokens: int = 4
    teachers: tuple[str, ...] = ("siglip2", "dinov3")
    teachers_dim: tuple[int, ...] = (1152, 1024)
    use_flex_attn: bool = True        # no effect: the backend is a runtime option of Student

    def __post_init__(self):
        if isinstance(self.moe_args, Mapping):
            self.moe_args = moe_args_from_dict(self.moe_args)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.teachers = tuple(self.teachers)
        self.teachers_dim = tuple(int(d) for d in self.teachers_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be divisible by 4 (half of it carries "
                             "2-D RoPE as complex pairs)")
        if set(self.teachers) != {"siglip2", "dinov3"} or len(self.teachers_dim) != 2:
            raise ValueError(f"teachers must be ('siglip2', 'dinov3') with two widths; got "
                             f"{self.teachers} / {self.teachers_dim}")
        if self.activation != "silu":
            raise ValueError(f"dense FFN activation {self.activation!r} is not supported (release: 'silu')")
        for i in range(self.n_layers):
            if self.layer_kind(i) == "dense" and not self.ffn_dim:
                raise ValueError(f"layer {i} is dense (first_n_layers_dense={self.first_n_layers_dense}) "
                                 "but ffn_dim is not set")
            if self.layer_kind(i) != "dense" and self.moe_dim <= 0:
                raise ValueError(f"layer {i} is an MoE layer but moe_dim={self.moe_dim}; set moe_dim")
        if self.teacher_dim("siglip2") % 16:
            raise ValueError("the siglip2 width must be divisible by 16 (the MAP head has 16 heads)")

    def layer_kind(self, i: int) -> str:
        """'dense' (SwiGLU ffn_dim), 'moe', or 'plain' (silu FFN of width moe_dim when num_experts == 0)."""
        if i < self.first_n_layers_dense:
            return "dense"
        return "moe" if self.moe_args.num_experts > 0 else "plain"

    def teacher_dim(self, name: str) -> int:
        return self.teachers_dim[self.teachers.index(name)]

    @property
    def n_prefix_tokens(self) -> int:
        """CLS + registers in front of the patches."""
        return 1 + self.n_storage_tokens

    @property
    def patch_dim(self) -> int:
        p = self.spatial_patch_size
        return self.channel_size * p * p * self.temporal_patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teachers"] = list(self.teachers)
        d["teachers_dim"] = list(self.teachers_dim)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudentConfig":
        return parse_dataclass(cls, dict(d), "", top="the student config")


def moe_args_from_dict(d: Mapping[str, Any]) -> MoEArgs:
    return parse_dataclass(MoEArgs, dict(d), "moe_args")


def _named_table() -> dict[str, dict]:
    table = json.loads(CONFIGS_FILE.read_text())
    return {k: v for k, v in table.items() if not k.startswith("_")}


def known_configs() -> list[str]:
    return sorted(_named_table())


def released_configs() -> list[str]:
    return sorted(k for k, v in _named_table().items() if v.get("release"))


class UnknownStudentConfig(AmoeError, KeyError):
    """A student config name that is not in the table."""


def get_config(spec: "str | Mapping[str, Any] | StudentConfig | Any") -> StudentConfig:
    """A config by name, from a dict (release-style args), a StudentConfig, or any object with
    the same attributes (e.g. a release SigLinoArgs instance)."""
    if isinstance(spec, StudentConfig):
        return dataclasses.replace(spec)
    if isinstance(spec, str):
        table = _named_table()
        if spec not in table:
            raise UnknownStudentConfig(f"unknown student config {spec!r}; known: {', '.join(known_configs())}")
        return StudentConfig.from_dict(table[spec]["args"])
    if isinstance(spec, Mapping):
        return StudentConfig.from_dict(spec)
    names = [f.name for f in dataclasses.fields(StudentConfig)]
    if all(hasattr(spec, n) for n in ("dim", "n_layers", "n_heads", "head_dim")):
        d = {n: getattr(spec, n) for n in names if hasattr(spec, n)}
        moe = d.get("moe_args")
        if moe is not None and not isinstance(moe, (MoEArgs, Mapping)):
            mnames = [f.name for f in dataclasses.fields(MoEArgs)]
            d["moe_args"] = {n: getattr(moe, n) for n in mnames if hasattr(moe, n)}
        return StudentConfig.from_dict(d)
    raise TypeError(f"cannot build a StudentConfig from {type(spec).__name__}; pass a config name "
                    f"({', '.join(known_configs())}), a dict of SigLinoArgs fields, or a StudentConfig")
