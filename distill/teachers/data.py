"""Training data of the teachers, read through the project's dataset readers.

Only training splits are used: the teachers' own pretraining set (`pretrain/`, images + captions, in the
pool's format; no student or benchmark reads it), the pool (images + captions) and the classification
*train* split (class-name prompts). The classification val split and the retrieval test split are the
benchmark's test sets and are never read here.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from distill.data import UnreadableImageError, load_dataset

from .common import TeacherError


def check_world(world: str | os.PathLike) -> dict:
    """The world's `world.json` (identity for fingerprints); a clear error if it is not a mini-world."""
    root = Path(world)
    if not root.is_dir():
        raise TeacherError(f"world folder '{root}' does not exist; make one with "
                           f"`amoe world make --out {root} --size small`")
    meta = root / "world.json"
    if not meta.is_file():
        raise TeacherError(f"'{root}' is not a finished mini-world (no world.json); make one with "
                           f"`amoe world make --out {root} --size small` (a killed run resumes)")
    missing = [p for p in ("pool", "classification/train") if not (root / p).is_dir()]
    if missing:
        raise TeacherError(f"mini-world '{root}' lacks {', '.join(missing)}; regenerate it with "
                           f"`amoe world make --out {root} --size small --force`")
    info = json.loads(meta.read_text())
    return {k: info.get(k) for k in ("seed", "size", "version", "config")}


@dataclass
class Pair:
    image: Image.Image
    captions: list[str]   # one is drawn per step
    group: int            # samples of one group are positives of each other (same class)
    objects: list = field(default_factory=list)   # the sample's metadata objects (weak supervision)


def object_vocab(objects: list) -> tuple[list[str], list[str]]:
    """Shape and colour names as they occur in metadata objects (sorted; no import of the generator)."""
    return sorted({o["shape"] for o in objects}), sorted({o["colour"] for o in objects})


def presence_vector(objects: list, vocab: tuple[list[str], list[str]], by_area: bool = False) -> list[float]:
    """The shapes, then the colours, that a sample's metadata objects name: multi-hot, or with
    `by_area` each weighted by the summed area of its objects' boxes (`bbox` x, y, w, h), so a small
    distractor counts for what it covers."""
    shapes, colours = vocab
    v = [0.0] * (len(shapes) + len(colours))
    for o in objects:
        w = float(o["bbox"][2] * o["bbox"][3]) if by_area else 1.0
        for key, names, offset in (("shape", shapes, 0), ("colour", colours, len(shapes))):
            if o.get(key) in names:
                i = offset + names.index(o[key])
                v[i] = v[i] + w if by_area else w
    return v


@dataclass
class WorldData:
    """Lazily decoded training data of one world, shared by both teachers in one run."""

    root: Path
    progress: bool = True
    unreadable: list = field(default_factory=list)   # classification train files that did not decode

    def _shards(self, part: str) -> list:
        ds = load_dataset("webdataset", self.root / part, "train")
        samples = [s for s in tqdm(ds, desc=f"read {part}", disable=not self.progress, leave=False)]
        if not samples:
            raise TeacherError(f"the {part} of '{self.root}' yielded no readable samples ({ds.report()})")
        return samples

    @cached_property
    def pool(self) -> list:
        return self._shards("pool")

    @cached_property
    def pretrain(self) -> list:
        return self._shards("pretrain")

    def images(self, use_pool: bool = True, use_pretrain: bool = False) -> list:
        """The teachers' image samples (with caption and metadata): the pool and/or the pretraining set."""
        return (self.pool if use_pool else []) + (self.pretrain if use_pretrain else [])

    @cached_property
    def classification(self):
        return load_dataset("imagefolder", self.root / "classification", "train")

    def pairs(self, use_pool: bool = True, use_classification_train: bool = True,
              classification_repeat: int = 1, use_pretrain: bool = False) -> list[Pair]:
        """Image-caption pairs: pool (and pretraining-set) captions, and class prompts for the
        classification train split (listed `classification_repeat` times, so an epoch sees the few
        labelled images more often)."""
        pairs: list[Pair] = []
        if use_classification_train:
            ds = self.classification
            templates = ds.templates or ["a photo of a {}."]
            unreadable: list[str] = []
            for i in tqdm(range(len(ds)), desc="read classification train", disable=not self.progress,
                          leave=False):
                try:
                    image, label = ds[i]
                except UnreadableImageError as e:   # training data: skipped, counted, named
                    unreadable += e.files
                    continue
                pairs += [Pair(image, [t.format(ds.classes[label]) for t in templates], label)] * classification_repeat
            if unreadable:
                print(f"[amoe teachers] classification train: {len(unreadable)} unreadable image(s) skipped: "
                      + ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""), file=sys.stderr)
            self.unreadable = unreadable
        offset = len(pairs) + 10_000  # pool and pretraining samples are each their own group
        for j, s in enumerate(self.images(use_pool, use_pretrain)):
            if s.caption:
                pairs.append(Pair(s.image, [s.caption], offset + j, s.metadata.get("objects", [])))
        if not pairs:
            raise TeacherError("no image-caption pairs: enable `use_pool`, `use_pretrain` or "
                               "`use_classification_train` in the siglip2 recipe, or check the world's captions")
        return pairs

    def caption_corpus(self, pairs: list[Pair]) -> list[str]:
        return [c for p in pairs for c in p.captions]
