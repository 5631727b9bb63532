"""Feature cache shared by every benchmark task.

An entry is one encoder's features of one dataset split, keyed by everything that can change them:
model fingerprint (a digest of the weights), dataset (reader, root, split, reader kwargs), a
fingerprint of the items actually read (each image's path, size, mtime and inode, or its content hash
on request: see `items_fingerprint`), resolution, preprocessing fingerprint, `--limit`, and whether
patch features were kept. Images swapped, edited or deleted in place therefore make a new key, and
an entry whose item count disagrees with the dataset is never served. Two files per entry:

    CACHE/<model-slug>/<key>.safetensors   tensors (summary/<head>, patches/<head>, grids, cls, registers)
    CACHE/<model-slug>/<key>.json          sidecar: the key fields, sha256 of the tensor file, timings

The tensor file is written atomically first, then the sidecar; an entry counts only when its sidecar
exists and the tensor file's sha256 matches it. A corrupt or truncated file is reported with a
warning and recomputed. Because the key does not name the task, every task on the same
(model, dataset, resolution) re-uses the same features.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from distill.features import Features
from distill.io import file_sha256, fingerprint, load_tensors, save_tensors_atomic, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: keys hold the items' fingerprint and count; bump when the on-disk layout of an entry changes


class CorruptCacheWarning(UserWarning):
    """A cache entry failed its checksum or could not be read; it is recomputed."""


class CacheWriteWarning(UserWarning):
    """The cache folder cannot be written; features are computed and used without being stored."""


def default_cache_dir() -> Path:
    """$AMOE_CACHE, else ~/.cache/amoe/features."""
    env = os.environ.get("AMOE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "amoe" / "features"


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "x"


# ---------------------------------------------------------------- Features <-> flat tensors

def features_to_tensors(feats: Features) -> dict[str, torch.Tensor]:
    """Flatten Features for safetensors: per-image patch lists are concatenated, grids kept beside."""
    out: dict[str, torch.Tensor] = {}
    for head, v in feats.summary.items():
        out[f"summary/{head}"] = v.detach().float().cpu()
    for head, parts in feats.patches.items():
        out[f"patches/{head}"] = (torch.cat([p.detach().float().cpu() for p in parts]) if parts
                                  else torch.zeros(0, 0))
    if feats.patches:
        out["grids"] = torch.tensor(feats.grids, dtype=torch.int64).reshape(-1, 2)
    if feats.cls is not None:
        out["cls"] = feats.cls.detach().float().cpu()
    if feats.registers is not None:
        out["registers"] = feats.registers.detach().float().cpu()
    return out


def tensors_to_features(tensors: dict[str, torch.Tensor], with_patches: bool = True) -> Features:
    summary = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("summary/")}
    patches: dict[str, list[torch.Tensor]] = {}
    grids: list[tuple[int, int]] = []
    if with_patches and "grids" in tensors:
        grids = [(int(h), int(w)) for h, w in tensors["grids"].tolist()]
        sizes = [h * w for h, w in grids]
        for k, v in tensors.items():
            if k.startswith("patches/"):
                patches[k.split("/", 1)[1]] = list(torch.split(v, sizes)) if sizes else []
    return Features(summary=summary, patches=patches, grids=grids,
                    cls=tensors.get("cls"), registers=tensors.get("registers"))


# ---------------------------------------------------------------- keys

@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines an encoder's features of one dataset split."""

    model: str                 # encoder.fingerprint()
    reader: str
    root: str                  # resolved absolute path
    split: str
    reader_kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    resolution: int | None = None
    preprocess: str = ""       # fingerprint(encoder.preprocess_config())
    limit: int | None = None
    patches: bool = False
    items: str = ""            # items_fingerprint() of the images read
    n: int | None = None       # how many images

    def as_dict(self) -> dict:
        return {"format": CACHE_FORMAT, "model": self.model, "reader": self.reader, "root": self.root,
                "split": self.split, "reader_kwargs": self.reader_kwargs, "resolution": self.resolution,
                "preprocess": self.preprocess, "limit": self.limit, "patches": self.patches,
                "items": self.items, "n": self.n}

    def digest(self) -> str:
        return fingerprint(self.as_dict())

    def filename(self) -> str:
        res = "native" if self.resolution is None else str(self.resolution)
        lim = "all" if self.limit is None else f"n{self.limit}"
        kind = "patches" if self.patches else "summary"
        return f"{_slug(self.reader, 20)}-{_slug(self.split, 20)}-{res}-{lim}-{kind}-{self.digest()}"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    text_hits: int = 0
    text_misses: int = 0
    compute_s: float = 0.0   # time spent computing features (misses)
    load_s: float = 0.0      # time spent loading cached features (hits)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FeatureCache:
    """Disk cache of Features (image) and text embeddings, checksummed, written atomically."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.stats = CacheStats()

    # -- paths
    def _paths(self, model: str, name: str) -> tuple[Path, Path]:
        folder = self.root / _slug(model)
        return folder / f"{name}.safetensors", folder / f"{name}.json"

    # -- generic entry read/write
    def _read(self, tensor_path: Path, meta_path: Path, expect: dict) -> dict[str, torch.Tensor] | None:
        """Tensors of a complete, intact entry, or None (missing, incomplete, mismatched or corrupt)."""
        if not meta_path.exists():
            return None  # no sidecar: never finished (or never started)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            self._corrupt(meta_path, f"unreadable sidecar ({e})")
            return None
        if meta.get("key") != json.loads(json.dumps(expect)):
            # a digest collision or a hand-edited file: treat as a miss, never use foreign features
            self._corrupt(meta_path, "sidecar key does not match the requested key")
            return None
        if not tensor_path.exists():
            self._corrupt(tensor_path, "tensor file missing")
            return None
        actual = file_sha256(tensor_path)
        if actual != meta.get("sha256"):
            self._corrupt(tensor_path, f"sha256 {actual[:12]} != recorded {str(meta.get('sha256'))[:12]}")
            return None
        try:
            return load_tensors(tensor_path)
        except Exception as e:  # checksum matched but the format is bad: still recompute
            self._corrupt(tensor_path, f"cannot be read ({type(e).__name__}: {e})")
            return None

    def _corrupt(self, path: Path, why: str) -> None:
        self.stats.corrupt += 1
        warnings.warn(f"feature cache entry {path} is corrupt: {why}; recomputing it",
                      CorruptCacheWarning, stacklevel=3)

    def _write(self, tensor_path: Path, meta_path: Path, key: dict, tensors: dict[str, torch.Tensor],
               extra: dict) -> None:
        if meta_path.exists():
            meta_path.unlink()  # the old sidecar must not vouch for the new tensor file mid-write
        save_tensors_atomic(tensor_path, tensors, metadata={"amoe_cache_key": json.dumps(key, sort_keys=True)})
        write_json_atomic(meta_path, {"key": key, "sha256": file_sha256(tensor_path),
                                      "bytes": tensor_path.stat().st_size, "created": time.time(), **extra})

    # -- image features
    def path_for(self, key: FeatureKey) -> Path:
        return self._paths(key.model, key.filename())[0]

    def lookup(self, key: FeatureKey) -> Features | None:
        """Cached features for `key`; a summary-only request is also served by a patches entry."""
        if not self.enabled:
            return None
        candidates = [key] if key.patches else [key, _with_patches(key)]
        for k in candidates:
            t0 = time.perf_counter()
            tensors = self._read(*self._paths(k.model, k.filename()), expect=k.as_dict())
            if tensors is not None:
                self.stats.load_s += time.perf_counter() - t0
                return tensors_to_features(tensors, with_patches=key.patches)
        return None

    def store(self, key: FeatureKey, feats: Features, extra: dict | None = None) -> Path:
        tensor_path, meta_path = self._paths(key.model, key.filename())
        self._write(tensor_path, meta_path, key.as_dict(), features_to_tensors(feats),
                    {"n": len(feats), **(extra or {})})
        return tensor_path

    def get_or_compute(self, key: FeatureKey, compute: Callable[[], Features],
                       write: bool = True, refresh: bool = False) -> Features:
        """Cached features, or `compute()` them and store them (only when `write`: rank 0).

        `refresh` (`--force`) never serves the cache: it recomputes and overwrites the entry."""
        feats = None if refresh else self.lookup(key)
        if feats is not None and key.n is not None and len(feats) != key.n:
            self._corrupt(self.path_for(key), f"holds {len(feats)} items, the dataset has {key.n}")
            feats = None
        if feats is not None:
            self.stats.hits += 1
            return feats
        self.stats.misses += 1
        t0 = time.perf_counter()
        feats = compute()
        seconds = time.perf_counter() - t0
        self.stats.compute_s += seconds
        if self.enabled and write:
            try:
                self.store(key, feats, extra={"compute_s": round(seconds, 4)})
            except OSError as e:   # the cache is an optimisation: a read-only or full disk costs time only
                warnings.warn(f"feature cache {self.root} cannot be written ({e}); going on without it",
                              CacheWriteWarning, stacklevel=2)
        return feats

    # -- text embeddings
    def get_or_compute_text(self, model: str, head: str, texts: list[str],
                            compute: Callable[[], torch.Tensor], write: bool = True,
                            refresh: bool = False) -> torch.Tensor:
        key = {"format": CACHE_FORMAT, "kind": "text", "model": model, "head": head,
               "texts": fingerprint(list(texts)), "n": len(texts)}
        name = f"text-{_slug(head, 20)}-{fingerprint(key)}"
        tensor_path, meta_path = self._paths(model, name)
        if self.enabled and not refresh:
            tensors = self._read(tensor_path, meta_path, expect=key)
            if tensors is not None:
                self.stats.text_hits += 1
                return tensors["text"]
        self.stats.text_misses += 1
        emb = compute()
        if self.enabled and write:
            try:
                self._write(tensor_path, meta_path, key, {"text": emb.detach().float().cpu()}, {})
            except OSError as e:
                warnings.warn(f"feature cache {self.root} cannot be written ({e}); going on without it",
                              CacheWriteWarning, stacklevel=2)
        return emb


def _with_patches(key: FeatureKey) -> FeatureKey:
    return replace(key, patches=True)


def items_fingerprint(dataset, content: bool = False) -> str:
    """What identifies the images a dataset will hand out, in order: each file's path, size,
    modification time and inode (a swap by `mv` keeps mtimes but not the path -> inode mapping), or
    with `content` its sha256 as well. A dataset without `image_paths` is identified by its length."""
    import hashlib

    paths = getattr(dataset, "image_paths", None)
    if not isinstance(paths, (list, tuple)) or len(paths) != len(dataset):
        return fingerprint({"n": len(dataset)})
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
            if content:
                h.update(file_sha256(p).encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:24]
