"""Files that never look complete when they are not: atomic writes, safetensors + JSON checkpoints.

Our own checkpoints are always safetensors plus a JSON config; never pickle.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import AmoeError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _split_spec(spec: str) -> tuple[str, str, str]:
    """'kind:arg?query' -> (kind + ':', arg, '?' + query); a bare path (or a Windows drive letter) has no kind."""
    body, q, query = spec.partition("?")
    kind, sep, arg = body.partition(":")
    if not sep or len(kind) == 1:
        return "", body, q + query
    return kind + sep, arg, q + query


def relative_spec(spec: str, base: str | os.PathLike, existing: bool = False) -> str:
    """A path or an encoder spec (`kind:PATH?query`) with its path written relative to `base`, so that
    a file written in `base` carries no path of the machine it was made on and still finds its inputs
    after the folder moves with them (`resolve_spec` reads it back). Absolute paths are rewritten; with
    `existing`, exactly the paths that exist here (working-directory-relative ones too). Hub ids and
    URLs stay as given."""
    kind, arg, query = _split_spec(spec)
    if not arg or "://" in spec:
        return spec
    if not (Path(arg).exists() if existing else os.path.isabs(arg)):
        return spec
    try:
        rel = os.path.relpath(os.path.abspath(arg), os.path.abspath(os.path.expanduser(base)))
    except ValueError:   # another drive
        return spec
    return f"{kind}{rel}{query}"


def resolve_spec(spec: str, base: str | os.PathLike) -> str:
    """`relative_spec` read back: a relative path that exists under `base` is made absolute; a path
    relative to the working directory that does not exist there stays as given."""
    kind, arg, query = _split_spec(spec)
    if not arg or os.path.isabs(arg) or "://" in spec:
        return spec
    there = os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(base)), arg))
    return f"{kind}{there}{query}" if os.path.exists(there) else spec


def portable(obj: Any, base: str | os.PathLike) -> Any:
    """A copy of the JSON-able `obj` with every absolute path in it (bare or inside an encoder spec)
    written relative to `base`, the folder the file goes to: written records carry no absolute paths."""
    if isinstance(obj, dict):
        return {k: portable(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, base) for v in obj]
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    return relative_spec(obj, base) if isinstance(obj, str) else obj


def staging_folder(target: str | os.PathLike, identity: dict | None = None, writer: str | None = None) -> Path:
    """The work folder in which the folder `target` is built: beside it, hidden and named so that it
    never looks complete (`.NAME.partial`, or `.NAME.WRITER.partial`); `publish_folder` moves it into
    place. With `identity` (what is being built: seed, sizes, version) a work folder left by a killed
    writer of the same identity is kept, so the caller can reuse what it finished; any other is
    removed. Without, it starts empty, and work folders of earlier writers are removed. The caller
    holds `target`'s lock, so no other writer is alive."""
    import shutil

    target = Path(target)
    work = target.parent / f".{target.name}.{writer}.partial" if writer else target.parent / f".{target.name}.partial"
    stamp = work.with_name(work.name + ".json")     # beside the work folder: its content stays the target's
    if identity is not None and work.is_dir():
        try:
            if json.loads(stamp.read_text()) == json.loads(json.dumps(identity)):
                return work
        except (OSError, ValueError):
            pass
    for stale in target.parent.glob(f".{target.name}.*partial"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.*partial.json"):
        stale.unlink()
    work.mkdir(parents=True)
    if identity is not None:
        write_json_atomic(stamp, identity)
    return work


def publish_folder(work: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished work folder of `staging_folder` into place with one rename, replacing an older
    `target` (a reader sees the old folder or the new one, never a mix)."""
    import shutil

    work, target = Path(work), Path(target)
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
    work.with_name(work.name + ".json").unlink(missing_ok=True)


def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous, non-shared tensors; clone what is shared."""
    seen: set[int] = set()
    clean = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen and v.numel():
            v = v.clone()
        seen.add(v.data_ptr())
        clean[k] = v
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=device)


# safetensors dtype names of the numpy dtypes written in place
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class TensorFileWriter:
    """A safetensors file too large to build in memory, written in place: the main process lays out the
    header and sizes the file (`create`), every process (rank) then writes its rows of the tensors
    (`write`), and the main process renames it into place (`commit`). Until then it lives at
    `PATH.partial`, so it never looks complete. Rows are written with `pwrite` at their exact byte
    offsets and fsynced, not through a shared memory map: ranks on other nodes (NFS) would write back
    whole pages, each over its neighbours' bytes. The layout is plain safetensors (tensors back to
    back, widest items first so every one is aligned), readable by `safetensors.load_file` and
    `map_tensors`."""

    def __init__(self, path: str | os.PathLike, spec: dict[str, tuple[Any, tuple[int, ...]]]):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header, begin = {}, 0
        for name, (dtype, shape) in sorted(spec.items(), key=lambda kv: (-np.dtype(kv[1][0]).itemsize, kv[0])):
            dt = np.dtype(dtype)
            end = begin + dt.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": _ST_NAMES[dt], "shape": [int(v) for v in shape], "data_offsets": [begin, end]}
            begin = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                 # keeps the data 8-byte aligned, as safetensors does
        self.header, self.head_bytes, self.data_bytes = header, raw, begin
        self.data_start = 8 + len(raw)

    def create(self) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "wb") as f:
            f.write(len(self.head_bytes).to_bytes(8, "little") + self.head_bytes)
            f.truncate(self.data_start + self.data_bytes)    # sparse until written
            os.fsync(f.fileno())

    def write(self, name: str, start: int, values) -> None:
        """Rows `start`.. of tensor `name`, durable on return."""
        h = self.header[name]
        dt = np.dtype(_ST_DTYPES[h["dtype"]])
        row = dt.itemsize * int(np.prod(h["shape"][1:], dtype=np.int64))
        data = memoryview(np.ascontiguousarray(values, dtype=dt).reshape(-1).view(np.uint8))
        offset = self.data_start + h["data_offsets"][0] + int(start) * row
        if offset + len(data) > self.data_start + h["data_offsets"][1]:
            raise ValueError(f"rows {start}.. of {name!r} run past its end in {self.partial}")
        fd = os.open(self.partial, os.O_WRONLY)
        try:
            done = 0
            while done < len(data):                   # pwrite may write less than asked
                done += os.pwrite(fd, data[done:done + (1 << 26)], offset + done)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rows(self, name: str) -> "_RowSink":
        """`sink[a:b] = values` writes rows a..b-1 of `name` (for code that fills an array slice by slice)."""
        return _RowSink(self, name)

    def read(self, name: str) -> np.ndarray:
        """A read-only map of what has been written so far (after the writers' barrier)."""
        return _map(self.partial, self.header[name], self.data_start, "r")

    def commit(self) -> None:
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.partial, self.path)


