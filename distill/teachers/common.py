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
from distill.train.guard import StepGuard, TrainingAborted, guarded_step

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
    """One update of a teacher trainer: backward, then the shared guarded step (clip the global grad
    norm; skip a non-finite step; abort after too many in a row), schedule; the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    skipped, _ = guarded_step(opt, params, loss.item(), clip, guard)
    if skipped is None:
        sched.step()
    elif guard.exhausted:
        raise TrainingAborted(f"{what}: {guard.in_a_row} skipped steps in a row ({skipped}); lower the learning "
                              f"rate in its teacher recipe ({RECIPES_FILE.name})")
    return round(loss.item(), 5)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__}
