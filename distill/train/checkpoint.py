"""Atomic, pickle-free training checkpoints.

Layout of ``OUT/checkpoints/step_XXXXXXXX/`` (written into a temporary sibling folder, then renamed):

    model.safetensors        full (unsharded) model state dict
    optimizer.safetensors    every optimizer state tensor, key "state/<param fqn>/<name>"
    optimizer.json           param groups (hyper-parameters + parameter fqns) and scalar state
    rng_rank<r>.safetensors  torch CPU (+ CUDA) generator states of rank r
    rng_rank<r>.json         python `random` state of rank r
    trainer.json             step, scheduler, sampler position, counters, config fingerprint
    phis/                    PHI-S statistics (one file per teacher/kind)

``OUT/checkpoints/latest.json`` names the newest complete checkpoint; it is replaced only after the
folder is complete, so a crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from distill.errors import AmoeError
from distill.io import load_tensors, save_tensors_atomic, write_json_atomic


class ResumeRefused(AmoeError, ValueError):
    """A run folder's checkpoint cannot be resumed by this command (other recipe, other world size)."""


# ----------------------------------------------------------------------------- optimizer flattening
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A (fqn-keyed) optimizer state dict -> (tensors, JSON). Non-tensor state values go to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pkey, pstate in osd["state"].items():
        for name, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{pkey}/{name}"] = v
            else:
                scalars.setdefault(str(pkey), {})[name] = v
    meta = {"param_groups": osd["param_groups"], "scalar_state": scalars,
            "key_types": {str(k): type(k).__name__ for k in osd["state"]}}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[Any, dict[str, Any]] = {}
    key_types = meta.get("key_types", {})

    def key_of(text: str):
        return int(text) if key_types.get(text) == "int" else text

    for k, v in tensors.items():
        # parameter fqns contain dots, never slashes; the state name is the last path part
        pkey, name = k[len("state/"):].rsplit("/", 1)
        state.setdefault(key_of(pkey), {})[name] = v
    for pkey, d in meta.get("scalar_state", {}).items():
        state.setdefault(key_of(pkey), {}).update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- save / load
def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the one latest.json names. A damaged pointer (empty, not JSON,
    naming a folder that is not there) costs nothing: the newest complete step_* folder is used, with
    a warning. Folders only get their step_* name once complete (see `publish`)."""
    import warnings

    root = checkpoint_root(out_dir)
    pointer = root / "latest.json"
    if not pointer.exists():
        return None
    try:
        path = root / json.loads(pointer.read_text())["name"]
        if (path / "trainer.json").exists():
            return path
        why = f"names {path.name}, which is not a complete checkpoint"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"is unreadable ({type(e).__name__}: {e})"
    complete = sorted(p for p in root.glob("step_*") if (p / "trainer.json").exists())
    if not complete:
        raise ResumeRefused(f"{pointer} {why} and no complete checkpoint is left in {root}; delete {root} "
                            "to start the run over")
    warnings.warn(f"{pointer} {why}; resuming from the newest complete checkpoint, {complete[-1].name}")
    return complete[-1]


def writer_token() -> str:
    """A name for this run's writer, the same on every rank (rank 0's, broadcast): staging folders
    carry it, so two writers never stage into one folder even if the run lock were bypassed."""
    import secrets

    import torch.distributed as dist

    token = [f"{os.getpid()}-{secrets.token_hex(4)}"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def staging_dir(out_dir: str | os.PathLike, step: int, writer: str) -> Path:
    """The temporary folder every rank of `writer` writes step `step` into (shared filesystem assumed)."""
    return checkpoint_root(out_dir) / f".step_{step:08d}.{writer}.partial"


def write_rank_files(folder: Path, rank: int) -> None:
    tensors, meta = rng_state()
    save_tensors_atomic(folder / f"rng_rank{rank}.safetensors", tensors)
    write_json_atomic(folder / f"rng_rank{rank}.json", meta)


def write_main_files(folder: Path, model_sd: dict[str, torch.Tensor], optim_sd: dict,
                     trainer: dict) -> None:
    save_tensors_atomic(folder / "model.safetensors", model_sd)
    o_tensors, o_meta = flatten_optimizer_state(optim_sd)
    save_tensors_atomic(folder / "optimizer.safetensors", o_tensors)
    write_json_atomic(folder / "optimizer.json", o_meta)
    write_json_atomic(folder / "trainer.json", trainer)   # written last inside the folder


def publish(out_dir: str | os.PathLike, step: int, keep: int, writer: str) -> Path:
    """Rename the staged folder into place, point latest.json at it, prune old checkpoints."""
    root = checkpoint_root(out_dir)
    tmp = staging_dir(out_dir, step, writer)
    final = root / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(root / "latest.json", {"name": final.name, "step": step})
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prepare_staging(out_dir: str | os.PathLike, step: int, writer: str) -> Path:
    """A fresh staging folder; partial folders left by a writer that died (the run lock says no other
    writer is alive) are removed."""
    for stale in checkpoint_root(out_dir).glob(".step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = staging_dir(out_dir, step, writer)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(out_dir: str | os.PathLike, step: int, writer: str, model_sd: dict[str, torch.Tensor],
                    optim_sd: dict, trainer: dict, keep: int, rank: int = 0, is_main: bool = True,
                    extra: Callable[[Path], None] | None = None) -> None:
    """Save step `step` of a run, the one sequence every trainer uses (distiller, grounding, the
    teacher loops); collective under a process group (every rank calls it, with its rank). The main
    rank refuses weights that are not finite (naming the last good checkpoint) and stages the folder;
    every rank writes its RNG files; the main rank writes the model, the optimizer, `extra(folder)`
    (e.g. PHI-S) and trainer.json, then publishes the folder and prunes to `keep`."""
    from distill.distributed import barrier
    from distill.train.guard import require_finite

    if is_main:
        last = latest_checkpoint(out_dir)
        require_finite(model_sd, f"the step-{step} checkpoint", str(last) if last else None)
        prepare_staging(out_dir, step, writer)
    barrier()
    folder = staging_dir(out_dir, step, writer)
    write_rank_files(folder, rank)
    barrier()
    if is_main:
        if extra is not None:
            extra(folder)
        write_main_files(folder, model_sd, optim_sd, trainer)
        publish(out_dir, step, keep, writer)
    barrier()


def read_checkpoint(folder: Path, rank: int) -> dict:
    trainer = json.loads((folder / "trainer.json").read_text())
    model = load_tensors(folder / "model.safetensors")
    optim = unflatten_optimizer_state(load_tensors(folder / "optimizer.safetensors"),
                                      json.loads((folder / "optimizer.json").read_text()))
    rng_file = folder / f"rng_rank{rank}.safetensors"
    rng = None
    if rng_file.exists():
        rng = (load_tensors(rng_file), json.loads((folder / f"rng_rank{rank}.json").read_text()))
    return {"trainer": trainer, "model": model, "optimizer": optim, "rng": rng}
