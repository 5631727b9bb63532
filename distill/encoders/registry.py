"""The encoder registry: every model family is a named loader, every model a string spec.

    load_encoder("siglip2:google/siglip2-so400m-patch16-naflex")
    load_encoder("dinov3:/models/dinov3-vitl16")
    load_encoder("radio:radio_v2.5-h?adaptors=siglip,clip&trust_remote_code=1")
    load_encoder("siglino:/ckpt/amoe-0.3B.pt")
    load_encoder("student:runs/miniworld/export")
    load_encoder("runs/miniworld/export")          # bare path: the kind is read from the files

A spec is `KIND:ARG[?key=value&...]`: the query carries loader keyword arguments, so a spec
written in a sweep file can say everything a Python call can; keyword arguments passed to
`load_encoder` override the query. Loaders register themselves with `@register_loader` (the
open_clip / timm pattern); the model libraries are imported only when a loader runs.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill.encoders.base import Encoder
from distill.errors import AmoeError

# loader modules: importing one runs its @register_loader decorators
_BUILTIN_MODULES = ("distill.encoders.hf_siglip2", "distill.encoders.openclip", "distill.encoders.dinov3",
                    "distill.encoders.radio", "distill.encoders.student", "distill.encoders.timm_backbone",
                    "distill.encoders.pixels")


@dataclass(frozen=True)
class LoaderInfo:
    kind: str
    fn: Callable[..., Encoder]
    description: str
    requires: tuple[str, ...] = ()     # importable module names the loader needs
    example: str = ""
    options: dict[str, str] = field(default_factory=dict)

    def missing_packages(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


_LOADERS: dict[str, LoaderInfo] = {}
_builtins_loaded = False


class UnknownEncoderError(AmoeError, KeyError):
    def __str__(self):  # KeyError would print the message with quotes around it
        return str(self.args[0])


def register_loader(kind: str, description: str, requires: tuple[str, ...] = (), example: str = "",
                    options: dict[str, str] | None = None):
    """Decorator: `fn(arg: str, **kwargs) -> Encoder` becomes the loader for specs `kind:arg`."""
    if ":" in kind or "?" in kind or not kind:
        raise ValueError(f"invalid encoder kind {kind!r}: no ':' or '?' allowed")

    def deco(fn):
        if kind in _LOADERS and _LOADERS[kind].fn is not fn:
            raise ValueError(f"encoder kind '{kind}' is registered twice ({_LOADERS[kind].fn.__module__} "
                             f"and {fn.__module__})")
        _LOADERS[kind] = LoaderInfo(kind, fn, description, tuple(requires), example, dict(options or {}))
        return fn
    return deco


def _ensure_builtins() -> None:
    """The built-in loaders, then any plugin's (distill/plugins.py: entry points, `amoe --import`)."""
    global _builtins_loaded
    if not _builtins_loaded:
        for m in _BUILTIN_MODULES:
            importlib.import_module(m)
        _builtins_loaded = True
    from distill.plugins import load_plugins
    load_plugins()


def list_loaders() -> list[LoaderInfo]:
    _ensure_builtins()
    return [_LOADERS[k] for k in sorted(_LOADERS)]


