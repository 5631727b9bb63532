"""The harness side of the task contract: `HarnessContext` implements `TaskContext`.

A task asks the context for a dataset role ("train" / "test"), for that role's features and for text
embeddings; the context reads the dataset through `distill.data.load_dataset`, encodes it in batches
with a progress bar, and keeps everything in the shared feature cache. Under torchrun each rank
encodes one contiguous slice of the images, the slices are gathered in dataset order, and rank 0
writes the cache entry.

Features handed to tasks are float32 on the CPU, whether they came from the cache or were just
computed, so a cache hit and a miss give the same numbers; tasks move them to `ctx.device`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.data.base import UnreadableImageError
from distill.encoders.base import Encoder
from distill.features import Features
from distill.io import fingerprint
from distill.stats import ItemScores

from benchmarks.cache import FeatureCache, FeatureKey, items_fingerprint


# ---------------------------------------------------------------- limited datasets

LIMIT_SEED = 0   # the subset `--limit` takes is fixed: the same N items on every run and machine


def limited_indices(base: Dataset, limit: int | None, seed: int = LIMIT_SEED,
                    candidates: list[int] | None = None) -> tuple[list[int], str | None]:
    """The items `--limit N` keeps, in dataset order, and the rule that chose them.

    Labelled datasets (`targets`) are stratified: the classes take turns, each giving its next item
    from a seeded shuffle of its own, so N >= the class count keeps every class (a kNN bank of one
    class would measure nothing). Other datasets get a seeded uniform sample. The first N items of a
    sorted split are never the rule: they are one or two classes. `candidates` (default: every item)
    are the items to choose from, e.g. the readable ones."""
    n = len(base)
    pool = list(range(n)) if candidates is None else sorted(candidates)
    if limit is None or limit >= len(pool):
        return pool, None
    import random
    rng = random.Random(seed)
    targets = getattr(base, "targets", None)
    if isinstance(targets, (list, tuple)) and len(targets) == n:
        by_class: dict[int, list[int]] = {}
        for i in pool:
            by_class.setdefault(int(targets[i]), []).append(i)
        queues = []
        for c in sorted(by_class):
            items = by_class[c]
            rng.shuffle(items)
            queues.append(items)
        chosen: list[int] = []
        depth = 0
        while len(chosen) < limit:
            for q in queues:
                if depth < len(q) and len(chosen) < limit:
                    chosen.append(q[depth])
            depth += 1
        return sorted(chosen), "stratified"
    return sorted(rng.sample(pool, int(limit))), "random"


def item_files(base: Dataset, i: int) -> list[str]:
    """The files item `i` is read from (its image, and its label map for segmentation); [] when the
    dataset does not list its files (then its unreadable items cannot be left out, only named)."""
    out = []
    for name in ("image_paths", "label_paths"):
        paths = getattr(base, name, None)
        if isinstance(paths, (list, tuple)) and len(paths) == len(base):
            out.append(str(paths[i]))
    return out


class LimitedDataset(Dataset):
    """`limit` items of a reader's dataset (see `limited_indices`), per-item attributes cut to match.

    Per-dataset attributes (`classes`, `templates`, `ignore_index`...) are forwarded unchanged;
    per-item lists (`targets`, `captions`, `image_paths`...) are subset so they stay aligned.
    `limit_rule` says how the items were chosen ("stratified", "random", or None for all of them).
    """

    _PER_ITEM = ("targets", "captions", "image_paths", "label_paths", "samples", "imgs", "labels", "image_ids")
    _PER_ITEM_READERS = ("load_label", "load_image")

    def __init__(self, base: Dataset, limit: int | None, leave_out: frozenset[str] = frozenset()):
        self.base = base
        candidates = None
        self.left_out: list[str] = []     # the unreadable files whose items are not evaluated
        if leave_out:
            candidates = []
            for i in range(len(base)):
                bad = [f for f in item_files(base, i) if f in leave_out]
                if bad:
                    self.left_out += bad
                else:
                    candidates.append(i)
        self.indices, self.limit_rule = limited_indices(base, limit, candidates=candidates)
        self.n = len(self.indices)
        for name in self._PER_ITEM:
            value = getattr(base, name, None)
            if isinstance(value, (list, tuple)) and len(value) == len(base):
                setattr(self, name, [value[i] for i in self.indices])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} items")
        return self.base[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set on self: forward per-dataset attributes, and per-item
        # readers (`load_label(i)`) with the index mapped to the base dataset's
        if name in ("base", "indices", "left_out"):
            raise AttributeError(name)
        value = getattr(self.base, name)
        if name in self._PER_ITEM_READERS:
            return lambda i: value(self.indices[i])
        return value


def image_of(item) -> Any:
    """The image of a dataset item: classification/segmentation tuples hold it first."""
    if isinstance(item, (tuple, list)):
        return item[0]
    image = getattr(item, "image", None)
    return image if image is not None else item


@dataclass
class _Unreadable:
    """What `_Preprocessed` yields for an item whose file does not decode."""

    files: list[str]


class _Preprocessed(Dataset):
    """Dataset items -> the encoder's preprocessed CHW tensors (so a DataLoader can prefetch them)."""

    def __init__(self, ds: Dataset, preprocess: Callable, resolution: int | None, indices: range):
        self.ds, self.preprocess, self.resolution, self.indices = ds, preprocess, resolution, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor | _Unreadable:
        try:
            item = self.ds[self.indices[i]]
        except UnreadableImageError as e:   # finish the pass, so one run names every bad file
            return _Unreadable(e.files)
        return self.preprocess(image_of(item), resolution=self.resolution)


