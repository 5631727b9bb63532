"""Every reader on (a) the mini-world's output and (b) a hand-made tree in the real dataset's layout."""
from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import (DatasetLayoutError, RefSample, UnreadableImageError, decode_mask, list_datasets,
                          load_dataset)

WORLD_CFG = {
    "classification": {"shapes": 3, "colours": 2, "image_size": 48, "train_max_per_class": 6,
                       "train_min_per_class": 2, "zipf_alpha": 1.0, "val_per_class": 2, "distractor_prob": 0.3},
    "retrieval": {"images": 6, "image_size": 64, "max_objects": 3},
    "segmentation": {"train": 4, "val": 3, "image_size": 64, "min_objects": 2, "max_objects": 4},
    "refer": {"images": 12, "min_side": 128, "max_side": 160, "min_objects": 3, "max_objects": 5,
              "split_fractions": {"train": 0.5, "val": 0.166, "testA": 0.167, "testB": 0.167}},
    "pool": {"images": 10, "per_shard": 4, "min_side": 128, "max_side": 256, "zipf_alpha": 1.1, "max_objects": 2},
}


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from benchmarks.world import make_world
    out = tmp_path_factory.mktemp("data-world") / "world"
    make_world(out, size=WORLD_CFG, seed=0, workers=1, progress=False)
    return out


def jpg(path: Path, size=(40, 30), colour=(200, 30, 30), fmt="JPEG", mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path, fmt)
    return path


def test_registry_names():
    expected = {"imagefolder", "imagenet", "food101", "dtd", "fgvc_aircraft", "flowers102", "caltech101", "cub200",
                "coco_karpathy", "flickr30k_karpathy", "karpathy", "ade20k", "cityscapes", "refcoco", "refcoco+",
                "refcocog", "webdataset"}
    assert set(list_datasets()) == expected
    assert list_datasets("segmentation") == ["ade20k", "cityscapes"]
    with pytest.raises(KeyError, match="known: ade20k"):
        load_dataset("imagenet21k", "/x", "val")


# ---------------------------------------------------------------- mini-world through the same readers
def test_world_classification(world):
    val = load_dataset("imagefolder", world / "classification", "val")
    train = load_dataset("imagefolder", world / "classification", "train")
    assert val.classes == (world / "classification" / "classnames.txt").read_text().splitlines()
    assert val.classes[0] == "green circle" and len(val) == 12 and len(train) > len(val) - 1
    assert "a photo of a {}." in val.templates
    image, label = val[5]
    assert image.mode == "RGB" and image.size == (48, 48) and label == val.targets[5]
    assert sorted(set(val.targets)) == list(range(6))


def test_world_retrieval(world):
    ds = load_dataset("karpathy", world / "retrieval", "test", json_name="dataset_miniworld.json")
    assert len(ds) == 6 and all(len(c) == 5 for c in ds.captions)
    assert ds[0].size == (64, 64)


def test_world_segmentation(world):
    ds = load_dataset("ade20k", world / "segmentation", "validation")
    assert len(ds) == 3 and ds.ignore_index == 255 and ds.classes[0] == "circle" and len(ds.classes) == 10
    image, label = ds[0]
    raw = np.asarray(Image.open(ds.label_paths[0]))
    assert label.dtype == np.int64 and label.shape == (64, 64)
    assert np.array_equal(label == 255, raw == 0) and np.array_equal(label[raw > 0], raw[raw > 0].astype(np.int64) - 1)
    assert len(load_dataset("ade20k", world / "segmentation", "train")) == 4


def test_world_refer(world):
    total = 0
    for split in ("train", "val", "testA", "testB"):
        ds = load_dataset("refcoco", world / "refer", split)
        total += len(ds)
        for i in range(len(ds)):
            s = ds[i]
            assert isinstance(s, RefSample) and s.split == split and s.sentences
            assert s.image_path.name == f"COCO_train2014_{s.image_id:012d}.jpg" and s.image_path.is_file()
            m = decode_mask(s.segmentation, s.height, s.width)
            assert m.shape == (s.height, s.width) and m.sum() > 0
            x0, y0, x1, y1 = s.bbox
            assert 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
    refs = pickle.loads((world / "refer" / "refcoco" / "refs(unc).p").read_bytes())
    assert total == len(refs)
    with pytest.raises(ValueError, match="splits present"):
        load_dataset("refcoco", world / "refer", "test")


