"""Shared plumbing of the teacher trainers: recipes, completion markers, schedules, machine info."""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

from distill.config import merge
from distill.errors import AmoeError
from distill.io import fingerprint, write_json_atomic
from distill.train.guard import StepGuard, optimizer_step as guarded_update

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
    return fingerprint({"teacher": name, "recipe": recipe[name], "world": world_id, "seed": seed})


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
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def fresh_partial(out: Path, name: str) -> Path:
    """An empty work folder for teacher `name`, named for this writer (pid + random); work folders of
    a writer that died are removed (the teacher's lock says no other writer is alive)."""
    import secrets

    for stale in out.glob(f".{name}.*partial"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = out / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    partial.mkdir(parents=True)
    return partial


def optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, params, clip: float,
                   guard: StepGuard, what: str) -> float:
    """A teacher loop's update (`distill.train.guard.optimizer_step`), its abort naming the recipe."""
    return guarded_update(opt, sched, loss, params, clip, guard, what,
                          f"lower the learning rate in its teacher recipe ({RECIPES_FILE.name})")


class LoopCheckpoints:
    """Mid-run resume of a teacher's training loop, in the shared checkpoint layout
    (`distill.train.checkpoint`: staged, published atomically, `latest.json`). Every `every` steps and
    at the last one, the loop's modules and tensors, optimizer, schedule, guard, the torch and Python
    RNG states and the loop's own state (sample order, losses, its `random.Random`) go to
    `root/checkpoints/step_*`. A restart of the same teacher (same fingerprint) continues from the
    newest one and ends with the same weights as a run that was never stopped; one of other settings
    is discarded. `root` None turns it off."""

    def __init__(self, root: Path | None, fp: str, every: int):
        self.root, self.fp, self.every = root, fp, max(1, int(every))

    def sub(self, name: str) -> "LoopCheckpoints":
        """The checkpoints of a loop nested in this teacher's training (the dino.txt head)."""
        return LoopCheckpoints(None if self.root is None else self.root / name, self.fp, self.every)

    def restore(self, parts: dict, opt, sched, guard: StepGuard, rng) -> tuple[int, dict]:
        """(steps done, loop state) after loading the newest checkpoint into `parts` (modules or
        tensors by name), `opt`, `sched`, `guard` and `rng`; (0, {}) when there is none to resume."""
        from distill.train import checkpoint as ckpt

        latest = None if self.root is None else ckpt.latest_checkpoint(self.root)
        if latest is None:
            return 0, {}
        state = ckpt.read_checkpoint(latest, rank=0)
        trainer = state["trainer"]
        if trainer.get("fingerprint") != self.fp:        # another recipe, world or seed: start over
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
        ckpt.save_checkpoint(self.root, step, f"{os.getpid()}", tensors, opt.state_dict(), {
            "step": step, "fingerprint": self.fp, "scheduler": sched.state_dict(), "guard": guard.state_dict(),
            "loop_rng": [version, list(internal), gauss], "loop": loop}, keep=1)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__}
