"""Per-part generation work. Each task function renders a contiguous range of items of one part and
writes their files; it returns plain metadata that the orchestrator (make.py) assembles into the
part's index files. Every item draws from its own RNG seeded by (world seed, part, item index), so
output does not depend on how items are split across worker processes.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from . import language
from .draw import make_object, place, render
from .vocab import BACKGROUNDS, COLOUR_NAMES, SHAPES, SIZE_NAMES, TEXTURES, concept_id

PART_IDS = {"classification": 1, "retrieval": 2, "segmentation": 3, "refer": 4, "pool": 5, "pretrain": 6,
            "plan": 99}
JPEG_QUALITY = 90


def item_rng(seed: int, part: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, PART_IDS[part], index])


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _scene(rng, width, height, specs, overlap: bool, scale: float = 1.0) -> dict:
    """specs: list of (shape, colour, texture, size); objects that cannot be placed are dropped. `scale`
    multiplies every object's size band (vocab.SIZES is relative to the short side)."""
    objs: list[dict] = []
    short = min(width, height)
    for shape, colour, texture, size in specs:
        probe = make_object(rng, shape, colour, texture, size, 0, 0, round(short * scale))
        pos = place(rng, width, height, probe["r"], objs, overlap)
        if pos is None:
            continue
        probe["cx"], probe["cy"] = pos
        objs.append(probe)
    return {"width": width, "height": height, "background": _pick(rng, BACKGROUNDS), "objects": objs}


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=JPEG_QUALITY)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# ---------------------------------------------------------------- classification
def classification_task(seed: int, root: str, items: list[tuple], cfg: dict, class_colours: list[str]) -> list:
    """items: (index, split, folder, colour, shape). One main object (medium/large) of the class;
    sometimes a small distractor in a colour no class uses, so the label is the dominant object."""
    spare = [c for c in COLOUR_NAMES if c not in class_colours] or COLOUR_NAMES
    size = cfg["image_size"]
    for index, split, folder, colour, shape in items:
        rng = item_rng(seed, "classification", index)
        specs = [(shape, colour, _pick(rng, TEXTURES), _pick(rng, ["medium", "large"]))]
        if rng.random() < cfg["distractor_prob"]:
            specs.append((_pick(rng, [s for s in SHAPES if s != shape]), _pick(rng, spare), _pick(rng, TEXTURES), "small"))
        image, _ = render(_scene(rng, size, size, specs, overlap=False), rng)
        _save_jpeg(image, Path(root) / split / folder / f"{split}_{index:06d}.jpg")
    return [len(items)]


# ---------------------------------------------------------------- retrieval
def retrieval_task(seed: int, root: str, indices: list[int], cfg: dict) -> list:
    out = []
    size = cfg["image_size"]
    for index in indices:
        rng = item_rng(seed, "retrieval", index)
        n = int(rng.integers(1, cfg["max_objects"] + 1))
        specs = [(_pick(rng, SHAPES), _pick(rng, COLOUR_NAMES), _pick(rng, TEXTURES),
                  _pick(rng, ["medium", "large"] if n == 1 else SIZE_NAMES)) for _ in range(n)]
        scene = _scene(rng, size, size, specs, overlap=False)
        image, _ = render(scene, rng)
        name = f"mw_{index:06d}.jpg"
        _save_jpeg(image, Path(root) / "images" / name)
        out.append({"filename": name, "captions": language.captions(scene, rng, n=5)})
    return out


# ---------------------------------------------------------------- segmentation
def segmentation_task(seed: int, root: str, items: list[tuple], cfg: dict) -> list:
    """items: (index, split, stem). Overlapping objects; label = shape index + 1, 0 = background."""
    size = cfg["image_size"]
    base = Path(root) / "ADEChallengeData2016"
    pixels = np.zeros(len(SHAPES) + 1, dtype=np.int64)
    for index, split, stem in items:
        rng = item_rng(seed, "segmentation", index)
        n = int(rng.integers(cfg["min_objects"], cfg["max_objects"] + 1))
        specs = [(_pick(rng, SHAPES), _pick(rng, COLOUR_NAMES), _pick(rng, TEXTURES), _pick(rng, SIZE_NAMES))
                 for _ in range(n)]
        scene = _scene(rng, size, size, specs, overlap=True)
        image, instances = render(scene, rng)
        lut = np.array([0] + [SHAPES.index(o["shape"]) + 1 for o in scene["objects"]], dtype=np.uint8)
        label = lut[instances]
        pixels += np.bincount(label.ravel(), minlength=len(pixels))
        _save_jpeg(image, base / "images" / split / f"{stem}.jpg")
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label, "L").save(base / "annotations" / split / f"{stem}.png")
    return [pixels.tolist()]


# ---------------------------------------------------------------- refer
RLE_SHAPES = {"circle", "ring", "crescent"}  # curved or holed: stored as RLE; others as polygons


