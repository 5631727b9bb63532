"""Shared plumbing of the teacher trainers: recipes, completion markers, schedules, machine info."""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
from pathlib import Path

import torch

from distill.config import merge
from distill.distributed import DistInfo, all_reduce_tensor, barrier
from distill.errors import AmoeError
from distill.io import fingerprint, publish_folder, write_json_atomic
from distill.train.guard import StepGuard, optimizer_step as guarded_update

from .tokenizer import TOKENIZER_VERSION

RECIPES_FILE = Path(__file__).resolve().parent / "recipes.json"
TEACHERS = ("siglip2", "dinov3")
MARKER = "COMPLETE.json"  # written last; a teacher dir without it is incomplete
LOG = "train_log.json"


class TeacherError(AmoeError, ValueError):
    """Bad input to teacher training (world layout, recipe); the message names the fix."""


def load_recipe(fast: bool = False, path: str | os.PathLike = RECIPES_FILE, **overrides) -> dict:
    """`default`, then `fast` (if asked), then keyword overrides, merged strictly at every depth
    (distill.config): an unknown key is an error naming the nearest known ones, so a typo never trains
    silently with the defaults. Overrides look like `siglip2={"steps": 10}` or `threads=1`."""
    data = json.loads(Path(path).read_text())
    recipe = data["default"]
    for layer in ([data.get("fast", {})] if fast else []) + [overrides]:
        recipe = merge(recipe, layer, strict=True, where="the teacher recipe")
    return recipe


def teacher_fingerprint(name: str, recipe: dict, world_id: dict, seed: int) -> str:
    return fingerprint({"teacher": name, "recipe": recipe[name], "world": world_id, "seed": seed,
                        "tokenizer": TOKENIZER_VERSION})


def is_complete(d: str | os.PathLike, fp: str | None = None) -> bool:
    """A teacher dir is complete when its marker exists (and, if `fp` is given, matches the recipe)."""
    marker = Path(d) / MARKER
    if not marker.is_file():
        return False
    if fp is None:
        return True
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fp
    except ValueError:
        return False


def finish_dir(partial: Path, final: Path, marker: dict) -> None:
    """Write the marker last inside `partial`, then move it into place (replacing a stale `final`)."""
    write_json_atomic(partial / MARKER, marker)
    publish_folder(partial, final)


def presence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, shapes: int) -> torch.Tensor:
    """The teachers' weak-supervision loss per row: a softmax over the shapes and one over the colours
    (`targets`: multi-hot, shapes first), each against the uniform distribution over those present; a
    row with none of a kind adds nothing for it. (Per-class sigmoids learnt colour and no shape in a
    teacher's budget; docs/teachers.md.)"""
    def kind(part: slice) -> torch.Tensor:
        t = targets[:, part]
        return -(torch.log_softmax(logits[:, part], -1) * t).sum(-1) / t.sum(-1).clamp(min=1)
    return kind(slice(0, shapes)) + kind(slice(shapes, None))


def optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, params, clip: float,
                   guard: StepGuard, what: str, ranks: "Ranks | None" = None) -> float:
    """A teacher loop's update (`distill.train.guard.optimizer_step`), its abort naming the recipe.
    Under `ranks` the guard judges (and the log keeps) the global batch's loss, the same on every rank."""
    value = None if ranks is None or not ranks.distributed else ranks.mean(loss)
    return guarded_update(opt, sched, loss, params, clip, guard, what,
                          f"lower the learning rate in its teacher recipe ({RECIPES_FILE.name})", value=value)


