"""Load untrusted pickles (the refer toolkit's `refs(*).p`) admitting only plain data.

A pickle can run arbitrary code when loaded (any callable reached through GLOBAL/REDUCE). The refer
files only hold lists/dicts of strings and numbers, so the unpickler here refuses to resolve *any*
global: builtin containers and scalars are built by dedicated opcodes and need no lookup. The only
globals we admit are the constructors Python itself emits for plain containers under protocol 2
(`set`, `frozenset` and, for py2-era pickles, `bytearray`) plus `_codecs.encode`, which Python 3
writes for bytes under protocol 2 and which only turns a str into bytes. None of them may take a size
from the stream: `bytearray(10**9)` would turn a 33-byte file into a gigabyte, so `bytearray` only
copies data that is already in the stream (str, bytes, a list of ints). Nesting deeper than
`MAX_DEPTH` is refused with a clear error rather than a RecursionError.

Python-2 pickles (str fields written as py2 `str`) load with `encoding="bytes"` so nothing is
mis-decoded; every bytes object is then decoded (UTF-8, falling back to latin-1) to `str`.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

from distill.errors import AmoeError

MAX_DEPTH = 200   # refer files nest 4 deep; anything far deeper is not annotation data


def _bytearray(source: Any = b"", encoding: str | None = None) -> bytearray:
    """`bytearray` for data already in the stream only: never `bytearray(n)` (n zero bytes)."""
    if isinstance(source, str):
        return bytearray(source, encoding or "latin-1")
    if isinstance(source, (bytes, bytearray)) or (isinstance(source, list)
                                                 and all(isinstance(v, int) for v in source)):
        return bytearray(source)
    raise UnsafePickleError(f"refused to load pickle: bytearray({type(source).__name__}) would allocate memory "
                            "the file does not hold")


# (module, name) -> the object to use; nothing else is resolvable.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "set"): set,          # python 2 spelling
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "bytearray"): _bytearray,
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


def _decode_bytes(obj: Any, depth: int = 0) -> Any:
    """Recursively turn bytes into str (py2 `str` fields); containers rebuilt with decoded members."""
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"refused to load pickle: data nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, (bytes, bytearray)):
        try:
            return bytes(obj).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(obj).decode("latin-1")
    if isinstance(obj, dict):
        return {_decode_bytes(k, depth + 1): _decode_bytes(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_bytes(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode_bytes(v, depth + 1) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_decode_bytes(v, depth + 1) for v in obj)
    return obj


def _check_depth(obj: Any) -> None:
    """Without decoding, the nesting limit still holds (iteratively: no recursion to overflow)."""
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnsafePickleError(f"refused to load pickle: data nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for kv in item.items() for v in kv]
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += [(v, depth + 1) for v in item]


def safe_loads(data: bytes, decode_bytes: bool = True) -> Any:
    """Unpickle `data` admitting only plain builtin data; raise UnsafePickleError otherwise."""
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError:
        raise
    except RecursionError:
        raise UnsafePickleError("refused to load pickle: data nested deeper than Python can unpickle") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as e:
        raise UnsafePickleError(f"not a readable pickle ({type(e).__name__}: {e}); the file is truncated "
                                "or not a refer annotation file") from None
    _check_depth(obj)
    return _decode_bytes(obj) if decode_bytes else obj


def safe_load(path: str | os.PathLike, decode_bytes: bool = True) -> Any:
    """`safe_loads` of a file; the error names the file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return safe_loads(data, decode_bytes=decode_bytes)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
