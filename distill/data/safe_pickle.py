"""Load untrusted pickles (the refer toolkit's `refs(*).p`) admitting only plain data.

A pickle can run arbitrary code when loaded (any callable reached through GLOBAL/REDUCE). The refer
files only hold lists/dicts of strings and numbers, so the unpickler here refuses to resolve *any*
global: builtin containers and scalars are built by dedicated opcodes and need no lookup. The only
globals we admit are the constructors Python itself emits for plain containers under protocol 2
(`set`, `frozenset` and, for py2-era pickles, `bytearray`) plus `_codecs.encode`, which Python 3
writes for bytes under protocol 2 and which only turns a str into bytes.

Python-2 pickles (str fields written as py2 `str`) load with `encoding="bytes"` so nothing is
mis-decoded; every bytes object is then decoded (UTF-8, falling back to latin-1) to `str`.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

from distill.errors import AmoeError

# (module, name) -> the object to use; nothing else is resolvable.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set,          # python 2 spelling
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "bytearray"): bytearray,
}


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode` (protocol 2's bytes constructor): only str -> bytes."""
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise UnsafePickleError("_codecs.encode called with non-string arguments")
    return text.encode(encoding)


_ALLOWED_GLOBALS[("_codecs", "encode")] = _codecs_encode


class UnsafePickleError(AmoeError, pickle.UnpicklingError):
    """The pickle asks for something other than plain data."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load pickle: it references '{module}.{name}', but only plain data "
                "(dict, list, tuple, str, bytes, int, float, bool, None, set) is allowed. The file may be "
                "malicious or not a refer annotation file; get it from the original source.") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused to load pickle: persistent ids are not plain data")


def _decode_bytes(obj: Any) -> Any:
    """Recursively turn bytes into str (py2 `str` fields); containers rebuilt with decoded members."""
    if isinstance(obj, (bytes, bytearray)):
        try:
            return bytes(obj).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(obj).decode("latin-1")
    if isinstance(obj, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_bytes(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode_bytes(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_decode_bytes(v) for v in obj)
    return obj


def safe_loads(data: bytes, decode_bytes: bool = True) -> Any:
    """Unpickle `data` admitting only plain builtin data; raise UnsafePickleError otherwise."""
    obj = _PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()
    return _decode_bytes(obj) if decode_bytes else obj


def safe_load(path: str | os.PathLike, decode_bytes: bool = True) -> Any:
    """`safe_loads` of a file; the error names the file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return safe_loads(data, decode_bytes=decode_bytes)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
