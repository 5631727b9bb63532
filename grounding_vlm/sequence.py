"""One early-fusion sequence: image tokens then text tokens, several samples packed together.

Each sample contributes [CLS, registers, patches] (the student's own token layout, so the vision
path can reproduce the student exactly) followed by its text tokens. Attention rules:
  - image tokens attend to the image tokens of their own sample, bidirectionally;
  - text tokens attend to all image tokens of their sample and causally to its earlier text tokens;
  - image tokens never attend to text, and nothing crosses samples or touches padding.
Because image tokens never see text, the vision-only path of the VLM is exactly the student's
forward when the vision experts hold the student's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedLayout:
    """Per-token metadata of one packed sequence (length S)."""

    sample_id: torch.Tensor      # (S,) int64, -1 for padding
    is_text: torch.Tensor        # (S,) bool
    text_pos: torch.Tensor       # (S,) int64: 1-based position among its sample's text tokens, 0 for image
    image_slices: list[tuple[int, int]]   # per sample: [start, end) of its image tokens
    text_slices: list[tuple[int, int]]    # per sample: [start, end) of its text tokens

    @classmethod
    def build(cls, image_lengths: list[int], text_lengths: list[int], total: int | None = None) -> "PackedLayout":
        if len(image_lengths) != len(text_lengths):
            raise ValueError("one text per image")
        used = sum(image_lengths) + sum(text_lengths)
        total = used if total is None else total
        if total < used:
            raise ValueError(f"sequence of {total} tokens cannot hold {used}")
        sample_id = torch.full((total,), -1, dtype=torch.long)
        is_text = torch.zeros(total, dtype=torch.bool)
        text_pos = torch.zeros(total, dtype=torch.long)
        image_slices, text_slices = [], []
        cursor = 0
        for i, (n_img, n_txt) in enumerate(zip(image_lengths, text_lengths)):
            image_slices.append((cursor, cursor + n_img))
            sample_id[cursor:cursor + n_img] = i
            cursor += n_img
            text_slices.append((cursor, cursor + n_txt))
            sample_id[cursor:cursor + n_txt] = i
            is_text[cursor:cursor + n_txt] = True
            text_pos[cursor:cursor + n_txt] = torch.arange(1, n_txt + 1)
            cursor += n_txt
        return cls(sample_id, is_text, text_pos, image_slices, text_slices)

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The attention rule for query indices q and key indices k (broadcastable index tensors).
        Written once and used both for the dense SDPA mask and as FlexAttention's mask_mod."""
        same = (self.sample_id[q] == self.sample_id[k]) & (self.sample_id[q] >= 0)
        key_is_image = ~self.is_text[k]
        causal_text = self.is_text[q] & (k <= q)
        return same & (key_is_image | causal_text)

    def dense_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(S, S) boolean mask, True = may attend (the SDPA reference path)."""
        n = self.sample_id.numel()
        idx = torch.arange(n)
        return self.allowed(idx[:, None], idx[None, :]).to(device)

    def to(self, device) -> "PackedLayout":
        return PackedLayout(self.sample_id.to(device), self.is_text.to(device), self.text_pos.to(device),
                            self.image_slices, self.text_slices)