def refer_task(seed: int, root: str, items: list[tuple], cfg: dict) -> list:
    """items: (index, image_id). Non-overlapping objects drawn from few shapes/colours so that
    attributes and relations are needed to tell them apart."""
    from pycocotools import mask as mask_utils

    from .draw import shape_polygon
    out = []
    for index, image_id in items:
        rng = item_rng(seed, "refer", index)
        w = int(rng.integers(cfg["min_side"], cfg["max_side"] + 1))
        h = int(rng.integers(cfg["min_side"], cfg["max_side"] + 1))
        shapes = list(rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False))
        colours = list(rng.choice(COLOUR_NAMES, size=int(rng.integers(2, 4)), replace=False))
        n = int(rng.integers(cfg["min_objects"], cfg["max_objects"] + 1))
        specs = [(str(_pick(rng, shapes)), str(_pick(rng, colours)), _pick(rng, TEXTURES), _pick(rng, SIZE_NAMES))
                 for _ in range(n)]
        scene = _scene(rng, w, h, specs, overlap=False, scale=float(cfg.get("object_scale", 1.0)))
        image, instances = render(scene, rng)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        _save_jpeg(image, Path(root) / "images" / "train2014" / file_name)
        objects = []
        for k, obj in enumerate(scene["objects"]):
            mask = instances == (k + 1)
            if not mask.any():
                continue
            if obj["shape"] in RLE_SHAPES:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                poly = shape_polygon(obj["shape"], obj["cx"], obj["cy"], obj["r"], obj["angle"])
                segmentation = [[round(min(max(v, 0.0), (w if i % 2 == 0 else h) - 1.0), 2)
                                 for xy in poly for i, v in enumerate(xy)]]
            if isinstance(segmentation, list):  # COCO's convention: the box bounds the polygon
                xs, ys = segmentation[0][0::2], segmentation[0][1::2]
                bbox = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
            else:
                bbox = _bbox(mask)
            objects.append({"category_id": SHAPES.index(obj["shape"]) + 1, "bbox": bbox,
                            "area": float(mask.sum()), "segmentation": segmentation,
                            "attributes": {a: obj[a] for a in ("shape", "colour", "texture", "size")},
                            "expressions": language.referring_expressions(scene["objects"], k, rng, w)})
        out.append({"image": {"id": image_id, "file_name": file_name, "width": w, "height": h}, "objects": objects})
    return out


# ---------------------------------------------------------------- pool (webdataset shards)
def zipf_weights(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed probabilities over n items; which item gets which rank is a seeded permutation."""
    ranks = rng.permutation(n)
    w = 1.0 / (ranks + 1.0) ** alpha
    return w / w.sum()


def _add_sample(writer: tarfile.TarFile, index: int, scene: dict, rng: np.random.Generator, counts: np.ndarray) -> None:
    """Render `scene` and append it to a webdataset shard as `<index>.jpg/.txt/.json` (image, one
    caption, object metadata with concept ids and boxes); `counts` gets the objects' concepts."""
    image, instances = render(scene, rng)
    objs = []
    for k, o in enumerate(scene["objects"]):
        mask = instances == (k + 1)
        cid = concept_id(o["shape"], o["colour"])
        counts[cid] += 1
        objs.append({"concept": cid, "shape": o["shape"], "colour": o["colour"], "texture": o["texture"],
                     "size": o["size"], "bbox": _bbox(mask) if mask.any() else None})
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    caption = language.captions(scene, rng, n=1)[0]
    meta = {"concepts": sorted({o["concept"] for o in objs}), "primary_concept": objs[0]["concept"],
            "objects": objs, "background": scene["background"], "width": scene["width"],
            "height": scene["height"], "index": index}
    members = {"jpg": buf.getvalue(), "txt": caption.encode("utf-8"),
               "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{index:08d}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "amoe", "amoe"
        writer.addfile(info, io.BytesIO(data))


@contextmanager
def _shard(shard_path: str):
    """A webdataset shard writer: written under a temporary name and renamed into place only when
    complete. Shards are plain tars of <key>.<ext> members, grouped by key; written with the standard
    library (fixed mtime/owner for reproducible bytes) so workers need not import torch."""
    tmp = Path(shard_path).with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as writer:
        yield writer
    tmp.replace(shard_path)


def pool_task(seed: int, shard_path: str, indices: list[int], cfg: dict, concept_probs: list[float]) -> list:
    probs = np.asarray(concept_probs)
    counts = np.zeros(len(probs), dtype=np.int64)
    with _shard(shard_path) as writer:
        for index in indices:
            rng = item_rng(seed, "pool", index)
            base = math.exp(rng.uniform(math.log(cfg["min_side"]), math.log(cfg["max_side"])))
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w = int(min(cfg["max_side"], max(cfg["min_side"], round(base * math.sqrt(aspect)))))
            h = int(min(cfg["max_side"], max(cfg["min_side"], round(base / math.sqrt(aspect)))))
            n = int(rng.integers(1, cfg["max_objects"] + 1))
            concepts = [int(c) for c in rng.choice(len(probs), size=n, p=probs)]
            specs = []
            for i, c in enumerate(concepts):
                shape, colour = divmod(c, len(COLOUR_NAMES))
                specs.append((SHAPES[shape], COLOUR_NAMES[colour], _pick(rng, TEXTURES),
                              _pick(rng, ["medium", "large"]) if i == 0 else _pick(rng, SIZE_NAMES)))
            scene = _scene(rng, w, h, specs, overlap=False)
            _add_sample(writer, index, scene, rng, counts)
    return [counts.tolist()]


# ---------------------------------------------------------------- pretrain (webdataset shards)
def pretrain_task(seed: int, shard_path: str, indices: list[int], cfg: dict) -> list:
    """The teachers' own pretraining images: small square scenes of one to `max_objects` objects,
    every concept equally likely (the long tail belongs to the pool, where curation acts), the first
    object medium or large; same member layout as the pool's shards."""
    counts = np.zeros(len(SHAPES) * len(COLOUR_NAMES), dtype=np.int64)
    size = cfg["image_size"]
    with _shard(shard_path) as writer:
        for index in indices:
            rng = item_rng(seed, "pretrain", index)
            n = int(rng.integers(1, cfg["max_objects"] + 1))
            specs = [(_pick(rng, SHAPES), _pick(rng, COLOUR_NAMES), _pick(rng, TEXTURES),
                      _pick(rng, ["medium", "large"]) if i == 0 else _pick(rng, SIZE_NAMES)) for i in range(n)]
            _add_sample(writer, index, _scene(rng, size, size, specs, overlap=False), rng, counts)
    return [counts.tolist()]