class _RowSink:
    def __init__(self, writer: TensorFileWriter, name: str):
        self.writer, self.name = writer, name

    def __setitem__(self, rows: slice, values) -> None:
        self.writer.write(self.name, rows.start or 0, values)


def map_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as copy-on-write memory maps: nothing is read until used, and
    ranks on one node share the pages (a level of 20M centroids is 57 GiB)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header of {n} bytes in a {size}-byte file)")
        header = json.loads(f.read(n))
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        begin, end = h["data_offsets"]
        if h["dtype"] not in _ST_DTYPES or end > size - 8 - n:
            raise ValueError(f"{path}: tensor {name!r} has dtype {h['dtype']} or offsets {begin}-{end} this "
                             f"reader does not handle; load it with safetensors.load_file")
        out[name] = _map(path, h, 8 + n, "c")
    return out


def _map(path: Path, h: dict, data_start: int, mode: str) -> np.ndarray:
    """One tensor of a safetensors header `h` entry as a memory map (numpy cannot map zero bytes)."""
    dt, shape = np.dtype(_ST_DTYPES[h["dtype"]]), tuple(h["shape"])
    begin, end = h["data_offsets"]
    return np.memmap(path, dtype=dt, mode=mode, shape=shape, offset=data_start + begin) if end > begin \
        else np.zeros(shape, dt)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file read with weights_only=True (an unsafe
    pickle is refused, never run). A checkpoint dict wrapping it ("state_dict_ema", "state_dict",
    "model") is unwrapped, and a 'module.' / 'model.' prefix on every key is stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unsafe pickle (code objects etc.) is refused here
            raise ValueError(f"{path} is not a plain tensor state_dict loadable with weights_only=True: {e}") from e
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    sd = dict(sd)
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, preprocessing settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- locks

class LockHeld(AmoeError, RuntimeError):
    """Another live process holds the lock (a run folder, a benchmark cell)."""


class FileLock:
    """An exclusive, non-blocking lock on `path` (POSIX `flock`), released when this process ends,
    however it ends: the lock of a killed process is simply free again, so a stale lock is taken
    over without asking. The file holds the holder's pid, host and start time, for the message.

    A forked child (a DataLoader worker, a pool process) closes its copy of the descriptor at once:
    `flock` belongs to the open file, so a child that outlived a killed holder would otherwise keep
    the folder locked until it noticed its parent was gone."""

    def __init__(self, path: str | os.PathLike, what: str = "process"):
        self.path = Path(path)
        self.what = what          # who holds it, for the message another process gets
        self._fd: int | None = None
        _LOCKS.add(self)

    def acquire(self) -> bool:
        """True if this process now holds the lock; False if another live process does."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        self._fd = fd
        return True

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_LOCKS: "weakref.WeakSet[FileLock]" = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    # close, never LOCK_UN: unlocking here would free the parent's lock too
    for lock in list(_LOCKS):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_run_folder(folder: str | os.PathLike, what: str, name: str = ".lock") -> FileLock:
    """Hold `folder`'s run lock (FOLDER/.lock, or FOLDER/`name` for one output among several in a folder)
    or raise LockHeld naming the process that has it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(folder) / name, what)
    if not lock.acquire():
        h = lock.holder()
        raise LockHeld(f"{folder} is in use by a {h.get('what', 'process')} (pid {h.get('pid', '?')} on "
                       f"{h.get('host', '?')} since {h.get('since', '?')}); wait for it to finish or use another "
                       "output folder")
    return lock
