"""Mini-world generator: layout, determinism by seed, atomic/resumable publishing, CLI wiring.

A reduced configuration (same code paths, fewer and smaller images) keeps the suite fast; the
"small" preset's timing is measured by `amoe world make` and reported in docs/datasets.md.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.world import make_world, size_configs
from benchmarks.world import make as world_make

TINY = {
    "classification": {"shapes": 4, "colours": 2, "image_size": 64, "train_max_per_class": 12,
                       "train_min_per_class": 2, "zipf_alpha": 1.0, "val_per_class": 3, "distractor_prob": 0.3},
    "retrieval": {"images": 12, "image_size": 96, "max_objects": 3},
    "segmentation": {"train": 8, "val": 4, "image_size": 96, "min_objects": 2, "max_objects": 4},
    "refer": {"images": 16, "min_side": 160, "max_side": 224, "min_objects": 3, "max_objects": 5,
              "split_fractions": {"train": 0.5, "val": 0.25, "testA": 0.125, "testB": 0.125}},
    "pool": {"images": 30, "per_shard": 12, "min_side": 128, "max_side": 320, "zipf_alpha": 1.1, "max_objects": 3},
    "pretrain": {"images": 40, "per_shard": 16, "image_size": 48, "max_objects": 2},
}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("worlds") / "w0"
    make_world(out, size=TINY, seed=0, workers=1, progress=False)
    return out


def test_layout_matches_common_contract(tiny_world):
    w = tiny_world
    summary = json.loads((w / "world.json").read_text())
    assert summary["seed"] == 0 and summary["generator_version"] and summary["vocabulary"]["shapes"]
    assert set(summary["timing"]["parts_seconds"]) == {"classification", "retrieval", "segmentation", "refer", "pool",
                                                       "pretrain"}
    folders = sorted(p.name for p in (w / "classification" / "train").iterdir())
    assert folders == sorted(p.name for p in (w / "classification" / "val").iterdir())
    names = (w / "classification" / "classnames.txt").read_text().splitlines()
    assert len(names) == len(folders) == 8
    assert [n.replace(" ", "_") for n in names] == folders  # class-index order = sorted folder order
    assert all("{}" in t for t in (w / "classification" / "templates.txt").read_text().splitlines())
    assert (w / "retrieval" / "dataset_miniworld.json").is_file()
    ade = w / "segmentation" / "ADEChallengeData2016"
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        assert any((ade / sub).iterdir())
    assert (w / "refer" / "refcoco" / "refs(unc).p").is_file() and (w / "refer" / "refcoco" / "instances.json").is_file()
    assert sorted(p.name for p in (w / "pool" / "shards").iterdir()) == ["pool-000000.tar", "pool-000001.tar",
                                                                         "pool-000002.tar"]
    assert not list(w.parent.glob(".w0.partial*"))


def test_classification_is_long_tailed_train_and_balanced_val(tiny_world):
    w = tiny_world / "classification"
    train = sorted(len(list((w / "train" / f).iterdir())) for f in sorted(p.name for p in (w / "train").iterdir()))
    val = {len(list(p.iterdir())) for p in (w / "val").iterdir()}
    assert val == {3}
    assert train[-1] == 12 and train[0] == 2 and len(set(train)) > 3


def test_retrieval_captions_are_varied_and_name_the_objects(tiny_world):
    data = json.loads((tiny_world / "retrieval" / "dataset_miniworld.json").read_text())
    assert len(data["images"]) == 12
    for img in data["images"]:
        raws = [s["raw"] for s in img["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5 and img["split"] == "test"
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        assert all(s["tokens"] and s["tokens"] == s["raw"].lower().replace(".", " ").replace(",", " ")
                   .replace(":", " ").split() for s in img["sentences"])


def test_segmentation_labels_are_shape_indices(tiny_world):
    ade = tiny_world / "segmentation" / "ADEChallengeData2016"
    classes = (ade / "classes.txt").read_text().split()
    for png in (ade / "annotations" / "validation").iterdir():
        label = np.asarray(Image.open(png))
        assert label.dtype == np.uint8 and label.max() <= len(classes)
        assert (label == 0).any() and (label > 0).any()
        img = Image.open(ade / "images" / "validation" / (png.stem + ".jpg"))
        assert img.size == label.shape[::-1]


def test_refer_files_follow_the_refer_toolkit(tiny_world):
    from pycocotools import mask as mask_utils
    folder = tiny_world / "refer" / "refcoco"
    raw = (folder / "refs(unc).p").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2 like the originals
    refs = pickle.loads(raw)
    inst = json.loads((folder / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    images = {i["id"]: i for i in inst["images"]}
    assert {r["split"] for r in refs} <= {"train", "val", "testA", "testB"} and len(refs) > 10
    kinds = set()
    for r in refs:
        assert r["file_name"] == f"COCO_train2014_{r['image_id']:012d}_{r['ann_id']}.jpg"
        assert (tiny_world / "refer" / "images" / "train2014" / images[r["image_id"]]["file_name"]).is_file()
        assert r["sentences"] and all(set(s) == {"raw", "sent", "tokens", "sent_id"} for s in r["sentences"])
        ann, info = anns[r["ann_id"]], images[r["image_id"]]
        seg = ann["segmentation"]
        kinds.add(type(seg).__name__)
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, info["height"], info["width"]))
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        m = mask_utils.decode(rle)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        # the box bounds the polygon (COCO's rule) or the RLE mask; rasterisation differs by <= 1 px
        assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
        assert abs(xs.max() + 1 - (x + w)) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
        if isinstance(seg, list):
            assert x == min(seg[0][0::2]) and y == min(seg[0][1::2])
    assert kinds == {"list", "dict"}  # both polygons and RLE occur


def test_pool_shards_are_long_tailed_with_varied_resolutions(tiny_world):
    sizes, concepts = [], []
    for shard in sorted((tiny_world / "pool" / "shards").iterdir()):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            keys = sorted({n.split(".")[0] for n in names})
            assert set(names) == {f"{k}.{e}" for k in keys for e in ("jpg", "txt", "json")}
            for k in keys:
                meta = json.loads(tar.extractfile(f"{k}.json").read())
                im = Image.open(tar.extractfile(f"{k}.jpg"))
                assert im.size == (meta["width"], meta["height"])
                sizes.append(im.size)
                concepts += meta["concepts"]
    assert len(sizes) == 30
    assert all(128 <= s <= 320 for wh in sizes for s in wh)
    assert all(0.5 - 1e-3 <= w / h <= 2.0 + 1e-3 for w, h in sizes) and len(set(sizes)) > 10
    assert all(0 <= c < 80 for c in concepts)


def test_pretrain_shards_hold_small_captioned_scenes_in_the_pool_format(tiny_world):
    """The teachers' pretraining set: square scenes of one or two objects, each with a caption that
    names its objects and the pool's metadata (concepts, boxes), every concept drawn uniformly."""
    shards = sorted((tiny_world / "pretrain" / "shards").iterdir())
    assert [p.name for p in shards] == ["pretrain-000000.tar", "pretrain-000001.tar", "pretrain-000002.tar"]
    n, first_concepts = 0, []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys = sorted({m.split(".")[0] for m in tar.getnames()})
            for k in keys:
                meta = json.loads(tar.extractfile(f"{k}.json").read())
                caption = tar.extractfile(f"{k}.txt").read().decode()
                assert Image.open(tar.extractfile(f"{k}.jpg")).size == (48, 48)
                assert 1 <= len(meta["objects"]) <= 2 and all(o["bbox"] for o in meta["objects"])
                assert meta["objects"][0]["size"] in ("medium", "large")
                assert meta["objects"][0]["shape"] in caption.lower()
                first_concepts.append(meta["primary_concept"])
                n += 1
    assert n == 40
    assert len(set(first_concepts)) > 25   # uniform over 80 concepts, not the pool's few head concepts
    summary = json.loads((tiny_world / "world.json").read_text())
    assert summary["parts"]["pretrain"]["images"] == 40 and "pretrain" in summary["layout"]