def _as_list(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch  # keep images of different sizes apart; the encoder packs or pads them


# ---------------------------------------------------------------- distributed helpers

def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if dist_info()[1] > 1 else "cuda"
    return "cpu"


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous slice of n items for `rank`, so gathering the slices in rank order keeps dataset order."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def encode_dataset(encoder: Encoder, ds: Dataset, resolution: int | None, batch_size: int = 32,
                   num_workers: int = 0, patches: bool = False, desc: str = "features",
                   show_progress: bool = True) -> Features:
    """Encode every image of `ds` (this rank's slice under torch.distributed, then gathered).

    Returns CPU float32 Features in dataset order on every rank.
    """
    rank, world = dist_info()
    indices = shard_range(len(ds), rank, world)
    loader = DataLoader(_Preprocessed(ds, encoder.preprocess, resolution, indices), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    parts: list[Features] = []
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not show_progress or rank != 0,
               dynamic_ncols=True, leave=False)
    unreadable: list[str] = []
    with torch.inference_mode():
        for batch in loader:
            unreadable += [f for x in batch if isinstance(x, _Unreadable) for f in x.files]
            batch = [x for x in batch if not isinstance(x, _Unreadable)]
            if batch:
                f = encoder.encode([x.to(encoder.device, encoder.dtype) for x in batch])
                if not patches:
                    f = Features(summary=f.summary, cls=f.cls, registers=f.registers)
                parts.append(f.to("cpu", torch.float32))
            bar.update(len(batch))
    bar.close()
    if world > 1:   # every rank raises together, naming every rank's files
        every: list[list[str] | None] = [None] * world
        dist.all_gather_object(every, unreadable)
        unreadable = [f for files in every for f in files or []]
    if unreadable:
        raise UnreadableImageError(getattr(ds, "name", desc), unreadable)
    local = Features.concat(parts) if parts else None
    if world == 1:
        if local is None:
            raise ValueError(f"{desc}: the dataset is empty; nothing to encode")
        return local
    gathered: list[Features | None] = [None] * world
    dist.all_gather_object(gathered, local)  # gloo and nccl both carry pickled CPU objects
    present = [g for g in gathered if g is not None]
    if not present:
        raise ValueError(f"{desc}: the dataset is empty; nothing to encode")
    return Features.concat(present)


# ---------------------------------------------------------------- the context

