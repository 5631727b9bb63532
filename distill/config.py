"""The one config mechanism: JSON config files by name or path, deep merges, and `--set key=value`.

Every configurable part of amoe (distillation recipes, teacher recipes, grounding configs) reads its
files and applies its overrides through these functions, so they all share one syntax and one kind
of error:
- `--set a.b.c=VALUE`: VALUE is parsed as JSON when it can be (numbers, true/false/null, lists,
  objects), else taken as a string (paths need no quotes); a path through a list takes an index
  (`teachers.0.relational=rkd`).
- strict: a key the config does not have is refused, naming the nearest known keys.
- `${NAME}` in a string is the one interpolation syntax (recipes' `${world}`, suites' `${AMOE_DATA}`):
  filled from the given variables, then the environment.
- every error is a `ConfigError` (one line, exit code 2 on the CLI).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import numbers
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from distill.errors import AmoeError


class ConfigError(AmoeError, ValueError):
    """A config is malformed: unknown key, wrong type or invalid value (the message names it)."""


def unknown_keys_error(unknown: Iterable[str], known: Iterable[str], where: str) -> ConfigError:
    """`unknown key 'stepz' in where (did you mean 'steps'?); known: ...`"""
    unknown, known = sorted(unknown), sorted(map(str, known))
    hints = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1, cutoff=0.6)]
    hint = f" (did you mean {', '.join(repr(h) for h in dict.fromkeys(hints))}?)" if hints else ""
    keys = ", ".join(repr(k) for k in unknown)
    return ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {keys} in {where}{hint}; "
                       f"known: {', '.join(known)}")


def read_config_file(spec: str | os.PathLike, builtin_dir: Path, what: str,
                     error: type[ConfigError] | None = None) -> tuple[dict, Path]:
    """The one "name or path" resolver: a JSON config by path, or by name from `builtin_dir` (`NAME` or
    `NAME.json`). -> (raw, path). Problems are an `error` (default ConfigError) naming the file."""
    error = error or ConfigError
    path = Path(spec)
    if not path.is_file():
        alt = builtin_dir / (path.name if path.suffix == ".json" else path.name + ".json")
        if not alt.is_file():
            known = sorted(p.stem for p in builtin_dir.glob("*.json"))
            raise error(f"{what} {str(spec)!r} not found: give a JSON path or one of {', '.join(known)}")
        path = alt
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} is a JSON object, got {type(raw).__name__}")
    return raw, path


def merge(base: Mapping, over: Mapping, strict: bool = False, where: str = "the config") -> dict:
    """`over` merged into a copy of `base`, dicts merged key by key at every depth. With `strict`, a
    key `base` does not have is refused (`ConfigError` naming the nearest known keys)."""
    out = copy.deepcopy(dict(base))
    _merge_into(out, over, strict, where)
    return out


def _merge_into(out: dict, over: Mapping, strict: bool, where: str) -> None:
    if strict and set(over) - set(out):
        raise unknown_keys_error(set(over) - set(out), out, where)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            _merge_into(out[k], v, strict, f"'{k}' of {where}")
        elif strict and isinstance(out.get(k), dict) and v is not None:
            raise ConfigError(f"{where}: '{k}' takes an object of settings, got {v!r}")
        else:
            out[k] = copy.deepcopy(v)


def flat_keys(raw: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a JSON config, lists indexed as the overrides spell them (teachers.0.spec)."""
    items = raw.items() if isinstance(raw, Mapping) else enumerate(raw) if isinstance(raw, list) else None
    if items is None or not raw:
        return {prefix[:-1]: raw} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flat_keys(v, f"{prefix}{k}."))
    return out


def differing_keys(a: Mapping, b: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """The dotted keys whose values differ between two configs (or that only one has), except those
    equal to or below an `ignore` prefix."""
    fa, fb = flat_keys(a), flat_keys(b)
    skip = tuple(ignore)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, ...) != fb.get(k, ...)
                  and not any(k == p or k.startswith(p + ".") for p in skip))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` -> (["a", "b"], parsed VALUE)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value          # bare strings (paths) need no quotes
    return key.strip().split("."), parsed


def apply_overrides(raw: Mapping, overrides: list[str] | Mapping | None, strict: bool = False,
                    where: str = "the config") -> dict:
    """Dotted `key=value` overrides (strings, or a {dotted key: value} mapping) on a copy of `raw`.
    A path that does not exist in the config's shape (an index past the end of a list, a key below a
    number) is refused naming the override; with `strict`, so is a key the config does not have."""
    raw = copy.deepcopy(dict(raw))
    if not overrides:
        return raw
    items = overrides.items() if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else list(key)
        shown = ".".join(map(str, path))
        node: Any = raw
        for j, part in enumerate(path):
            last = j == len(path) - 1
            here = ".".join(map(str, path[:j])) or where
            if isinstance(node, list):
                if not str(part).isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {shown}: {here} is a list of {len(node)}; '{part}' is not an index "
                                      f"into it (0..{len(node) - 1})")
                part = int(part)
            elif isinstance(node, dict):
                if strict and part not in node:
                    raise unknown_keys_error([part], node, f"--set {shown}: {here}")
                if not last:
                    node = node.setdefault(part, {})
                    continue
            else:
                raise ConfigError(f"--set {shown}: {here} is the value {node!r}, which has no key '{part}'")
            if last:
                node[part] = value
            else:
                node = node[part]
    return raw


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(text: str, variables: Mapping[str, Any] | None = None, where: str = "",
                how_to_set: str = "pass --var {name}=VALUE or export {name}=VALUE",
                environment: bool = True, error: type[ConfigError] = ConfigError) -> str:
    """Fill every `${NAME}` in `text` from `variables`, then (when `environment`) the environment;
    a variable set nowhere is an `error` (a ConfigError) naming it and `how_to_set` (`{name}` filled)."""
    variables = variables or {}

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if variables.get(name) is not None:
            return str(variables[name])
        if environment and name in os.environ:
            return os.environ[name]
        raise error(f"{where or text}: ${{{name}}} is not set; {how_to_set.format(name=name)}")

    return _VAR.sub(sub, text)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else parse_dataclass(tp, value, where)   # already built: as is
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:                  # tuple[X, ...] from a JSON list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_check_type(v, args[0], f"{where}.{i}") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:      # numpy integers and whole floats (JSON's 1e9) are integers too
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
                and float(value).is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def parse_dataclass(cls, raw: Any, where: str, top: str = "the config"):
    """A dataclass from a JSON object, strictly: unknown keys refused naming the nearest known ones,
    each value checked against the field's type (nested dataclasses, lists, tuples, optionals,
    numbers, strings, booleans), a missing required key named. `where` prefixes the keys in
    messages; `top` names the object when `where` is empty."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or top}: expected an object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise unknown_keys_error(unknown, fields, where or top)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            kwargs[name] = _check_type(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'")
    return cls(**kwargs)