def test_a_size_config_without_pretrain_builds_the_other_parts(tmp_path):
    cfg = {k: v for k, v in TINY.items() if k != "pretrain"}
    cfg["pool"] = dict(TINY["pool"], images=4)
    summary = make_world(tmp_path / "w", size=cfg, seed=0, workers=1, progress=False)
    assert "pretrain" not in summary["parts"] and not (tmp_path / "w" / "pretrain").exists()
    assert (tmp_path / "w" / "pool" / "shards").is_dir()


def test_generation_is_deterministic_by_seed_and_independent_of_workers(tiny_world, tmp_path):
    again = tmp_path / "again"
    make_world(again, size=TINY, seed=0, workers=2, progress=False)
    assert tree_hashes(again) == tree_hashes(tiny_world)
    other = tmp_path / "other"
    small = dict(TINY, pool=dict(TINY["pool"], images=6))
    make_world(other, size=small, seed=1, workers=1, progress=False)
    a, b = tree_hashes(tiny_world), tree_hashes(other)
    common = [k for k in a if k in b and k.startswith("classification/val")]
    assert common and sum(a[k] != b[k] for k in common) == len(common)


def test_killed_run_leaves_no_world_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "w"
    small = dict(TINY, pool=dict(TINY["pool"], images=6))

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated kill")
    monkeypatch.setitem(world_make.BUILDERS, "refer", crash)
    with pytest.raises(KeyboardInterrupt):
        make_world(out, size=small, seed=3, workers=1, progress=False)
    assert not out.exists()  # nothing that looks like a world
    partial = tmp_path / ".w.partial"
    assert (partial / ".done-classification").is_file() and not (partial / "world.json").exists()

    def must_not_rerun(*a, **k):
        raise AssertionError("finished part was regenerated")
    monkeypatch.setitem(world_make.BUILDERS, "classification", must_not_rerun)
    monkeypatch.setitem(world_make.BUILDERS, "refer", world_make.build_refer)
    summary = make_world(out, size=small, seed=3, workers=1, progress=False)
    assert (out / "world.json").is_file() and not partial.exists()
    assert summary["parts"]["classification"]["classes"] == 8
    fresh = tmp_path / "fresh"
    monkeypatch.setitem(world_make.BUILDERS, "classification", world_make.build_classification)
    make_world(fresh, size=small, seed=3, workers=1, progress=False)
    assert tree_hashes(fresh) == tree_hashes(out)


