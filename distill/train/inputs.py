"""The trainer's input pipeline: decode, resize and preprocess each step's images in DataLoader workers.

The token-balanced sampler stays in the main process: it plans whole steps (cheap, and the same on
every rank). Each plan becomes a `StepTicket` (this rank's sequences plus the sampler state *after*
the step); a `torch.utils.data.DataLoader` hands tickets to `workers` processes, which decode the
images, resize them to the planned size for the student and run every teacher's preprocessing, and
gives the results back in plan order, `prefetch` tickets ahead per worker.

Resume stays exact although the sampler runs ahead of training: the trainer checkpoints the state
carried by the last step it *consumed*, not the sampler's own. An image that fails to decode is left
out of its step and counted (`corrupt`); a step whose images all fail on this rank comes back empty
and the trainer runs its placeholder. `workers=0` does the same work in the main process (the
reference path the tests compare against).

Each process keeps the student inputs it has made (`STUDENT_INPUT_BYTES` of them): the planned size of an image
is the same every epoch, so a later visit costs neither the decode nor the resize, and an image is
decoded only when the student input or a teacher's uncached output needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.encoders.common import resize_normalize
from distill.lru import TensorLRU
from distill.train.batching import TokenBalancedSampler
from distill.train.pool import PlannedImage, TrainingPool, UndecodableImage, lazy_image


def student_tensor(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1] at the planned size (bicubic; SigLino normalisation)."""
    return resize_normalize(image, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), Image.BICUBIC)


# student inputs each process keeps (`TensorLRU`): every mini-world pool image at its planned size fits;
# a large pool simply keeps the recent ones
STUDENT_INPUT_BYTES = 256 * 2 ** 20


class PackedTensors:
    """A list of tensors (or None) stored as one flat buffer: a step crosses from a worker to the
    trainer as one shared-memory segment per stream instead of one per image (at 34 images and
    three streams a step, the per-tensor hand-over cost more than a tenth of a 0.5 s step)."""

    def __init__(self, tensors: list[torch.Tensor | None]):
        self.shapes = [None if t is None else tuple(t.shape) for t in tensors]
        real = [t.reshape(-1) for t in tensors if t is not None]
        self.flat = torch.cat(real) if real else torch.zeros(0)

    def __len__(self) -> int:
        return len(self.shapes)

    def views(self, flat: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        flat = self.flat if flat is None else flat
        out, at = [], 0
        for shape in self.shapes:
            if shape is None:
                out.append(None)
                continue
            n = math.prod(shape)
            out.append(flat[at:at + n].view(shape))
            at += n
        return out

    def __iter__(self):
        return iter(self.views())

    def to(self, device) -> list[torch.Tensor | None]:
        """The tensors on `device`, moved in one copy."""
        return self.views(self.flat.to(device))


@dataclass
class StepTicket:
    """What a worker needs to load one step of one rank (small: it crosses a process boundary)."""
    sequences: list[list[int]]        # this rank's sequences of pool item indices
    real_tokens: int                  # of the whole step, all ranks
    reserved_tokens: int
    state: dict                       # sampler state after this step: what a checkpoint saves


@dataclass
class StepInputs:
    """One rank's decoded step: student pixels, every teacher's preprocessed pixels, the layout."""
    items: list[PlannedImage]                          # the images that decoded, in plan order
    sequences: list[list[int]]                         # positions in `items`, one list per sequence
    pixels: PackedTensors                              # student inputs (3, H, W) at the planned sizes
    teacher_pixels: dict[str, PackedTensors]           # per image; None: the teacher's output is cached
    corrupt: int                                       # images of this step that did not decode
    ticket: StepTicket

    @property
    def fill_ratio(self) -> float:
        t = self.ticket
        return t.real_tokens / t.reserved_tokens if t.reserved_tokens else 0.0


class StepTickets(Sampler):
    """An endless stream of tickets from the sampler (advances it: only the loader may iterate this)."""

    def __init__(self, sampler: TokenBalancedSampler, rank: int):
        self.sampler, self.rank = sampler, rank

    def __iter__(self) -> Iterator[StepTicket]:
        while True:
            plan = self.sampler.next_step()
            yield StepTicket(plan.ranks[self.rank], plan.real_tokens(), plan.reserved_tokens(),
                             self.sampler.state_dict())


# (image, image key, resolution) -> the teacher's pixels, or None when its output is cached; `image()`
# decodes the image (at most once per visit, shared with the student input), so a cached teacher costs none
Prepare = Callable[[object, str, int], "torch.Tensor | None"]


class StepDataset(Dataset):
    """`dataset[ticket]` -> `StepInputs`. `prepare` maps a teacher name to its `TeacherRunner.prepare`."""

    def __init__(self, pool: TrainingPool, prepare: dict[str, Prepare]):
        self.pool, self.prepare = pool, prepare
        self.student_inputs = TensorLRU(STUDENT_INPUT_BYTES)   # per process: each worker fills its own

    def _load(self, item: PlannedImage) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """(student input, {teacher: preprocessed pixels or None when cached}); `UndecodableImage` when
        the image does not decode (only a miss can: a hit was decoded before)."""
        image = lazy_image(item.entry)
        key = (item.entry.key, tuple(item.size))
        student = self.student_inputs.lookup(key)
        if student is None:
            student = student_tensor(image(), item.size)
            self.student_inputs.put(key, student)
        return student, {name: prep(image, item.entry.key, item.resolution) for name, prep in self.prepare.items()}

    def __getitem__(self, ticket: StepTicket) -> StepInputs:
        items, sequences, pixels, corrupt = [], [], [], 0
        teacher_pixels: dict[str, list] = {name: [] for name in self.prepare}
        for seq in ticket.sequences:
            positions = []
            for idx in seq:
                item = self.pool.item(idx)
                try:
                    student, teachers = self._load(item)
                except UndecodableImage:  # skip and count; any other error is a bug and propagates
                    corrupt += 1
                    continue
                positions.append(len(items))
                items.append(item)
                pixels.append(student)
                for name, px in teachers.items():
                    teacher_pixels[name].append(px)
            if positions:
                sequences.append(positions)
        return StepInputs(items, sequences, PackedTensors(pixels),
                          {name: PackedTensors(px) for name, px in teacher_pixels.items()}, corrupt, ticket)


def _as_is(x):
    return x


def step_inputs(pool: TrainingPool, sampler: TokenBalancedSampler, rank: int, prepare: dict[str, Prepare],
                workers: int = 2, prefetch: int = 2) -> DataLoader:
    """The loader of one rank's steps, from the sampler's current state on; iterate it once."""
    return DataLoader(StepDataset(pool, prepare), sampler=StepTickets(sampler, rank), batch_size=None,
                      collate_fn=_as_is, num_workers=workers,
                      prefetch_factor=prefetch if workers > 0 else None)
