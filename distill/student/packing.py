"""Packing planner: assign images (token counts) to sequences of at most `max_tokens` tokens.

First-fit decreasing (FFD): sort images by token count, largest first, and put each into the first
sequence with room (both in tokens and in image slots); open a new sequence when none fits. FFD
uses at most 11/9 OPT + 1 sequences for bin packing. The fill ratio is
sum(tokens) / (num_sequences * max_tokens).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackingPlan:
    sequences: list[list[int]]      # image indices per sequence (each sequence in placement order)
    token_counts: list[int]
    max_tokens: int
    max_images: int

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def sequence_tokens(self) -> list[int]:
        return [sum(self.token_counts[i] for i in s) for s in self.sequences]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (sequences * max_tokens): 1.0 means no padding at all."""
        return self.total_tokens / max(1, self.num_sequences * self.max_tokens)

    def to_dict(self) -> dict:
        return {"sequences": self.sequences, "token_counts": self.token_counts, "max_tokens": self.max_tokens,
                "max_images": self.max_images, "fill_ratio": self.fill_ratio, "num_sequences": self.num_sequences}


# the paper's stage-2 resolution mix (sides in px, native aspect): what `--mix paper` in the perf
# commands draws from
PAPER_STAGE2_SIDES = (256, 384, 512, 768)


def plan_packing(token_counts: list[int], max_tokens: int, max_images: int = 16) -> PackingPlan:
    counts = [int(c) for c in token_counts]
    if max_tokens <= 0 or max_images <= 0:
        raise ValueError(f"max_tokens ({max_tokens}) and max_images ({max_images}) must be positive")
    if not counts:
        raise ValueError("plan_packing needs at least one image")
    for i, c in enumerate(counts):
        if c <= 0:
            raise ValueError(f"image {i} has {c} tokens; token counts must be positive")
        if c > max_tokens:
            raise ValueError(f"image {i} needs {c} tokens, more than max_tokens={max_tokens}; raise max_tokens "
                             "or resize the image to fewer patches (smaller max_pixels)")
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    sequences: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for s, room in enumerate(free):
            if counts[i] <= room and len(sequences[s]) < max_images:
                sequences[s].append(i)
                free[s] -= counts[i]
                break
        else:
            sequences.append([i])
            free.append(max_tokens - counts[i])
    return PackingPlan(sequences=sequences, token_counts=counts, max_tokens=int(max_tokens),
                       max_images=int(max_images))