def test_existing_worlds_are_reused_or_refused(tiny_world, tmp_path):
    assert make_world(tiny_world, size=TINY, seed=0, progress=False)["seed"] == 0  # reused, not rebuilt
    with pytest.raises(FileExistsError, match="--force"):
        make_world(tiny_world, size=TINY, seed=5, progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a finished mini-world"):
        make_world(junk, size=TINY, seed=0, progress=False)
    with pytest.raises(ValueError, match="unknown world size"):
        make_world(tmp_path / "x", size="huge")


def test_cli_registers_world_make(tmp_path, capsys):
    from amoe.cli import build_parser, main
    args = build_parser("world").parse_args(["world", "make", "--out", str(tmp_path / "w"), "--size", "medium",
                                             "--seed", "4"])
    assert (args.size, args.seed, args.func.__name__) == ("medium", 4, "_make")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "f").write_text("x")
    assert main(["world", "make", "--out", str(junk)]) == 1
    assert "not a finished mini-world" in capsys.readouterr().out
    assert set(size_configs()) == {"small", "medium"}


def _obj(shape, colour, texture, size, cx, cy, r=10.0):
    return {"shape": shape, "colour": colour, "texture": texture, "size": size, "cx": cx, "cy": cy, "r": r}


def test_referring_expressions_single_out_their_target():
    from benchmarks.world.language import referring_expressions
    objs = [_obj("square", "red", "solid", "small", 20, 50), _obj("square", "red", "solid", "large", 150, 50, 30),
            _obj("circle", "blue", "dotted", "medium", 90, 50)]
    rng = np.random.default_rng(0)
    small_sq = referring_expressions(objs, 0, rng, width=200, max_sentences=5)
    assert small_sq and all("square" in e for e in small_sq)
    # colour or texture alone cannot separate the two red solid squares: size, position or a relation must
    assert all(any(w in e for w in ("small", "little", "left", "leftmost")) for e in small_sq)
    assert "the square left of the circle" not in small_sq
    assert any(e.endswith("to the left of the circle") for e in small_sq)
    circle = referring_expressions(objs, 2, rng, width=200, max_sentences=5)
    assert any(e in ("the circle", "circle", "the circle in the picture") for e in circle)
    twins = [_obj("star", "red", "solid", "small", 50, 50), _obj("star", "red", "solid", "small", 52, 150)]
    assert referring_expressions(twins, 0, rng, width=200) == []  # indistinguishable: no ref