class HarnessContext:
    """`TaskContext` for one (encoder, dataset entry, resolution, limit) cell."""

    def __init__(self, encoder: Encoder, dataset_cfg: dict, resolution: int | None = None,
                 limit: int | None = None, cache: FeatureCache | None = None, batch_size: int = 32,
                 num_workers: int = 0, show_progress: bool = True,
                 load_dataset: Callable[..., Dataset] | None = None, refresh: bool = False,
                 content_hash: bool = False, leave_out: Iterable[str] = ()):
        self.encoder = encoder
        self.dataset_cfg = dataset_cfg
        self.resolution = resolution
        self.limit = limit
        self.device = torch.device(getattr(encoder, "device", "cpu"))
        self.cache = cache if cache is not None else FeatureCache(enabled=False)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.show_progress = show_progress
        self._load_dataset = load_dataset
        self.refresh = refresh            # --force: recompute features, never serve the cache
        self.content_hash = content_hash  # identify images by their bytes, not only path/size/mtime
        self._items: dict[str, str] = {}
        self._datasets: dict[str, Dataset] = {}
        self._memo: dict[tuple[str, bool], Features] = {}  # a cell asks for the same role more than once
        self.feature_seconds = 0.0   # wall time inside features()/text_features(): extraction or cache loads
        self.rank, self.world = dist_info()
        self.items: dict[str, ItemScores] = {}   # per-item scores the task recorded, by metric name
        self.leave_out = frozenset(str(f) for f in leave_out)   # unreadable files: their items are skipped

    # -- per-item scores (bootstrap intervals, paired comparisons)
    def record_items(self, metric: str, scores: ItemScores) -> None:
        """Let the harness resample the evaluation items of `metric` (see distill.stats)."""
        self.items[metric] = scores

    # -- datasets
    def split_of(self, role: str) -> str:
        roles = self.dataset_cfg.get("roles") or {}
        if role not in roles:
            raise KeyError(f"dataset '{self.dataset_cfg.get('id')}' has no role '{role}' "
                           f"(its roles: {', '.join(roles) or 'none'}); add it under \"roles\" in the suite")
        return roles[role]

    def dataset(self, role: str) -> Dataset:
        if role not in self._datasets:
            loader = self._load_dataset
            if loader is None:
                from distill.data import load_dataset as loader  # the dataset registry (distill.data)
            cfg = self.dataset_cfg
            base = loader(cfg["reader"], cfg["root"], self.split_of(role), **(cfg.get("reader_kwargs") or {}))
            self._datasets[role] = LimitedDataset(base, self.limit, self.leave_out)
        return self._datasets[role]

    def skip_unreadable(self, files: Iterable[str]) -> bool:
        """Leave the items of these unreadable files out from now on; False when they belong to no
        item this context can leave out (a dataset that does not list its files). The datasets and
        features are read again, so no task ever sees the old item list."""
        files = {str(f) for f in files} - self.leave_out
        known = {f for ds in self._datasets.values() for i in range(len(ds.base)) for f in item_files(ds.base, i)}
        if not files or not files <= known:
            return False
        self.leave_out = self.leave_out | files
        self._datasets.clear()
        self._memo.clear()
        self._items.clear()
        return True

    def unreadable_report(self, roles: Iterable[str]) -> dict[str, list[str]]:
        """{role: the left-out files, relative to the dataset root} for the roles that lost any."""
        root = Path(self.dataset_cfg.get("root") or ".").expanduser()
        out = {}
        for role in roles:
            left = self.dataset(role).left_out
            if left:
                out[role] = sorted(os.path.relpath(os.path.abspath(f), os.path.abspath(root)) for f in left)
        return out

    def check_label_space(self) -> None:
        """Before any number: every declared split of a labelled dataset lists the same classes in the
        same order (a val split missing one class folder would shift every later label by one)."""
        from distill.data import check_same_classes

        roles = self.dataset_cfg.get("roles") or {}
        classes = {}
        for role, split in roles.items():
            ds = self.dataset(role)
            if getattr(ds, "targets", None) is not None and getattr(ds, "classes", None) is not None:
                classes[split] = ds.classes
        root = self.dataset_cfg.get("root")
        check_same_classes(str(self.dataset_cfg.get("id")), classes,
                           where={split: f"{root}/{split}" for split in classes} if root else None)

    def feature_key(self, role: str, patches: bool) -> FeatureKey:
        cfg = self.dataset_cfg
        return FeatureKey(model=self.encoder.fingerprint(), reader=cfg["reader"],
                          root=str(Path(cfg["root"]).expanduser().resolve()), split=self.split_of(role),
                          reader_kwargs=dict(cfg.get("reader_kwargs") or {}), resolution=self.resolution,
                          preprocess=fingerprint(self.encoder.preprocess_config()), limit=self.limit,
                          patches=patches, items=self.items_fingerprint(role), n=len(self.dataset(role)))

    def items_fingerprint(self, role: str) -> str:
        if role not in self._items:
            self._items[role] = items_fingerprint(self.dataset(role), content=self.content_hash)
        return self._items[role]

    def dataset_fingerprint(self, roles: Iterable[str]) -> str:
        """Identifies the data a cell saw: reader, resolved root, splits, kwargs, limit, sizes (not the
        files' inodes and mtimes, which differ between two copies of the same data)."""
        return fingerprint({role: {**self.feature_key(role, False).as_dict(), "model": None,
                                   "preprocess": None, "items": None} for role in roles})

    # -- features
    def features(self, role: str, patches: bool = False) -> Features:
        if (role, patches) in self._memo:
            return self._memo[(role, patches)]
        if not patches and (role, True) in self._memo:
            f = self._memo[(role, True)]
            return Features(summary=f.summary, cls=f.cls, registers=f.registers)
        t0 = time.perf_counter()
        key = self.feature_key(role, patches)

        def compute() -> Features:
            return encode_dataset(self.encoder, self.dataset(role), self.resolution, self.batch_size,
                                  self.num_workers, patches=patches,
                                  desc=f"{self.encoder.name} {self.dataset_cfg.get('id')}/{role}",
                                  show_progress=self.show_progress)

        feats = self.cache.get_or_compute(key, compute, write=self.rank == 0, refresh=self.refresh)
        if self.world > 1:
            dist.barrier()  # rank 0 has written the entry before anyone moves on
        self.feature_seconds += time.perf_counter() - t0
        self._memo[(role, patches)] = feats
        return feats

    def text_features(self, texts: list[str], head: str) -> torch.Tensor:
        t0 = time.perf_counter()
        self.encoder.require_head(head, text=True)

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                chunks = [self.encoder.encode_text(list(texts[i:i + 256]), head).float().cpu()
                          for i in range(0, len(texts), 256)]
            return torch.cat(chunks) if chunks else torch.zeros(0, 0)

        # keyed by the text tower's identity: students share their teachers' text embeddings
        emb = self.cache.get_or_compute_text(self.encoder.text_fingerprint(head), head, list(texts), compute,
                                             write=self.rank == 0, refresh=self.refresh)
        self.feature_seconds += time.perf_counter() - t0
        return emb

    def progress(self, iterable, desc: str, total: int | None = None):
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                    disable=not self.show_progress or self.rank != 0)
