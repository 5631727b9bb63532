"""Token-balanced batching: plan every rank's step as sequences of at most C_max tokens.

Paper (2512.20157, "token-balanced batching"): native-resolution images have very different token
counts; a fixed number of images per rank gives ranks very different amounts of work and very
different gradient norms. Instead each rank gets the same number of sequences of the same capacity
C_max (<= 16 images each), filled greedily from a shuffled stream, so every rank processes the same
token budget. The loss is normalised per image (distill.losses), so the varying image count per rank
does not bias the gradient.

The padded-per-image baseline (``mode="padded"``) is kept as a switch for ablations and for
``amoe distill perf``: a fixed number of images per rank, each image its own sequence, padded to the
longest image of the step.

The plan is a pure function of (token counts, seed, sampler state), so every rank computes the same
plan and takes its own part; the state (epoch, cursor, pending images) goes into checkpoints. The
counts and each epoch's permutation are int32 arrays (8 bytes per image: stage 2 has 213M images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class StepPlan:
    """One optimizer step for every rank: ``ranks[r]`` is a list of sequences of dataset indices."""

    ranks: list[list[list[int]]]
    capacity: int                      # tokens reserved per sequence (C_max, or the padded length)
    tokens: list[list[list[int]]]      # token count of every planned image, same nesting as ranks

    def images(self, rank: int) -> list[int]:
        return [i for seq in self.ranks[rank] for i in seq]

    def real_tokens(self, rank: int | None = None) -> int:
        ranks = range(len(self.ranks)) if rank is None else [rank]
        return sum(t for r in ranks for seq in self.tokens[r] for t in seq)

    def reserved_tokens(self, rank: int | None = None) -> int:
        ranks = range(len(self.ranks)) if rank is None else [rank]
        return sum(self.capacity * len(self.ranks[r]) for r in ranks)

    def fill_ratio(self, rank: int | None = None) -> float:
        reserved = self.reserved_tokens(rank)
        return self.real_tokens(rank) / reserved if reserved else 0.0


SHUFFLE_VERSION = 2   # 2: numpy PCG64 permutations of int32 (1: torch.randperm)


class SamplerStateError(ValueError):
    """A checkpoint's sampler state was made by another shuffle: resuming would not be exact."""


@dataclass
class SamplerState:
    epoch: int = 0
    cursor: int = 0                                  # position in this epoch's permutation
    pending: list[int] = field(default_factory=list)  # drawn but not yet placed (lookahead buffer)
    steps: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "pending": list(self.pending),
                "steps": self.steps, "shuffle": SHUFFLE_VERSION}

    @staticmethod
    def from_json(d: dict) -> "SamplerState":
        if d.get("shuffle", 1) != SHUFFLE_VERSION:
            raise SamplerStateError(
                f"the checkpoint's sampler state uses shuffle version {d.get('shuffle', 1)}, this amoe uses "
                f"{SHUFFLE_VERSION}: the resumed run would not see the same images; finish it with the amoe "
                "that started it or use a new --out directory")
        return SamplerState(int(d["epoch"]), int(d["cursor"]), [int(i) for i in d["pending"]],
                            int(d.get("steps", 0)))


class TokenBalancedSampler:
    """Plans steps over a dataset whose per-image token counts are known up front.

    packed mode: each rank gets ``seqs_per_rank`` sequences of capacity ``max_tokens`` holding at most
    ``max_images_per_seq`` images, filled first-fit from a lookahead buffer of ``lookahead`` images.
    padded mode: each rank gets ``images_per_rank`` images, one per sequence; the capacity is the
    longest image of the step (what a padded batch costs).
    """

    def __init__(self, token_counts: Sequence[int], *, world_size: int, seed: int,
                 mode: str = "packed", max_tokens: int = 1024, max_images_per_seq: int = 16,
                 seqs_per_rank: int = 1, images_per_rank: int = 8, lookahead: int = 64):
        if mode not in ("packed", "padded"):
            raise ValueError(f"batching mode must be 'packed' or 'padded', got {mode!r}")
        self.counts = np.asarray(token_counts, dtype=np.int32)
        if not len(self.counts):
            raise ValueError("the dataset is empty: nothing to sample")
        too_big = np.flatnonzero(self.counts > max_tokens) if mode == "packed" else []
        if len(too_big):
            raise ValueError(
                f"{len(too_big)} image(s) have more tokens than max_tokens={max_tokens} (largest "
                f"{int(self.counts[too_big].max())}); raise batching.max_tokens or lower the "
                "maximum resolution")
        if max_images_per_seq < 1 or seqs_per_rank < 1 or images_per_rank < 1 or world_size < 1:
            raise ValueError("max_images_per_seq, seqs_per_rank, images_per_rank and world_size must be >= 1")
        self.world_size, self.seed, self.mode = world_size, seed, mode
        self.max_tokens, self.max_images = max_tokens, max_images_per_seq
        self.seqs_per_rank, self.images_per_rank = seqs_per_rank, images_per_rank
        self.lookahead = max(lookahead, max_images_per_seq)
        self.state = SamplerState()
        self._perm = self._permutation(0)

    # ------------------------------------------------------------------ stream of shuffled indices
    def _permutation(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.counts), dtype=np.int32)
        np.random.default_rng(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _draw(self) -> int:
        if self.state.cursor >= len(self._perm):
            self.state.epoch += 1
            self.state.cursor = 0
            self._perm = self._permutation(self.state.epoch)
        i = int(self._perm[self.state.cursor])
        self.state.cursor += 1
        return i

    def _refill(self, n: int) -> None:
        while len(self.state.pending) < n:
            self.state.pending.append(self._draw())

    # ------------------------------------------------------------------ planning
    def _pack_sequence(self) -> list[int]:
        self._refill(self.lookahead)
        seq, room = [], self.max_tokens
        keep = []
        counts = self.counts[self.state.pending].tolist()
        for i, c in zip(self.state.pending, counts):
            if len(seq) < self.max_images and c <= room:
                seq.append(i)
                room -= c
            else:
                keep.append(i)
        self.state.pending = keep
        return seq

    def next_step(self) -> StepPlan:
        if self.mode == "packed":
            # Deal sequences round-robin so no rank systematically gets the worst-filled ones.
            ranks: list[list[list[int]]] = [[] for _ in range(self.world_size)]
            for _ in range(self.seqs_per_rank):
                for r in range(self.world_size):
                    ranks[r].append(self._pack_sequence())
            capacity = self.max_tokens
        else:
            ranks = []
            for _ in range(self.world_size):
                self._refill(self.images_per_rank)
                take, self.state.pending = (self.state.pending[:self.images_per_rank],
                                            self.state.pending[self.images_per_rank:])
                ranks.append([[i] for i in take])
            capacity = max(int(self.counts[seq[0]]) for r in ranks for seq in r)
        self.state.steps += 1
        tokens = [[[int(self.counts[i]) for i in seq] for seq in r] for r in ranks]
        return StepPlan(ranks=ranks, capacity=capacity, tokens=tokens)

    def nbytes(self) -> int:
        """Bytes of the per-image arrays (token counts, the epoch's permutation)."""
        return self.counts.nbytes + self._perm.nbytes

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return self.state.to_json()

    def load_state_dict(self, d: dict) -> None:
        self.state = SamplerState.from_json(d)
        self._perm = self._permutation(self.state.epoch)
