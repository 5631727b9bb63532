"""Build a mini-world: plan every part, render in worker processes, write index files, then publish.

Atomic and resumable: everything is written under `.<out>.partial/` beside the target (`distill.io.staging_folder`); each finished
part leaves a `.done-<part>` marker (with its summary) so a re-run after a kill redoes only unfinished
parts; `world.json` is written last and the folder is renamed into place. A folder without
`world.json` is therefore never a finished world.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import parts
from .vocab import SHAPES, classification_classes, vocabulary

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.1"   # 1.1: the `pretrain` part
PART_ORDER = ["classification", "retrieval", "segmentation", "refer", "pool", "pretrain"]
OPTIONAL_PARTS = {"pretrain"}   # built when the size config names it (older custom configs do not)
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a picture of the {}.", "a rendering of a {}.",
             "a {} on a plain background.", "an image containing a {}.", "a close-up of the {}.",
             "a small {}.", "a large {}.", "a {} shape."]


def size_configs() -> dict:
    return json.loads(resources.files("benchmarks.world").joinpath("sizes.json").read_text())


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


class _Runner:
    """Runs task functions inline (workers=1) or in a spawn-context process pool; results in task order."""

    def __init__(self, workers: int, progress: bool):
        self.progress = progress
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None

    def map(self, desc: str, fn: Callable, arg_list: list[tuple]) -> list:
        bar = tqdm(total=len(arg_list), desc=desc, disable=not self.progress, leave=False)
        try:
            if self.pool is None:
                results = []
                for args in arg_list:
                    results.append(fn(*args))
                    bar.update()
                return results
            futures = [self.pool.submit(fn, *args) for args in arg_list]
            results = []
            for fut in futures:
                results.append(fut.result())
                bar.update()
            return results
        finally:
            bar.close()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


# ---------------------------------------------------------------- parts
def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def build_classification(root: Path, seed: int, cfg: dict, run: _Runner) -> dict:
    classes = classification_classes(cfg["shapes"], cfg["colours"])
    folders = sorted(f"{c}_{s}" for c, s in classes)  # sorted folder order = class index
    by_folder = {f"{c}_{s}": (c, s) for c, s in classes}
    plan_rng = parts.item_rng(seed, "plan", 1)
    ranks = plan_rng.permutation(len(folders))
    train_counts = [max(cfg["train_min_per_class"], int(round(cfg["train_max_per_class"] / (r + 1) ** cfg["zipf_alpha"])))
                    for r in ranks]
    items, index = [], 0
    for split, counts in (("train", train_counts), ("val", [cfg["val_per_class"]] * len(folders))):
        for folder, n in zip(folders, counts):
            colour, shape = by_folder[folder]
            for _ in range(n):
                items.append((index, split, folder, colour, shape))
                index += 1
    colours = sorted({c for c, _ in classes})
    run.map("classification", parts.classification_task,
            [(seed, str(root), chunk, cfg, colours) for chunk in _chunks(items, 64)])
    _write_lines(root / "classnames.txt", [f"{by_folder[f][0]} {by_folder[f][1]}" for f in folders])
    _write_lines(root / "templates.txt", TEMPLATES)
    return {"classes": len(folders), "train_images": sum(train_counts), "val_images": cfg["val_per_class"] * len(folders),
            "train_per_class": dict(zip(folders, train_counts)), "image_size": cfg["image_size"]}


def _tokens(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() or ch in " -'" else " " for ch in text.lower()).split()


def build_retrieval(root: Path, seed: int, cfg: dict, run: _Runner) -> dict:
    indices = list(range(cfg["images"]))
    results = run.map("retrieval", parts.retrieval_task, [(seed, str(root), chunk, cfg) for chunk in _chunks(indices, 64)])
    images, sentid = [], 0
    for imgid, item in enumerate(r for chunk in results for r in chunk):
        sentences = []
        for caption in item["captions"]:
            sentences.append({"raw": caption, "tokens": _tokens(caption), "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filename": item["filename"], "filepath": "images", "split": "test", "imgid": imgid,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    (root / "dataset_miniworld.json").write_text(json.dumps({"dataset": "miniworld", "images": images}))
    return {"images": len(images), "captions": sentid, "image_size": cfg["image_size"]}


def build_segmentation(root: Path, seed: int, cfg: dict, run: _Runner) -> dict:
    items, index = [], 0
    for split, n, prefix in (("training", cfg["train"], "ADE_train"), ("validation", cfg["val"], "ADE_val")):
        for k in range(n):
            items.append((index, split, f"{prefix}_{k + 1:08d}"))
            index += 1
    results = run.map("segmentation", parts.segmentation_task, [(seed, str(root), c, cfg) for c in _chunks(items, 32)])
    pixels = np.sum([r[0] for r in results], axis=0)
    base = root / "ADEChallengeData2016"
    # label k (1..C) in the PNGs is SHAPES[k-1]; the reader's reduce_zero_label maps it to k-1
    _write_lines(base / "classes.txt", SHAPES)
    return {"train_images": cfg["train"], "val_images": cfg["val"], "classes": len(SHAPES),
            "image_size": cfg["image_size"], "pixel_fraction": {name: round(float(v) / float(pixels.sum()), 4)
                                                                for name, v in zip(["other"] + SHAPES, pixels)}}


def build_refer(root: Path, seed: int, cfg: dict, run: _Runner) -> dict:
    n = cfg["images"]
    image_ids = [100001 + 7 * k for k in range(n)]  # COCO-like sparse ids
    results = run.map("refer", parts.refer_task,
                      [(seed, str(root), c, cfg) for c in _chunks(list(zip(range(n), image_ids)), 16)])
    scenes = [r for chunk in results for r in chunk]
    order = parts.item_rng(seed, "plan", 4).permutation(n)
    split_of, start = {}, 0
    fractions = cfg["split_fractions"]
    for i, (name, frac) in enumerate(fractions.items()):
        stop = n if i == len(fractions) - 1 else start + int(round(frac * n))
        for k in order[start:stop]:
            split_of[int(k)] = name
        start = stop
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for k, scene in enumerate(scenes):
        images.append(scene["image"])
        image_id = scene["image"]["id"]
        for obj in scene["objects"]:
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
                                "bbox": obj["bbox"], "area": obj["area"], "segmentation": obj["segmentation"],
                                "iscrowd": 0})
            if not obj["expressions"]:
                continue
            ref_id += 1
            sentences = []
            for text in obj["expressions"]:
                sentences.append({"raw": text, "sent": " ".join(_tokens(text)), "tokens": _tokens(text),
                                  "sent_id": sent_id})
                sent_id += 1
            refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split_of[k],
                         "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                         "category_id": obj["category_id"],
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    instances = {"info": {"description": "amoe mini-world refer set", "version": GENERATOR_VERSION},
                 "images": images, "annotations": annotations,
                 "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]}
    (folder / "instances.json").write_text(json.dumps(instances))
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the refer files are protocol-2 pickles
    per_split = {s: sum(r["split"] == s for r in refs) for s in fractions}
    return {"images": n, "annotations": len(annotations), "refs": len(refs), "sentences": sent_id,
            "refs_per_split": per_split}


def build_pool(root: Path, seed: int, cfg: dict, run: _Runner) -> dict:
    from .vocab import COLOUR_NAMES
    n_concepts = len(SHAPES) * len(COLOUR_NAMES)
    probs = parts.zipf_weights(n_concepts, cfg["zipf_alpha"], parts.item_rng(seed, "plan", 5))
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(cfg["images"]))
    tasks = [(seed, str(shard_dir / f"pool-{s:06d}.tar"), chunk, cfg, probs.tolist())
             for s, chunk in enumerate(_chunks(indices, cfg["per_shard"]))]
    results = run.map("pool", parts.pool_task, tasks)
    counts = np.sum([r[0] for r in results], axis=0)
    return {"images": cfg["images"], "shards": len(tasks), "concept_probs": [round(float(p), 6) for p in probs],
            "object_counts_per_concept": counts.tolist(), "min_side": cfg["min_side"], "max_side": cfg["max_side"]}


def build_pretrain(root: Path, seed: int, cfg: dict, run: _Runner) -> dict:
    """The teachers' pretraining data, standing in for the web-scale sets (WebLI, LVD-1689M) the real
    SigLIP2 and DINOv3 learnt from before anyone distilled them: read only by `amoe teachers train`,
    never by the student, the curation or the benchmarks."""
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(seed, str(shard_dir / f"pretrain-{s:06d}.tar"), chunk, cfg)
             for s, chunk in enumerate(_chunks(list(range(cfg["images"])), cfg["per_shard"]))]
    results = run.map("pretrain", parts.pretrain_task, tasks)
    return {"images": cfg["images"], "shards": len(tasks), "image_size": cfg["image_size"],
            "object_counts_per_concept": np.sum([r[0] for r in results], axis=0).tolist()}


BUILDERS = {"classification": build_classification, "retrieval": build_retrieval,
            "segmentation": build_segmentation, "refer": build_refer, "pool": build_pool,
            "pretrain": build_pretrain}


# ---------------------------------------------------------------- orchestration
def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_world(out: str | os.PathLike, size: str | dict = "small", seed: int = 0, workers: int | None = None,
               force: bool = False, progress: bool = True) -> dict:
    """Generate a mini-world at `out` and return its summary (also written to out/world.json).

    `size` is "small", "medium" or a config dict shaped like an entry of sizes.json. An existing
    world with the same seed/size/version is reused as is; a different one needs `force=True`."""
    out = Path(out).resolve()
    if isinstance(size, str):
        sizes = size_configs()
        if size not in sizes:
            raise ValueError(f"unknown world size {size!r}; choose one of {sorted(sizes)}")
        cfg, size_name = sizes[size], size
    else:
        cfg, size_name = size, "custom"
    identity = {"seed": int(seed), "size": size_name, "config": cfg, "generator_version": GENERATOR_VERSION}

    done_file = out / "world.json"
    if done_file.is_file():
        summary = json.loads(done_file.read_text())
        if {k: summary.get(k) for k in identity} == identity:
            log.info("mini-world at %s is already complete; reusing it", out)
            return summary
        if not force:
            raise FileExistsError(f"{out} holds a different mini-world (seed/size/version differ); "
                                  "use --force to replace it or choose another --out")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a finished mini-world (no world.json); "
                              "choose another --out or remove it yourself")

    # one writer per world: a second `world make` of the same --out is refused (LockHeld), not interleaved
    from distill.io import lock_run_folder   # here, not at the top: render workers never import torch
    lock = lock_run_folder(out.parent, "mini-world generation", name=f".{out.name}.lock")
    try:
        return _build(out, identity, seed, cfg, workers, progress)
    finally:
        lock.release()


def _build(out: Path, identity: dict, seed: int, cfg: dict, workers: int | None, progress: bool) -> dict:
    from distill.io import publish_folder, staging_folder

    tmp = staging_folder(out, identity)   # a killed run of the same world resumes from its finished parts

    workers = workers or min(2, os.cpu_count() or 1)
    t_start = time.perf_counter()
    part_summaries, timings = {}, {}
    run = _Runner(workers, progress)
    built = [p for p in PART_ORDER if p in cfg or p not in OPTIONAL_PARTS]
    try:
        for part in built:
            marker = tmp / f".done-{part}"
            if marker.is_file():
                saved = json.loads(marker.read_text())
                part_summaries[part], timings[part] = saved["summary"], saved["seconds"]
                continue
            if (tmp / part).exists():
                shutil.rmtree(tmp / part)  # killed mid-part: redo it from scratch
            (tmp / part).mkdir(parents=True)
            t0 = time.perf_counter()
            part_summaries[part] = BUILDERS[part](tmp / part, seed, cfg[part], run)
            timings[part] = round(time.perf_counter() - t0, 2)
            marker_tmp = marker.with_suffix(".tmp")
            marker_tmp.write_text(json.dumps({"summary": part_summaries[part], "seconds": timings[part]}))
            marker_tmp.replace(marker)
    finally:
        run.close()

    for part in built:
        (tmp / f".done-{part}").unlink()
    summary = dict(identity)
    summary.update({
        "parts": part_summaries, "vocabulary": vocabulary(),
        "timing": {"parts_seconds": timings, "total_seconds": round(time.perf_counter() - t_start, 2),
                   "workers": workers},
        "disk_bytes": _disk_bytes(tmp),
        "layout": {"classification": "classification/{train,val}/<class>/*.jpg + classnames.txt, templates.txt",
                   "retrieval": "retrieval/images/*.jpg + retrieval/dataset_miniworld.json",
                   "segmentation": "segmentation/ADEChallengeData2016/{images,annotations}/{training,validation}",
                   "refer": "refer/refcoco/{refs(unc).p,instances.json} + refer/images/train2014/",
                   "pool": "pool/shards/pool-%06d.tar",
                   **({"pretrain": "pretrain/shards/pretrain-%06d.tar"} if "pretrain" in built else {})},
    })
    world_tmp = tmp / ".world.json.tmp"
    world_tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    world_tmp.replace(tmp / "world.json")
    publish_folder(tmp, out)   # `out` is absent or empty (checked above)
    return summary