def test_world_pool(world):
    pool = load_dataset("webdataset", world / "pool", "train")
    samples = list(pool)
    assert len(samples) == 10 and pool.stats["corrupt"] == 0
    s = samples[0]
    assert s.key == "00000000" and s.shard == "pool-000000.tar" and s.caption
    assert s.image.size == (s.metadata["width"], s.metadata["height"]) and s.metadata["concepts"]


# ---------------------------------------------------------------- hand-made trees in the real layouts
def test_imagefolder_and_imagenet_real_layout(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        for k in range(2):
            jpg(tmp_path / "val" / wnid / f"ILSVRC2012_val_{k}_{wnid}.JPEG")
    ds = load_dataset("imagefolder", tmp_path, "val")
    assert ds.classes == ["n01440764", "n01443537"] and ds.templates is None and ds.targets == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="expected 1000 class folders"):
        load_dataset("imagenet", tmp_path, "val")
    (tmp_path / "names.txt").write_text("tench\ngoldfish\n")
    inet = load_dataset("imagenet", tmp_path, "val", classnames=tmp_path / "names.txt")
    assert inet.classes == ["tench", "goldfish"] and len(inet.templates) == 80
    assert all("{}" in t for t in inet.templates)
    with pytest.raises(DatasetLayoutError, match="split folder 'train' not found"):
        load_dataset("imagefolder", tmp_path, "train")


def test_cub200_real_layout(tmp_path):
    base = tmp_path / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    rows = [(1, "001.Black_footed_Albatross/a.jpg", 1, 1), (2, "001.Black_footed_Albatross/b.jpg", 1, 0),
            (3, "002.Laysan_Albatross/c.jpg", 2, 0), (4, "002.Laysan_Albatross/d.jpg", 2, 1)]
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    for _, p, _, _ in rows:
        jpg(base / "images" / p)
    test = load_dataset("cub200", tmp_path, "test")
    assert test.classes == ["black footed albatross", "laysan albatross"]
    assert [p.name for p in test.image_paths] == ["b.jpg", "c.jpg"] and test.targets == [0, 1]
    assert load_dataset("cub200", base, "train").targets == [0, 1] and test.templates


def test_food101_real_layout(tmp_path):
    base = tmp_path / "food-101"
    (base / "meta").mkdir(parents=True)
    meta = {"apple_pie": ["apple_pie/101", "apple_pie/102"], "baby_back_ribs": ["baby_back_ribs/201"]}
    (base / "meta" / "test.json").write_text(json.dumps(meta))
    for cls, ids in meta.items():
        for i in ids:
            jpg(base / "images" / f"{i}.jpg")
    ds = load_dataset("food101", tmp_path, "test")
    assert ds.classes == ["apple pie", "baby back ribs"] and ds.targets == [0, 0, 1]
    assert ds[2][0].mode == "RGB" and "a photo of {}, a type of food." in ds.templates


