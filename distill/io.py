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
