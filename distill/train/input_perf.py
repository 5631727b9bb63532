"""`amoe distill perf --bench inputs` and `--bench pool`: the input pipeline and the pool index at scale.

inputs: real JPEG webdataset shards are written to a scratch folder (smooth random photographs-like
images, JPEG quality 90, one source size per side budget), then
- one worker's rate: `StepDataset` in this process over whole planned steps (decode, the student's
  resize, and the real preprocessing of both paper teachers: the HF `Siglip2ImageProcessor` at the
  NaFlex patch budget and the DINOv3 encoder's aspect-kept resize; their models are tiny stand-ins,
  only their preprocessing runs);
- the wait: the DataLoader with `workers` processes feeding a stand-in accelerator step that sleeps
  `step_s` (a GPU step leaves the host CPU idle); `wait_fraction` is the share of the steps' wall time
  spent waiting for inputs, after the first step (worker start-up, reported apart), and
  `wait_fraction_median_step` the same for the median step;
- `break_even_step_s`: the shortest accelerator step `workers` workers keep up with.

pool: a synthetic index of `n` images (widths and heights drawn like a web pool) is written as the
trainer's memory-mapped index, then a `TrainingPool` and the token-balanced sampler are built from it
as every rank builds them, and the process's memory is read: anonymous (private) bytes per item, and
the index pages mapped in from the file (page cache, shared by the ranks of a node, reclaimable).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.memory import peak_rss_mib, reset_peak_rss, status_mib

SOURCE_SIZES = {256: (640, 480), 512: (1024, 768), 768: (1280, 960)}   # (W, H) of the scratch JPEGs


def write_jpeg_shards(folder: Path, n: int, size_wh: tuple[int, int], seed: int = 0, per_shard: int = 64) -> Path:
    """`n` JPEGs of `size_wh` in webdataset tars: low-frequency colour fields plus fine noise, so they
    cost what photographs cost to decode (a flat image decodes far faster, pure noise far slower)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size_wh
    for s in range(0, n, per_shard):
        with tarfile.open(folder / f"perf-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, n)):
                coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
                field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
                arr = np.clip(field + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return folder


def paper_teacher_preprocessing() -> dict:
    """`prepare(image, key, resolution)` of the paper's two teachers (`image()` decodes the image, as
    the input pipeline passes it): the real encoder classes and image processors, around tiny randomly
    initialised models (preprocessing never runs the model)."""
    from transformers import (DINOv3ViTConfig, DINOv3ViTModel, Siglip2Config, Siglip2ImageProcessor,
                              Siglip2Model)

    from distill.encoders.dinov3 import DINOv3Encoder
    from distill.encoders.hf_siglip2 import HFSiglipEncoder

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    siglip = Siglip2Model(Siglip2Config(vision_config=dict(patch_size=16, num_patches=256, **tiny),
                                        text_config=dict(vocab_size=64, **tiny)))
    siglip2 = HFSiglipEncoder(siglip, Siglip2ImageProcessor(patch_size=16, max_num_patches=256),
                              "perf-standin", "siglip2", naflex=True)
    dino = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, num_register_tokens=4, image_size=224, **tiny))
    dinov3 = DINOv3Encoder(dino, "perf-standin", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resample=3,
                           default_side=256)
    return {name: (lambda image, key, res, enc=enc: enc.preprocess(image(), resolution=res))
            for name, enc in (("siglip2", siglip2), ("dinov3", dinov3))}


def worker_rate(pool, prepare: dict, sampler, images: int) -> tuple[float, int]:
    """(images/s of one worker, images per step): `StepDataset` over whole planned steps in this process."""
    from distill.train.inputs import StepDataset, StepTickets

    data, tickets = StepDataset(pool, prepare), iter(StepTickets(sampler, 0))
    data[next(tickets)]              # warm-up (first-call costs of the processors)
    n_img, t0 = 0, time.perf_counter()
    while n_img < images:
        step = data[next(tickets)]
        if not step.items:    # every image failed: a broken pool or preprocessing, not a rate to measure
            raise RuntimeError(f"input bench: a step decoded none of its images ({step.corrupt} failed)")
        n_img += len(step.items)
    return n_img / (time.perf_counter() - t0), len(data[next(tickets)].items)