def test_dtd_real_layout(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    lines = ["banded/banded_0002.jpg", "zigzagged/zigzagged_0001.jpg", "banded/banded_0004.jpg"]
    (data / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        jpg(data / "images" / line)
    ds = load_dataset("dtd", tmp_path, "test")
    assert ds.classes == ["banded", "zigzagged"] and ds.targets == [0, 1, 0]
    with pytest.raises(DatasetLayoutError, match="robots.ox.ac.uk"):
        load_dataset("dtd", tmp_path, "train")


def test_fgvc_aircraft_real_layout(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    (data / "images_variant_test.txt").write_text("1025794 707-320\n1340192 F/A-18\n")
    for i in ("1025794", "1340192"):
        jpg(data / "images" / f"{i}.jpg")
    ds = load_dataset("fgvc_aircraft", tmp_path, "test")
    assert ds.classes == ["707-320", "A300B4", "F/A-18"] and ds.targets == [0, 2]


def test_flowers102_real_layout(tmp_path):
    from scipy.io import savemat
    base = tmp_path / "flowers-102"
    labels = np.array([77, 77, 1, 102, 5], dtype=np.uint8)
    base.mkdir()
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 3]]), "valid": np.array([[2]]), "tstid": np.array([[4, 5]])})
    for i in range(1, 6):
        jpg(base / "jpg" / f"image_{i:05d}.jpg")
    test = load_dataset("flowers102", tmp_path, "test")
    assert [p.name for p in test.image_paths] == ["image_00004.jpg", "image_00005.jpg"]
    assert test.targets == [101, 4] and len(test.classes) == 102 and test.classes[0] == "pink primrose"
    assert load_dataset("flowers102", tmp_path, "val").targets == [76]  # one id: scipy squeezes to a scalar


def test_caltech101_real_layout(tmp_path):
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    for cat, n in (("BACKGROUND_Google", 2), ("Faces_easy", 4), ("accordion", 5)):
        for k in range(1, n + 1):
            jpg(cats / cat / f"image_{k:04d}.jpg", mode="L")  # Caltech has greyscale images
    train = load_dataset("caltech101", tmp_path, "train", train_per_class=2)
    test = load_dataset("caltech101", tmp_path, "test", train_per_class=2)
    assert train.classes == ["face (easy)", "accordion"]
    assert len(train) == 4 and len(test) == 5 and not set(train.image_paths) & set(test.image_paths)
    assert test[0][0].mode == "RGB"


def test_karpathy_coco_and_flickr_real_layout(tmp_path):
    coco = tmp_path / "coco"
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": s, "cocoid": i,
               "sentences": [{"raw": f"caption {i} {k}", "tokens": []} for k in range(5 + (i == 3))]}
              for i, s in ((1, "test"), (2, "train"), (3, "test"))]
    coco.mkdir()
    (coco / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for img in images:
        jpg(coco / "val2014" / img["filename"])
    ds = load_dataset("coco_karpathy", coco, "test")
    assert len(ds) == 2 and [len(c) for c in ds.captions] == [5, 6] and ds.captions[1][0] == "caption 3 0"
    flickr = tmp_path / "flickr"
    fl_images = [{"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two men. "}]}]
    flickr.mkdir()
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": fl_images}))
    jpg(flickr / "flickr30k-images" / "1000092795.jpg")
    fl = load_dataset("flickr30k_karpathy", flickr, "test")
    assert fl.captions == [["Two men."]] and fl[0].mode == "RGB"
    with pytest.raises(DatasetLayoutError, match="splits present"):
        load_dataset("flickr30k_karpathy", flickr, "val")