class StepForward(torch.nn.Module):
    """A teacher step's whole forward (`fn(model, *inputs)`) as one module call: DDP syncs the
    gradients of what runs inside a wrapped module's forward, and a loop that calls several towers
    and heads (and reads a temperature) must do all of it there."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


class Ranks:
    """How a teacher loop splits its global batches over a torchrun group; on one process every
    method is the identity, so a single-process run computes exactly what it did before.

    Every rank draws the same sample order, crops and masks from the same seeded stream (so the run
    is the single-process run, whatever the world size), keeps its contiguous block of each global
    batch, and runs its forward through `distill.train.parallelize.data_parallel` (DDP, gradients
    averaged). Losses that average over the batch then average to the global loss; contrastive losses
    gather the other ranks' rows (`distill.distributed.gather_rows`); means over a count that differs per rank go through
    `masked_mean`. Only the main rank writes (`main`)."""

    def __init__(self, info: DistInfo | None = None):
        self.info = info or DistInfo()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.distributed, self.main = self.info.distributed, self.info.is_main

    def block(self, batch: int, what: str) -> slice:
        """This rank's rows of a global batch of `batch` rows (which must split evenly)."""
        if batch % self.world:
            raise TeacherError(f"{what}: batch_size {batch} does not split over {self.world} ranks; "
                               f"set a batch size divisible by {self.world} (--set {what}.batch_size=...)")
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from distill.train.parallelize import data_parallel

        return data_parallel(module, self.info, "ddp")

    def mean(self, value: torch.Tensor) -> float:
        """The mean over ranks of a scalar (a loss averaged over equal blocks: the global batch's)."""
        return float(all_reduce_tensor(value.detach().reshape(()), "mean"))

    def mean0(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch's mean over dim 0 of `x` (equal blocks on every rank), no gradient."""
        return all_reduce_tensor(x.mean(0), "mean")

    def masked_mean(self, x: torch.Tensor, total: int, dim: int | None = None) -> torch.Tensor:
        """Mean of `x` over the `total` rows that all ranks hold together (a rank's count varies, as
        with masked patches). As a loss (dim None) it is scaled so that DDP's average of the ranks'
        gradients is the global mean's gradient; with `dim` 0 it is the global mean itself (no grad)."""
        if not self.distributed:
            return x.mean() if dim is None else x.mean(dim)
        if dim is None:
            return x.sum() * self.world / (total * math.prod(x.shape[1:]))
        return all_reduce_tensor(x.sum(0)) / total

    def barrier(self) -> None:
        barrier()

    def on_main(self, fn):
        """`fn()` on the main rank (None elsewhere); a user error it raises (a lock another writer
        holds) is raised on every rank, so no rank is left waiting in a collective for the main one."""
        error, result = None, None
        if self.main:
            try:
                result = fn()
            except AmoeError as e:
                error = e
        if self.distributed:
            import torch.distributed as dist
            said = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(said, src=0)
            if said[0] is not None and error is None:
                error = TeacherError(said[0][1])
        if error is not None:
            raise error
        return result


class LoopCheckpoints:
    """Mid-run resume of a teacher's training loop, in the shared checkpoint layout
    (`distill.train.checkpoint`: staged, published atomically, `latest.json`). Every `every` steps and
    at the last one, the loop's modules and tensors, optimizer, schedule, guard, the torch and Python
    RNG states and the loop's own state (sample order, losses, its `random.Random`) go to
    `root/checkpoints/step_*`. A restart of the same teacher (same fingerprint) continues from the
    newest one and ends with the same weights as a run that was never stopped; one of other settings
    is discarded. `root` None turns it off."""

    def __init__(self, root: Path | None, fp: str, every: int, ranks: "Ranks | None" = None,
                 writer: str | None = None):
        self.root, self.fp, self.every = root, fp, max(1, int(every))
        # under torchrun every rank restores and saves (the save is collective; the main rank writes)
        self.ranks = ranks or Ranks()
        self.writer = writer or f"{os.getpid()}"   # names its staging folders (under torchrun: writer_token())

    def sub(self, name: str) -> "LoopCheckpoints":
        """The checkpoints of a loop nested in this teacher's training (the dino.txt head)."""
        return LoopCheckpoints(None if self.root is None else self.root / name, self.fp, self.every, self.ranks,
                               self.writer)

    def restore(self, parts: dict, opt, sched, guard: StepGuard, rng) -> tuple[int, dict]:
        """(steps done, loop state) after loading the newest checkpoint into `parts` (modules or
        tensors by name), `opt`, `sched`, `guard` and `rng`; (0, {}) when there is none to resume."""
        from distill.train import checkpoint as ckpt

        latest = None if self.root is None else ckpt.latest_checkpoint(self.root)
        if latest is None:
            return 0, {}
        state = ckpt.read_checkpoint(latest, rank=self.ranks.rank)
        trainer = state["trainer"]
        if trainer.get("fingerprint") != self.fp:        # another recipe, world or seed: start over
            self.ranks.barrier()                         # (every rank has read it before it goes)
            if self.ranks.main:
                shutil.rmtree(self.root)
            return 0, {}
        for name, part in parts.items():
            if isinstance(part, torch.Tensor):
                part.copy_(state["model"][name])
            else:
                prefix = f"{name}."
                part.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        guard.load_state_dict(trainer["guard"])
        ckpt.set_rng_state(*state["rng"])
        version, internal, gauss = trainer["loop_rng"]
        rng.setstate((version, tuple(internal), gauss))
        return int(trainer["step"]), trainer["loop"]

    def save(self, step: int, total: int, parts: dict, opt, sched, guard: StepGuard, rng, loop: dict) -> None:
        """Checkpoint after `step` steps when it is due (every `every` steps, and the last)."""
        if self.root is None or (step % self.every and step != total):
            return
        from distill.train import checkpoint as ckpt

        tensors = {}
        for name, part in parts.items():
            if isinstance(part, torch.Tensor):
                tensors[name] = part.detach().clone()
            else:
                tensors.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
        version, internal, gauss = rng.getstate()
        ckpt.save_checkpoint(self.root, step, self.writer, tensors, opt.state_dict(), {
            "step": step, "fingerprint": self.fp, "scheduler": sched.state_dict(), "guard": guard.state_dict(),
            "loop_rng": [version, list(internal), gauss], "loop": loop}, keep=1,
            rank=self.ranks.rank, is_main=self.ranks.main)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__}