def jpeg_pool(folder: Path, res: int, images: int, patch: int = 16):
    """A `TrainingPool` over freshly written JPEG shards sized for the side budget `res`."""
    from distill.train.config import DataSource
    from distill.train.pool import TrainingPool

    size = SOURCE_SIZES.get(res, (res * 5 // 3, res * 5 // 4))
    shards = write_jpeg_shards(folder, images, size)
    return TrainingPool([DataSource(path=str(shards), resolutions=[res])], patch, seed=0), size


def run_input_perf(resolutions=(256, 768), images: int = 96, workers: int = 2, step_s: float = 0.25,
                   max_tokens: int = 8192, steps: int = 16, scratch: str | None = None) -> dict:
    from distill.train.batching import TokenBalancedSampler
    from distill.train.inputs import step_inputs

    prepare = paper_teacher_preprocessing()
    out = {"bench": "inputs", "workers": workers, "step_s": step_s, "max_tokens_per_rank_step": max_tokens,
           "teachers": sorted(prepare), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "resolutions": {}}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for res in resolutions:
            pool, size = jpeg_pool(Path(tmp) / f"r{res}", res, images)

            def sampler():
                return TokenBalancedSampler(pool.tokens + 5, world_size=1, seed=0, max_tokens=max_tokens,
                                            max_images_per_seq=64, seqs_per_rank=1)

            rate, per_step = worker_rate(pool, prepare, sampler(), images)

            # the pipeline feeding a stand-in accelerator step
            loader = iter(step_inputs(pool, sampler(), 0, prepare, workers=workers, prefetch=2))
            t0 = time.perf_counter()
            next(loader)
            startup = time.perf_counter() - t0
            waits, walls = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                next(loader)
                t1 = time.perf_counter()
                time.sleep(step_s)
                waits.append(t1 - t0)
                walls.append(time.perf_counter() - t0)
            del loader
            out["resolutions"][str(res)] = {
                "source_wh": list(size), "images_per_step": per_step,
                "images_per_s_per_worker": round(rate, 1),
                "break_even_step_s": round(per_step / (workers * rate), 4) if workers else None,
                "worker_startup_s": round(startup, 3),
                "wait_fraction": round(sum(waits) / sum(walls), 4),
                "wait_s_median": round(float(np.median(waits)), 4),
                # a typical step, without the first steps' catch-up after start-up
                "wait_fraction_median_step": round(float(np.median(waits)) / (float(np.median(waits)) + step_s), 4)}
    return out


def _synthetic_sizes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    widths = rng.integers(160, 2049, n)
    aspect = rng.choice(np.array([0.5625, 0.75, 1.0, 1.3333, 1.7778]), n) * rng.uniform(0.95, 1.05, n)
    heights = np.clip(np.round(widths * aspect), 120, 4096)
    return heights.astype(np.uint32), widths.astype(np.uint32)


def run_pool_perf(n: int = 20_000_000, shards: int = 2000, world_size: int = 32, resolutions=(256, 512, 768),
                  steps: int = 20, scratch: str | None = None) -> dict:
    """Memory and time of the pool index and the sampler for `n` images (see the module docstring)."""
    import gc

    from distill.train.batching import TokenBalancedSampler
    from distill.train.config import DataSource
    from distill.train.pool import ENTRY_DTYPE, TrainingPool, _shard_signature, write_index

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        root, index = Path(tmp) / "shards", Path(tmp) / "index" / "source_0"
        root.mkdir()
        index.mkdir(parents=True)
        for s in range(shards):     # empty tars: only their names, sizes and mtimes key the index
            tarfile.open(root / f"pool-{s:06d}.tar", "w").close()
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        entries = np.zeros(n, ENTRY_DTYPE)
        entries["shard"] = np.arange(n) * shards // n
        entries["offset"] = np.arange(n, dtype=np.int64) * 1024
        entries["size"] = 100_000
        entries["height"], entries["width"] = _synthetic_sizes(n, rng)
        digits = (np.arange(n, dtype=np.int64)[:, None] // 10 ** np.arange(9, -1, -1)) % 10 + 48
        write_index(index, _shard_signature(sorted(root.glob("*.tar"))), entries,
                    digits.astype(np.uint8).view("S10").reshape(-1), corrupt=0)
        del entries, digits
        written = time.perf_counter() - t0
        gc.collect()

        anon0, file0 = status_mib("RssAnon") or 0.0, status_mib("RssFile") or 0.0
        rss0 = status_mib("VmRSS") or 0.0
        peak_reset = reset_peak_rss()
        t0 = time.perf_counter()
        src = DataSource(path=str(root), resolutions=list(resolutions))
        pool = TrainingPool([src], 16, seed=0, index_dir=Path(tmp) / "index")
        t_pool = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampler = TokenBalancedSampler(pool.tokens + 5, world_size=world_size, seed=0, max_tokens=8192,
                                       max_images_per_seq=16, seqs_per_rank=1, lookahead=256)
        for _ in range(steps):
            plan = sampler.next_step()
        t_steps = time.perf_counter() - t0
        entry = pool.item(int(plan.ranks[0][0][0])).entry   # what a worker does for one image
        anon1, file1 = status_mib("RssAnon") or 0.0, status_mib("RssFile") or 0.0
        peak = peak_rss_mib() - rss0
        state = json.dumps(sampler.state_dict())
        mib = 2 ** 20
        return {"bench": "pool", "images": n, "shards": shards, "world_size": world_size,
                "resolutions": list(resolutions), "index_write_s": round(written, 2),
                "pool_build_s": round(t_pool, 2), "sampler_first_steps_s": round(t_steps, 2), "steps": steps,
                "pool_columns_bytes_per_item": round(pool.nbytes() / n, 2),
                "sampler_bytes_per_item": round(sampler.nbytes() / n, 2),
                "resident_anon_bytes_per_item": round((anon1 - anon0) * mib / n, 2),
                "resident_file_bytes_per_item": round((file1 - file0) * mib / n, 2),
                # the transient high-water mark of building (anonymous and mapped pages together)
                "build_peak_bytes_per_item": round(peak * mib / n, 2) if peak_reset else None,
                "sampler_state_json_bytes": len(state), "example_entry_key": entry.key}