def test_ade20k_real_layout_with_objectinfo(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    jpg(base / "images" / "validation" / "ADE_val_00000001.jpg", size=(6, 4))
    label = np.zeros((4, 6), dtype=np.uint8)
    label[0, :3], label[1, :] = 1, 150
    (base / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(label).save(base / "annotations" / "validation" / "ADE_val_00000001.png")
    rows = ["Idx\tRatio\tTrain\tVal\tName", "1\t0.1576\t11664\t1172\twall"] + \
           [f"{i}\t0.001\t10\t1\tthing{i};alias" for i in range(2, 151)]
    (base / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    ds = load_dataset("ade20k", tmp_path, "validation")
    assert len(ds.classes) == 150 and ds.classes[0] == "wall" and ds.classes[1] == "thing2"
    _, lab = ds[0]
    assert lab[0, 0] == 0 and lab[1, 0] == 149 and lab[3, 0] == 255
    ds.verify()
    (base / "annotations" / "validation" / "ADE_val_00000001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UnreadableImageError, match="ADE_val_00000001.png"):
        ds.verify()


def test_cityscapes_real_layout(tmp_path):
    stem = "frankfurt_000000_000294"
    jpg(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", size=(8, 4), fmt="PNG")
    gt = np.full((4, 8), 255, dtype=np.uint8)
    gt[:, :4] = 0
    gt[0, 7] = 18
    (tmp_path / "gtFine" / "val" / "frankfurt").mkdir(parents=True)
    Image.fromarray(gt).save(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png")
    ds = load_dataset("cityscapes", tmp_path, "val")
    assert ds.classes[0] == "road" and ds.classes[18] == "bicycle" and len(ds.classes) == 19
    image, lab = ds[0]
    assert image.size == (8, 4) and lab[0, 0] == 0 and lab[0, 7] == 18 and lab[0, 5] == 255
    (tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DatasetLayoutError, match="createTrainIdLabelImgs"):
        load_dataset("cityscapes", tmp_path, "val")


def _refer_tree(root: Path, dataset: str, split_by: str, refs: list, protocol: int = 2) -> None:
    from pycocotools import mask as mask_utils
    folder = root / dataset
    folder.mkdir(parents=True)
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=protocol)
    m = np.zeros((30, 40), dtype=np.uint8, order="F")
    m[5:15, 10:30] = 1
    rle = mask_utils.encode(m)
    inst = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 5, "image_id": 9, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 10.0], "iscrowd": 0,
                             "segmentation": [[10, 5, 29.9, 5, 29.9, 14.9, 10, 14.9]], "area": 200.0},
                            {"id": 6, "image_id": 9, "category_id": 2, "bbox": [10.0, 5.0, 20.0, 10.0], "iscrowd": 0,
                             "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()}, "area": 200.0}],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bowl"}]}
    (folder / "instances.json").write_text(json.dumps(inst))
    jpg(root / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000009.jpg", size=(40, 30))


def _ref(ref_id, ann_id, split, cat, text):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 9, "split": split, "category_id": cat,
            "file_name": f"COCO_train2014_000000000009_{ann_id}.jpg", "sent_ids": [ref_id],
            "sentences": [{"raw": text.upper(), "sent": text, "tokens": text.split(), "sent_id": ref_id}]}


def test_refcoco_family_real_layout(tmp_path):
    _refer_tree(tmp_path, "refcoco", "unc", [_ref(1, 5, "testA", 1, "man on left"), _ref(2, 6, "testB", 2, "bowl")])
    ds = load_dataset("refcoco", tmp_path, "testA")
    s = ds[0]
    assert s.sentences == ["man on left"] and s.bbox == (10.0, 5.0, 30.0, 15.0) and (s.width, s.height) == (40, 30)
    assert s.image_path.name == "COCO_train2014_000000000009.jpg" and s.image_path.is_file()  # not the _5 name
    assert decode_mask(s.segmentation, 30, 40)[5:15, 10:30].all()
    rle_sample = load_dataset("refcoco", tmp_path, "testB")[0]
    assert decode_mask(rle_sample.segmentation, 30, 40).sum() == 200
    _refer_tree(tmp_path / "g", "refcocog", "umd", [_ref(3, 5, "test", 1, "a man")])
    assert len(load_dataset("refcocog", tmp_path / "g", "test")) == 1
    with pytest.raises(DatasetLayoutError, match=r"refs\(unc\)\.p"):
        load_dataset("refcoco+", tmp_path, "testA")


def test_refer_annotations_are_parsed_once_per_process_until_they_change(tmp_path, monkeypatch):
    """A grounding run reads its train split and every eval split from one refs file and instances.json:
    parsed once while the files are the same, parsed again once either changes."""
    import distill.data.refer as refer
    reads = []
    real = refer.safe_load
    monkeypatch.setattr(refer, "safe_load", lambda path: reads.append(path) or real(path))
    refer._read_annotations.cache_clear()
    _refer_tree(tmp_path, "refcoco", "unc", [_ref(1, 5, "testA", 1, "man on left"), _ref(2, 6, "testB", 2, "bowl")])
    assert load_dataset("refcoco", tmp_path, "testA")[0].sentences == ["man on left"]
    assert load_dataset("refcoco", tmp_path, "testB")[0].sentences == ["bowl"]
    assert len(reads) == 1
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump([_ref(1, 5, "testA", 1, "the man on the left")], f, protocol=2)
    assert load_dataset("refcoco", tmp_path, "testA")[0].sentences == ["the man on the left"]
    assert len(reads) == 2


def test_refer_refuses_malicious_pickle(tmp_path):
    import os
    from distill.data import UnsafePickleError

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    _refer_tree(tmp_path, "refcoco", "unc", [Evil()])
    with pytest.raises(UnsafePickleError, match="only plain data"):
        load_dataset("refcoco", tmp_path, "val")


def _shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    import io
    with tarfile.open(path, "w") as tar:
        for key, blob in samples:
            for ext, data in (("jpg", blob), ("txt", f"caption {key}".encode()), ("json", b'{"concepts": [1]}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_skips_and_counts_corrupt_images(tmp_path):
    import io
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buf, "JPEG")
    good = buf.getvalue()
    (tmp_path / "shards").mkdir()
    _shard(tmp_path / "shards" / "a-000000.tar", [("k0", good), ("k1", b"not an image"), ("k2", good[:40])])
    _shard(tmp_path / "shards" / "a-000001.tar", [("k3", good)])
    pool = load_dataset("webdataset", tmp_path, "train")
    keys = [s.key for s in pool]
    assert keys == ["k0", "k3"]
    assert pool.stats["corrupt"] == 2 and pool.stats["seen"] == 4 and "2 corrupt skipped" in pool.report()
    assert pool.stats["corrupt_keys"][0].startswith("k1")
    brace = str(tmp_path / "shards" / "a-{000000..000001}.tar")
    assert len(list(load_dataset("webdataset", brace, "train"))) == 2
    with pytest.raises(DatasetLayoutError, match="no .tar shards"):
        load_dataset("webdataset", tmp_path / "nowhere", "train")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["imagefolder", "food101", "dtd", "fgvc_aircraft", "flowers102", "caltech101",
                                  "cub200", "coco_karpathy", "ade20k", "cityscapes", "refcoco"])
def test_missing_root_names_layout_and_source(tmp_path, name):
    with pytest.raises(DatasetLayoutError) as err:
        load_dataset(name, tmp_path / "missing", "test" if name != "ade20k" else "validation")
    text = str(err.value)
    assert "Expected layout" in text and "Where to get it" in text and str(tmp_path / "missing") in text


def test_unreadable_eval_images_are_listed(tmp_path):
    for cls in ("a", "b"):
        jpg(tmp_path / "val" / cls / "ok.jpg")
    (tmp_path / "val" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "val" / "b" / "empty.jpg").write_bytes(b"")
    ds = load_dataset("imagefolder", tmp_path, "val")
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        ds[0]
    with pytest.raises(UnreadableImageError) as err:
        ds.verify()
    assert "2 unreadable" in str(err.value) and "empty.jpg" in str(err.value)
    assert ds[1][1] == 0  # good files still read


def test_missing_listed_files_fail_at_construction(tmp_path):
    base = tmp_path / "food-101"
    (base / "meta").mkdir(parents=True)
    (base / "images").mkdir()
    (base / "meta" / "test.json").write_text(json.dumps({"pho": ["pho/1", "pho/2"]}))
    jpg(base / "images" / "pho" / "1.jpg")
    with pytest.raises(UnreadableImageError, match=r"file missing[\s\S]*pho/2.jpg"):
        load_dataset("food101", tmp_path, "test")


def test_sample_keys_follow_webdatasets_rule():
    """The trainer, curation and the webdataset reader must group members into the same samples:
    the key ends at the first dot of the file name (the trainer used the last dot)."""
    from webdataset.tariterators import base_plus_ext

    from distill.data.pool import sample_key

    for name in ("000123.jpg", "dir/000123.seg.png", "a.b/c.d.jpg", "shard-1/x.y.z.json"):
        assert sample_key(name) == base_plus_ext(name)[0]