def test_captions_name_every_object():
    from benchmarks.world.language import captions
    scene = {"width": 128, "height": 128, "background": "grid",
             "objects": [_obj("ring", "pink", "striped", "large", 30, 30, 25), _obj("cross", "cyan", "solid", "small", 100, 90)]}
    caps = captions(scene, np.random.default_rng(1), n=5)
    assert len(set(caps)) == 5
    for c in caps:
        assert all(w in c for w in ("pink", "ring", "cyan", "cross")), c


def test_shape_ceiling_trains_on_fresh_scenes_and_scores_the_val_split(tiny_world, tmp_path, capsys):
    """`amoe world ceiling`: fresh seeded scenes of the world's classification shapes, a supervised model per `--model`, shape top-1 on the val split; a missing world is one line, exit 2."""
    from amoe.cli import main
    from benchmarks.world.ceiling import render_shape_scenes
    cfg = json.loads((tiny_world / "world.json").read_text())["config"]["classification"]
    images, labels = render_shape_scenes(24, cfg, seed=0, progress=False)
    assert images.shape == (24, 64, 64, 3) and set(labels.tolist()) <= set(range(cfg["shapes"]))
    again, _ = render_shape_scenes(24, cfg, seed=0, progress=False)
    assert (images == again).all()                                   # seeded
    from distill.teachers import load_recipe
    recipe_init = load_recipe()["dinov3"]["initializer_range"]
    for model, extra in (("cnn", []), ("vit", []), ("vit", ["--init-range", "0.05"])):
        out = tmp_path / f"{model}.json"
        assert main(["world", "ceiling", "--world", str(tiny_world), "--model", model, "--seconds", "0.5",
                     "--scenes", "16", "--side", "32", "--out", str(out), "--no-progress", *extra]) == 0
        result = json.loads(out.read_text())
        assert result["model"] == model and result["steps"] >= 1 and result["chance"] == 25.0
        assert 0.0 <= result["shape_top1"] <= 100.0
        if model == "vit":   # the teacher recipe's init unless overridden
            assert result["init_range"] == (0.05 if extra else recipe_init)
    capsys.readouterr()
    assert main(["world", "ceiling", "--world", str(tmp_path / "nope")]) == 2
    assert "amoe world make" in capsys.readouterr().err
    assert main(["world", "ceiling", "--world", str(tiny_world), "--model", "vit", "--side", "30"]) == 2
    assert "--patch 8" in capsys.readouterr().err
    assert main(["world", "ceiling", "--world", str(tiny_world), "--scenes", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["world", "ceiling", "--world", str(tiny_world), "--model", "vit", "--init-range", "0"]) == 2
    assert "--init-range 0.0" in capsys.readouterr().err
