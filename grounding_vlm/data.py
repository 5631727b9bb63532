"""RefCOCO / RefCOCO+ / RefCOCOg for grounding, through the refer reader.

The task format (one sample = one referring expression):

    [image tokens] <bos> expression <sep> <loc_x1> <loc_y1> <loc_x2> <loc_y2> <eos>

Each of a ref's sentences is one example (training and evaluation alike, the standard protocol).
Boxes are quantised against the original image's width/height, so they are independent of the
resize; images are resized by the student's processor rules (native aspect, area within
[min_pixels, max_pixels], sides multiples of the patch size). Refs whose image file is missing are
skipped, counted and reported rather than failing the run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from distill.data.base import UnreadableImageError, load_rgb
from distill.data.refer import decode_mask, load_refer
from distill.errors import AmoeError
from distill.lru import TensorLRU
from distill.student import ImageProcessor

from .boxes import quantise_box
from .tokenizer import GroundingTokenizer, train_tokenizer


@dataclass(frozen=True)
class GroundingExample:
    image_path: str
    expression: str
    box_xyxy: tuple[float, float, float, float]
    width: int
    height: int
    ref_id: int
    image_id: int
    segmentation: Any = field(default=None, compare=False)   # the ref's COCO mask (polygons or RLE)

    def mask(self) -> np.ndarray:
        """The ref's binary mask at the original image size (pycocotools)."""
        if self.segmentation is None:
            raise ValueError(f"ref {self.ref_id} has no segmentation in instances.json; referring "
                             "segmentation needs the refs' COCO masks (or set mask.weight=0)")
        return decode_mask(self.segmentation, self.height, self.width)


@dataclass
class SplitData:
    examples: list[GroundingExample]
    refs: int
    missing_images: int          # refs skipped because their image file is missing
    missing_files: list[str]     # a few of the missing paths, for the report

    def report(self) -> dict[str, Any]:
        return {"refs": self.refs, "expressions": len(self.examples), "missing_images": self.missing_images,
                "missing_examples": self.missing_files[:5]}


def require_data_root(data_cfg: Mapping[str, Any]) -> str:
    root = data_cfg.get("root")
    if not root:
        raise DataRootError("data.root is not set: point it at the refer folder (e.g. --set data.root=WORLD/refer, "
                            "the folder holding refcoco/refs(unc).p)")
    return root


class DataRootError(AmoeError, ValueError):
    """The grounding config names no data folder."""


def load_split(data_cfg: Mapping[str, Any], split: str) -> SplitData:
    root = require_data_root(data_cfg)
    ds = load_refer(root, split=split, dataset=data_cfg.get("dataset", "refcoco"),
                    split_by=data_cfg.get("split_by"), image_root=data_cfg.get("image_root"), check_files=False)
    examples, missing = [], []
    for i in range(len(ds)):
        s = ds[i]
        if not Path(s.image_path).is_file():
            missing.append(str(s.image_path))
            continue
        for sent in s.sentences:
            examples.append(GroundingExample(str(s.image_path), sent, tuple(s.bbox), s.width, s.height,
                                             s.ref_id, s.image_id, s.segmentation))
    return SplitData(examples, len(ds), len(missing), missing)


class ExpressionTooLongError(AmoeError, ValueError):
    """Expressions whose tokens do not fit the VLM's text positions; found when the data is loaded."""


def check_text_lengths(examples: list[GroundingExample], tok: GroundingTokenizer, max_text_len: int,
                       where: str, extra_tokens: int = 5) -> None:
    """Every expression's prompt plus `extra_tokens` (4 box tokens + eos in training; 3 fed-back box
    tokens in decoding) must fit `max_text_len`, or the run would stop at the first long one, minutes in."""
    lengths = [len(ids) + extra_tokens for ids in tok.encode_prompts([e.expression for e in examples])]
    over = [i for i, n in enumerate(lengths) if n > max_text_len]
    if over:
        worst = max(over, key=lambda i: lengths[i])
        e = examples[worst]
        raise ExpressionTooLongError(
            f"{where}: {len(over)} expression(s) need more than max_text_len={max_text_len} text tokens "
            f"(longest: {lengths[worst]}, ref_id {e.ref_id}: {e.expression[:60]!r}); "
            f"raise it with --set model.max_text_len={lengths[worst]}")


