"""The one encoder interface used by benchmarks, curation, distillation and grounding.

An encoder owns its preprocessing: `preprocess` turns a PIL image into the tensor its `encode`
expects, at a requested resolution. `encode` takes a list of such tensors (any sizes) or a
batch, and returns `distill.features.Features`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from PIL import Image

from distill.errors import AmoeError
from distill.features import Features


class MissingHeadError(AmoeError, KeyError):
    """A task asked an encoder for a head (or a text tower) it does not have."""

    def __init__(self, encoder: str, head: str, available: tuple[str, ...], what: str = "head"):
        super().__init__(
            f"encoder '{encoder}' has no {what} '{head}'; available: {', '.join(available) or 'none'}")


class Encoder(ABC):
    name: str = "encoder"
    heads: tuple[str, ...] = ()          # keys of Features.summary / Features.patches
    text_heads: tuple[str, ...] = ()     # heads with a text tower for encode_text
    patch_size: int = 16

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def preprocess(self, image: Image.Image, resolution: int | None = None) -> torch.Tensor:
        """PIL image -> CHW float tensor in the model's own normalisation.

        `resolution` is the side of the square pixel budget (e.g. 512 means at most 512*512 pixels
        for native-aspect models, a 512x512 resize for fixed-size models); None = model default.
        """

    @abstractmethod
    def encode(self, images: list[torch.Tensor] | torch.Tensor) -> Features:
        """Preprocessed images (a list of CHW tensors of any sizes, or an NCHW batch) -> Features."""

    def encode_text(self, texts: list[str], head: str) -> torch.Tensor:
        """Texts -> (N, C) embeddings in `head`'s space (not normalised)."""
        raise MissingHeadError(self.name, head, self.text_heads, "text tower")

    def logit_scale(self, head: str) -> float:
        """Temperature used to turn cosine similarities into logits (zero-shot ensembles)."""
        return 100.0

    def runtime_info(self) -> dict:
        """How this encoder runs here (device, kernels): recorded in result files, never in cache keys."""
        return {"device": str(self.device)}

    def fingerprint(self) -> str:
        """Identifies weights + preprocessing; part of every feature-cache key."""
        return self.name

    def text_fingerprint(self, head: str) -> str:
        """Identifies the text tower behind `head` (text-embedding cache keys). An encoder that borrows
        another model's tower (a student uses its teachers') returns that model's, so the embeddings
        of a suite's prompts and captions are computed once for all of them."""
        return self.fingerprint()

    def preprocess_config(self) -> dict:
        """Preprocessing settings, hashed into feature-cache keys."""
        return {}

    def unavailable_heads(self) -> dict[str, str]:
        """Heads missing because something failed to load on this machine (not because the model lacks
        them), with the reason; the harness retries a cell skipped for these on the next run."""
        return {}

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Encoder":
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def require_head(self, head: str, text: bool = False) -> None:
        available = self.text_heads if text else self.heads
        if head not in available:
            raise MissingHeadError(self.name, head, available, "text tower" if text else "head")