def get_loader(kind: str) -> LoaderInfo:
    _ensure_builtins()
    if kind not in _LOADERS:
        close = difflib.get_close_matches(kind, list(_LOADERS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownEncoderError(f"unknown encoder kind '{kind}'{hint} Known kinds: {', '.join(sorted(_LOADERS))} "
                                  "(see `amoe encoders list`).")
    return _LOADERS[kind]


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        return v


def parse_spec(spec: str) -> tuple[str | None, str, dict[str, Any]]:
    """'KIND:ARG?k=v&k2=v2' -> (kind, arg, kwargs); a bare path gives kind None."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an encoder spec must be a non-empty string like 'siglip2:DIR'; got {spec!r}")
    spec = spec.strip()
    kwargs: dict[str, Any] = {}
    if "?" in spec:
        head, query = spec.rsplit("?", 1)
        pairs = [p for p in query.split("&") if p]
        if pairs and all("=" in p for p in pairs):
            for p in pairs:
                k, v = p.split("=", 1)
                kwargs[k.strip()] = _parse_value(v.strip())
            spec = head
    _ensure_builtins()
    kind, sep, arg = spec.partition(":")
    if sep and kind in _LOADERS:
        if not arg:
            raise ValueError(f"encoder spec '{spec}' has no argument after '{kind}:'; e.g. "
                             f"{_LOADERS[kind].example or kind + ':PATH'}")
        return kind, arg, kwargs
    if Path(spec).expanduser().exists():
        return None, spec, kwargs
    if sep and "/" not in kind and "\\" not in kind:
        get_loader(kind)  # raises with suggestions
    raise FileNotFoundError(
        f"'{spec}' is neither KIND:ARG with a known kind ({', '.join(sorted(_LOADERS))}) nor an existing path. "
        "Check the spelling, or see `amoe encoders list`.")


def detect_kind(path: str | Path) -> str:
    """The loader for a bare path, read from the files in it."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix in (".pt", ".pth"):
            return "siglino"
        raise ValueError(f"cannot tell which encoder '{p}' is: a bare file path must be an official SigLino "
                         "release .pt; for anything else give the kind, e.g. 'siglino:FILE' or 'student:DIR'")
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e}); cannot detect the encoder kind") from e
        if cfg.get("format") == "amoe-student":
            return "student"
        model_type = str(cfg.get("model_type", ""))
        if model_type in ("siglip2", "siglip"):
            return "siglip2"
        if model_type == "dinov3_vit":
            return "dinov3"
        remote = json.dumps(cfg.get("auto_map", {})).lower() + model_type.lower()
        if "siglino" in remote:
            return "siglino"
        if "radio" in remote:
            return "radio-hf"
        raise ValueError(f"{cfg_file}: model_type '{model_type}' is not one the registry detects "
                         "(siglip2, siglip, dinov3_vit, an amoe-student export, SigLino/RADIO remote code); "
                         "give the kind explicitly, e.g. 'siglip2:DIR'")
    if any(p.glob("*.pt")):
        return "siglino"
    raise FileNotFoundError(f"{p}: no config.json (Hugging Face model or amoe-student export) and no .pt "
                            "checkpoint here; point at the model directory itself")


def spec_options(info: LoaderInfo) -> list[str]:
    """The option names a loader takes from a spec's query string (its named keyword parameters)."""
    params = inspect.signature(info.fn).parameters.values()
    return [p.name for p in params if p.name != "arg" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def resolve_spec(spec: str) -> tuple[LoaderInfo, str, dict[str, Any]]:
    """What `load_encoder(spec)` would call, checked without loading anything: the loader, its
    argument and the spec's options. Unknown kinds and option names the loader does not take raise,
    as the loader itself would, but before any weights are fetched (a config is checked in CI)."""
    kind, arg, spec_kwargs = parse_spec(spec)
    info = get_loader(kind if kind is not None else detect_kind(arg))
    known = spec_options(info)
    unknown = sorted(set(spec_kwargs) - set(known))
    if unknown:
        raise TypeError(f"encoder spec '{spec}': the {info.kind} loader got unknown option(s) "
                        f"{', '.join(unknown)}; it takes: {', '.join(known) or 'none'}")
    return info, arg, spec_kwargs


def load_encoder(spec: str, **kwargs) -> Encoder:
    """An Encoder from a spec (see the module docstring); kwargs go to the loader."""
    info, arg, spec_kwargs = resolve_spec(spec)
    kind = info.kind
    missing = info.missing_packages()
    if missing:
        raise ImportError(f"encoder kind '{kind}' needs the Python package(s) {missing}; install them "
                          f"(e.g. `pip install {' '.join(missing)}`)")
    merged = {**spec_kwargs, **kwargs}
    return info.fn(arg, **merged)