def build_tokenizer(tok_cfg: Mapping[str, Any], train_examples: list[GroundingExample],
                    save_dir: Path | None, lm_path: str | None = None) -> GroundingTokenizer:
    """A real tokenizer by path, the LM's own (`lm_path`), or a BPE trained offline on the training
    expressions."""
    bins = int(tok_cfg.get("bins", 1000))
    if lm_path and tok_cfg.get("path"):
        from .lm import LMRouteError
        raise LMRouteError("with lm.path the grounding VLM uses the LM's own tokenizer; drop tokenizer.path")
    if tok_cfg.get("path"):
        return GroundingTokenizer.load(tok_cfg["path"], bins)
    if save_dir is not None and (save_dir / "tokenizer.json").exists():   # resume: reuse, never retrain
        return GroundingTokenizer.load(save_dir, bins)
    if lm_path:      # the LM's own tokenizer, extended with the grounding specials and location tokens
        from .lm import lm_tokenizer

        tok = GroundingTokenizer(lm_tokenizer(lm_path), bins)
        if save_dir is not None:
            tok.save(save_dir)
        return tok
    texts = [e.expression for e in train_examples]
    if not texts:
        raise ValueError("cannot train a tokenizer: the training split has no expressions")
    tok = GroundingTokenizer(train_tokenizer(texts, vocab_size=int(tok_cfg.get("vocab_size", 2000))), bins)
    if save_dir is not None:
        tok.save(save_dir)
    return tok


class ImageCache(TensorLRU):
    """Processed image tensors by path, least recently used first out once they hold more than
    `capacity_bytes` (1 GiB: every mini-world refer image, a few hundred RefCOCO ones at 512 px): an
    image carries several expressions, and decoding is the step's largest CPU cost after the model."""

    def __init__(self, processor: ImageProcessor, capacity_bytes: int = 2 ** 30):
        super().__init__(capacity_bytes)
        self.processor = processor
        self.unreadable: set[str] = set()   # images that did not decode: their expressions are skipped

    def unreadable_report(self, root: str | None) -> list[str]:
        """The images that did not decode, relative to the data root (no machine paths in results)."""
        return sorted(os.path.relpath(os.path.abspath(f), os.path.abspath(root or ".")) for f in self.unreadable)

    def get(self, path: str) -> torch.Tensor:
        """The processed image; `UnreadableImageError` (remembered, never decoded again) when it fails."""
        hit = self.lookup(path)
        if hit is not None:
            return hit
        if path in self.unreadable:
            raise UnreadableImageError("refer", [path])
        try:
            t = self.processor.to_tensor(load_rgb(path, "refer"))
        except UnreadableImageError:
            self.unreadable.add(path)
            raise
        self.put(path, t)
        return t


def processor_from(data_cfg: Mapping[str, Any], patch_size: int) -> ImageProcessor:
    return ImageProcessor(patch_size=patch_size, min_pixels=int(data_cfg.get("min_pixels", 128 * 128)),
                          max_pixels=int(data_cfg.get("max_pixels", 256 * 256)))


def encode_batch(examples: list[GroundingExample], tok: GroundingTokenizer, cache: ImageCache,
                 with_target: bool = True):
    """-> (images, token id lists, prompt lengths, the examples kept). With the target, ids = prompt +
    4 locs + eos. Bad data is data: an example whose image does not decode is left out (and counted in
    `cache.unreadable`)."""
    images, ids, prompt_lens, kept = [], [], [], []
    for e in examples:
        try:
            images.append(cache.get(e.image_path))
        except UnreadableImageError:
            continue
        kept.append(e)
        prompt = tok.encode_prompt(e.expression)
        prompt_lens.append(len(prompt))
        if with_target:
            prompt = prompt + tok.encode_target(quantise_box(e.box_xyxy, e.width, e.height, tok.bins))
        ids.append(prompt)
    return images, ids, prompt_lens, kept


def target_loss(logits: list[torch.Tensor], ids: list[list[int]], prompt_lens: list[int]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on the target tokens only (4 locations + eos), summed; and their count."""
    rows, labels = [], []
    for lg, t, n in zip(logits, ids, prompt_lens):
        # logits[j] predicts ids[j + 1]; targets are ids[n:], predicted from positions n-1 .. len-2
        rows.append(lg[n - 1: len(t) - 1])
        labels.append(torch.tensor(t[n:], dtype=torch.long, device=lg.device))
    rows, labels = torch.cat(rows), torch.cat(labels)
    return torch.nn.functional.cross_entropy(rows.float(), labels, reduction="sum"), int(labels.numel())
