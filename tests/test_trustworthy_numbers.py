"""The harness never reports a wrong number silently: each case below once printed a wrong number
with status ok (or a bare traceback) and now gives the right number or a one-line refusal.

The data are real files in the standard layouts (ImageFolder, Karpathy JSON, ADE20K), built from
scikit-learn's handwritten digits, not the mini-world; the numbers are checked against computations
that do not go through the harness (scikit-learn kNN, a hand count of retrieval hits).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.cache import FeatureCache
from benchmarks.leaderboard import LIMITED_MARK, SETTINGS_MARK, build, suite_table
from distill.results import Cell, load_results, result_path
from benchmarks.suites import load_suite
from benchmarks.sweep import Harness, run_sweep
from distill.data import AnnotationError, load_dataset
from distill.features import Features

from test_harness_fakes import FakeEncoder

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 6


def _digit_png(pixels: np.ndarray, path: Path) -> None:
    """An 8x8 digit (0..16) as a 32x32 RGB PNG (nearest upscaling keeps the strokes sharp)."""
    arr = (255 - pixels * 15).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).resize((32, 32), Image.NEAREST).convert("RGB").save(path)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """ImageFolder (train/val, classnames.txt, templates.txt), a Karpathy JSON with two captions per
    image, and an ADE20K tree whose labels are the digit strokes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    count = {s: [0] * 10 for s in ("train", "val")}
    karpathy = []
    ade = root / "ade" / "ADEChallengeData2016"
    for i, (img, y) in enumerate(zip(digits.images, digits.target)):
        split = "train" if count["train"][y] < TRAIN_PER_CLASS else "val" if count["val"][y] < VAL_PER_CLASS else None
        if split is None:
            continue
        n = count[split][y]
        count[split][y] += 1
        folder = root / "folder" / split / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"img_{n:03d}.png"   # the same names in every class folder: a swap by mv keeps every path
        _digit_png(img, folder / name)
        if split == "val":
            (root / "karpathy" / "images").mkdir(parents=True, exist_ok=True)
            _digit_png(img, root / "karpathy" / "images" / f"{i}.png")
            karpathy.append({"filename": f"{i}.png", "split": "test",
                             "sentences": [{"raw": f"a handwritten {WORDS[y]}, sample {i}"},
                                           {"raw": f"the digit {WORDS[y]} written by hand ({i})"}]})
        sub = "training" if split == "train" else "validation"
        for kind in ("images", "annotations"):
            (ade / kind / sub).mkdir(parents=True, exist_ok=True)
        _digit_png(img, ade / "images" / sub / f"{y}_{n}.png")
        label = np.where(img > 6, y + 1, 0).astype(np.uint8)      # 0 = background (ignored), 1..10 = digits
        Image.fromarray(label).resize((32, 32), Image.NEAREST).save(ade / "annotations" / sub / f"{y}_{n}.png")
    (root / "folder" / "classnames.txt").write_text("\n".join(WORDS) + "\n")
    (root / "folder" / "templates.txt").write_text("a photo of the digit {}.\n")
    (root / "karpathy" / "dataset.json").write_text(json.dumps({"images": karpathy}))
    (ade / "classes.txt").write_text("\n".join(WORDS) + "\n")
    return root


class PixelEncoder(FakeEncoder):
    """Image summary: the centred 8x8 grey-level thumbnail (64 numbers); patches: each 8x8 patch's
    pixels. Text: the mean thumbnail of the training images of the digit the text names, plus a
    small deterministic jitter from the text itself (so no two captions tie)."""

    patch_size = 8

    def __init__(self, prototypes: dict[str, torch.Tensor]):
        super().__init__(name="pixels")
        self.heads = ("pix",)
        self.text_heads = ("pix",)
        self.prototypes = prototypes

    def fingerprint(self):
        return "pixels-v1"

    def encode(self, images):
        batch = torch.stack(list(images)).mean(1, keepdim=True)            # (N, 1, 32, 32) grey
        summary = F.avg_pool2d(batch, 4).flatten(1) - 0.5                    # (N, 64)
        patches = F.unfold(batch, 8, stride=8).transpose(1, 2)               # (N, 16, 64)
        return Features(summary={"pix": summary}, patches={"pix": list(patches)}, grids=[(4, 4)] * len(batch))

    def encode_text(self, texts, head):
        out = []
        for t in texts:
            word = next(w for w in WORDS if w in t.split() or f"{w}," in t.split() or f"{w}." in t.split())
            g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
            out.append(self.prototypes[word] + 0.05 * torch.randn(64, generator=g))
        return torch.stack(out)


def pixel_encoder(root: Path) -> PixelEncoder:
    enc = PixelEncoder({})
    for y, word in enumerate(WORDS):
        files = sorted((root / "folder" / "train" / str(y)).glob("*.png"))
        x = [enc.preprocess(Image.open(f)) for f in files]
        enc.prototypes[word] = enc.encode(x).summary["pix"].mean(0)
    return enc


def suite_file(root: Path, tmp_path: Path) -> Path:
    suite = {"name": "digits", "datasets": [
        {"id": "digits", "reader": "imagefolder", "root": str(root / "folder"),
         "roles": {"train": "train", "test": "val"}, "tasks": ["knn", "zeroshot"]},
        {"id": "digit-captions", "reader": "karpathy", "root": str(root / "karpathy"),
         "roles": {"test": "test"}, "tasks": ["retrieval"]},
        {"id": "digit-strokes", "reader": "ade20k", "root": str(root / "ade"),
         "roles": {"train": "training", "test": "validation"}, "tasks": ["segmentation"]}],
        "leaderboard": {"head_preference": ["pix"], "columns": {"knn": ["top1"], "zeroshot": ["top1"],
                                                                "retrieval": ["t2i_r1"], "segmentation": ["miou"]},
                        "families": [{"name": "cls avg", "task": "knn", "metric": "top1",
                                      "datasets": ["digits"]}]}}
    path = tmp_path / "digits-suite.json"
    path.write_text(json.dumps(suite))
    return path


def harness(tmp_path: Path, encoder, out: str = "results", cache: str = "cache", **kw) -> Harness:
    return Harness(out_dir=tmp_path / out, cache=FeatureCache(tmp_path / cache), show_progress=False,
                   encoder_loader=lambda spec, device="cpu": encoder, **kw)


def sweep(tmp_path, encoder, tasks, **kw):
    cfg = {"suite": str(suite_file(kw.pop("root"), tmp_path)), "models": ["pixels"], "tasks": tasks}
    if "datasets" in kw:
        cfg["datasets"] = kw.pop("datasets")
    force = kw.pop("force", False)
    h = harness(tmp_path, encoder, **kw)
    summary = run_sweep(cfg, h, force=force)
    return h, summary, {(r["cell"]["task"], r["cell"]["dataset"]): r for r in load_results(h.out_dir)
                        if r["cell"]["limit"] == h.limit}


def knn_top1(h: Harness, task_cfg=None) -> float:
    recs = [r for r in load_results(h.out_dir) if r["cell"]["task"] == "knn" and r["cell"]["limit"] == h.limit]
    recs = [r for r in recs if task_cfg is None or r["config"]["task_cfg"]["k"] == task_cfg]
    assert len(recs) == 1 and recs[0]["status"] == "ok", [r.get("reason") for r in recs]
    return recs[0]["metrics"]["pix/top1"]


# ---------------------------------------------------------------- independent computations

def direct_features(enc: PixelEncoder, paths) -> np.ndarray:
    return enc.encode([enc.preprocess(Image.open(p)) for p in paths]).summary["pix"].double().numpy()


def test_every_task_on_real_format_data_matches_an_independent_computation(digits_root, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    enc = pixel_encoder(digits_root)
    h, summary, recs = sweep(tmp_path, enc, ["knn", "zeroshot", "retrieval", "segmentation"], root=digits_root,
                             task_cfg={"knn": {"k": [5]}})
    assert summary.failed == 0 and summary.ok == 4, summary.failures

    # kNN: scikit-learn's brute-force cosine kNN with the task's weights exp(sim / 0.07)
    tr = load_dataset("imagefolder", digits_root / "folder", "train")
    te = load_dataset("imagefolder", digits_root / "folder", "val")
    xtr, xte = direct_features(enc, tr.image_paths), direct_features(enc, te.image_paths)
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / 0.07)).fit(xtr, tr.targets)
    expected = 100 * float(np.mean(knn.predict(xte) == np.array(te.targets)))
    assert recs[("knn", "digits")]["metrics"]["pix/top1"] == pytest.approx(expected, abs=1e-4)
    assert 40 < expected < 100   # a real, non-trivial number

    # zero-shot: one template, prototypes by hand
    protos = torch.stack([enc.encode_text([f"a photo of the digit {w}."], "pix")[0] for w in WORDS]).double().numpy()
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    pred = (xte / np.linalg.norm(xte, axis=1, keepdims=True) @ protos.T).argmax(1)
    assert recs[("zeroshot", "digits")]["metrics"]["pix/top1"] == pytest.approx(
        100 * float(np.mean(pred == np.array(te.targets))), abs=1e-4)

    # retrieval: a hand count of R@1 hits in both directions
    ds = load_dataset("karpathy", digits_root / "karpathy", "test")
    img = direct_features(enc, ds.image_paths)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    caps = [c for cs in ds.captions for c in cs]
    owner = np.array([i for i, cs in enumerate(ds.captions) for _ in cs])
    txt = enc.encode_text(caps, "pix").double().numpy()
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    sim = img @ txt.T
    t2i = sum(int(sim[:, j].argmax() == owner[j]) for j in range(len(caps))) / len(caps)
    i2t = sum(int(owner[sim[i].argmax()] == i) for i in range(len(img))) / len(img)
    m = recs[("retrieval", "digit-captions")]["metrics"]
    assert m["pix/t2i_r1"] == pytest.approx(100 * t2i, abs=1e-4)
    assert m["pix/i2t_r1"] == pytest.approx(100 * i2t, abs=1e-4)

    seg = recs[("segmentation", "digit-strokes")]["metrics"]
    assert 0 < seg["pix/miou"] <= 100


# ---------------------------------------------------------------- stale feature cache

def test_images_swapped_in_place_are_not_served_from_the_cache(digits_root, tmp_path):
    """Reproduced: the images of two train class folders swapped by `mv` (same file names, mtimes
    kept); a --force re-run reported the old kNN score from the cache. Now it equals a fresh cache's."""
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    enc = pixel_encoder(digits_root)
    h, _, _ = sweep(tmp_path, enc, ["knn"], root=root, datasets=["digits"])
    before = knn_top1(h)
    a, b, tmp = root / "folder" / "train" / "0", root / "folder" / "train" / "1", root / "folder" / "train" / "x"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    h, _, _ = sweep(tmp_path, enc, ["knn"], root=root, datasets=["digits"], force=True)
    after = knn_top1(h)
    h_fresh, _, _ = sweep(tmp_path, enc, ["knn"], root=root, datasets=["digits"], out="fresh", cache="fresh-cache")
    assert after == knn_top1(h_fresh) and after < before - 5   # zeros and ones now carry each other's labels


def test_deleted_images_give_a_new_entry_not_a_size_mismatch(digits_root, tmp_path):
    """Reproduced: ten images deleted after a run -> `RuntimeError: The size of tensor a (500) must
    match the size of tensor b (490)` on the re-run. Now the cell runs on what is there."""
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    enc = pixel_encoder(digits_root)
    sweep(tmp_path, enc, ["knn"], root=root, datasets=["digits"])
    for p in sorted((root / "folder" / "train" / "3").glob("*.png"))[:4]:
        p.unlink()
    h, summary, recs = sweep(tmp_path, enc, ["knn"], root=root, datasets=["digits"], force=True)
    rec = recs[("knn", "digits")]
    assert summary.failed == 0 and rec["dataset"]["sizes"]["train"] == 10 * TRAIN_PER_CLASS - 4


def test_force_recomputes_features(digits_root, tmp_path):
    enc = pixel_encoder(digits_root)
    h, _, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"])
    h2, _, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"], force=True)
    assert (h2.cache.stats.hits, h2.cache.stats.misses) == (0, 2)


def test_an_unwritable_cache_is_bypassed(digits_root, tmp_path):
    """Reproduced: a feature cache that cannot be written failed every cell, though the cache is only
    an optimisation. (A cache root that is a file cannot be written by anyone, root included.)"""
    enc = pixel_encoder(digits_root)
    (tmp_path / "not-a-folder").write_text("")
    with pytest.warns(UserWarning, match="cannot be written"):
        h, summary, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"], cache="not-a-folder")
    assert summary.ok == 1


# ---------------------------------------------------------------- label spaces

def test_a_split_missing_a_class_folder_is_refused_not_scored(digits_root, tmp_path):
    """Reproduced: a val split without one class folder (no classnames.txt) scored kNN 8.67 instead of
    ~90 with status ok: every label after the gap shifted by one. Now the cell fails, naming the split
    and the class."""
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    (root / "folder" / "classnames.txt").unlink()
    shutil.rmtree(root / "folder" / "val" / "4")
    enc = pixel_encoder(digits_root)
    h, summary, recs = sweep(tmp_path, enc, ["knn", "zeroshot"], root=root, datasets=["digits"])
    assert summary.failed == 2 and summary.ok == 0
    reason = recs[("knn", "digits")]["reason"]
    assert reason.startswith("LabelSpaceError") and "'val'" in reason and "'4'" in reason and "\n" not in reason


# ---------------------------------------------------------------- --limit

def test_limit_is_stratified_and_a_limited_run_is_its_own_cell(digits_root, tmp_path):
    """Reproduced: `--limit 12` took the first 12 items of each sorted split: a kNN bank of one class
    (the digit zero), and a later full run into the same folder skipped the cell as done."""
    enc = pixel_encoder(digits_root)
    h, _, recs = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"], limit=20)
    rec = recs[("knn", "digits")]
    assert rec["cell"]["limit"] == 20 and rec["config"]["limit_rule"] == {"train": "stratified", "test": "stratified"}
    assert rec["metrics"]["pix/top1"] > 30          # ten classes in the bank, two each
    h_full, summary, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"])
    assert summary.already_done == 0 and summary.ok == 1
    assert len(list(h.out_dir.glob("*.json"))) == 2
    limited = result_path(h.out_dir, h.identify(Cell("pixels", "knn", "digits")))
    assert "limit20" in limited.name and limited.is_file()


def test_limited_cells_are_marked_and_a_full_run_takes_precedence(digits_root, tmp_path):
    enc = pixel_encoder(digits_root)
    suite = load_suite(str(suite_file(digits_root, tmp_path)))
    # one spec, a limited and a full run in one folder: one row, the full run's number, no mark
    h_lim, _, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"], limit=20)
    h_full, _, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"])
    table, _, marks, _ = suite_table(load_results(tmp_path / "results"), suite)
    assert len(table) == 1 and table.loc[0, "kNN digits top1"] == knn_top1(h_full) != knn_top1(h_lim)
    assert not marks
    # two specs, one limited: its cell carries the mark in the Markdown and LaTeX tables, with a note
    cfg = {"suite": str(suite_file(digits_root, tmp_path)), "tasks": ["knn"], "datasets": ["digits"]}
    run_sweep({**cfg, "models": ["limited-model"]}, harness(tmp_path, enc, out="mixed", limit=20))
    run_sweep({**cfg, "models": ["full-model"]}, harness(tmp_path, enc, out="mixed"))
    _, _, marks, _ = suite_table(load_results(tmp_path / "mixed"), suite)
    assert marks[("limited-model", "native", "kNN digits top1")][0][0] == LIMITED_MARK
    assert ("full-model", "native", "kNN digits top1") not in marks
    build(tmp_path / "mixed", tmp_path / "lb", reported_csv=None)
    md, tex = (tmp_path / "lb" / "digits.md").read_text(), (tmp_path / "lb" / "digits.tex").read_text()
    assert LIMITED_MARK in md and "limited to 20 items per split" in md and r"\textsuperscript{L}" in tex
    assert "limited to 20" in (tmp_path / "lb" / "digits.csv").read_text()


def test_a_family_average_over_limited_and_full_cells_is_refused_unless_asked(digits_root, tmp_path):
    enc = pixel_encoder(digits_root)
    suite_path = suite_file(digits_root, tmp_path)
    suite = json.loads(suite_path.read_text())
    suite["datasets"].append({**suite["datasets"][0], "id": "digits-again"})
    suite["leaderboard"]["families"][0]["datasets"] = ["digits", "digits-again"]
    suite_path.write_text(json.dumps(suite))
    base = {"suite": str(suite_path), "models": ["m"], "tasks": ["knn"]}
    run_sweep({**base, "datasets": ["digits"]}, harness(tmp_path, enc))
    run_sweep({**base, "datasets": ["digits-again"]}, harness(tmp_path, enc, limit=20))
    records = load_results(tmp_path / "results")
    table, _, marks, _ = suite_table(records, load_suite(str(suite_path)))
    assert np.isnan(table.loc[0, "cls avg"]) and "not averaged" in marks[("m", "native", "cls avg")][0][1]
    table, _, marks, _ = suite_table(records, load_suite(str(suite_path)), allow_limited=True)
    assert not np.isnan(table.loc[0, "cls avg"]) and marks[("m", "native", "cls avg")][0][0] == LIMITED_MARK


# ---------------------------------------------------------------- settings in the identity

def test_a_changed_task_config_is_a_new_cell_and_the_column_says_so(digits_root, tmp_path):
    """Reproduced: a cell done with k=[20] was kept when the sweep asked for k=[10, 20]; the
    leaderboard then mixed both settings in one column without a word."""
    enc = pixel_encoder(digits_root)
    h, _, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"], task_cfg={"knn": {"k": [20]}})
    h, summary, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"],
                          task_cfg={"knn": {"k": [10, 20]}})
    assert summary.already_done == 0 and summary.ok == 1
    (wider,) = [r for r in load_results(h.out_dir) if r["config"]["task_cfg"]["k"] == [10, 20]]
    assert "pix/top1@k10" in wider["metrics"]
    # two models, two settings, one column -> a marker naming the differing key
    cfg = {"suite": str(suite_file(digits_root, tmp_path)), "tasks": ["knn"], "datasets": ["digits"]}
    run_sweep({**cfg, "models": ["m1"]}, harness(tmp_path, enc, out="two"))
    run_sweep({**cfg, "models": ["m2"]}, harness(tmp_path, enc, out="two"))
    run_sweep({**cfg, "models": ["m3"]}, harness(tmp_path, enc, out="two", task_cfg={"knn": {"k": [5]}}))
    _, _, marks, _ = suite_table(load_results(tmp_path / "two"), load_suite(cfg["suite"]))
    (mark, note), = marks[("m3", "native", "kNN digits top1")]
    assert mark == SETTINGS_MARK and "k=[5] (others: [20])" in note
    assert ("m1", "native", "kNN digits top1") not in marks


# ---------------------------------------------------------------- malformed annotations

def test_malformed_karpathy_captions_name_the_file_and_the_image(digits_root, tmp_path):
    """Reproduced: a Karpathy JSON without `sentences` (or a sentence without `raw`) gave a bare
    `KeyError: 'sentences'` naming no file or image."""
    root = tmp_path / "k"
    shutil.copytree(digits_root / "karpathy", root)
    data = json.loads((root / "dataset.json").read_text())
    del data["images"][3]["sentences"]
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"dataset\.json: images\[3\] \(.*\.png\): no 'sentences' list"):
        load_dataset("karpathy", root, "test")
    data["images"][3]["sentences"] = [{"tokens": ["a"]}]
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"images\[3\] .* sentences\[0\]: no 'raw' caption text"):
        load_dataset("karpathy", root, "test")


# ---------------------------------------------------------------- a baseline that is a baseline

def test_the_random_init_baseline_has_features_that_vary(tmp_path):
    """Reproduced: the random-init student gave exactly the same summary vector for every image (std 0):
    the release init zeroes every residual output projection, so CLS never sees the image."""
    from distill.encoders.registry import load_encoder
    from distill.encoders.student import export_random_student

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    baseline = load_encoder(f"student:{export_random_student(tmp_path / 'b', config='tiny-moe')}")
    feats = baseline.encode([baseline.preprocess(im) for im in images])
    for head, v in feats.summary.items():
        assert v.std(0).mean() > 1e-3, f"head {head} is constant across images"
    release = load_encoder(f"student:{export_random_student(tmp_path / 'r', config='tiny-moe', init='release')}")
    assert release.encode([release.preprocess(im) for im in images]).summary["siglino"].std(0).max() < 1e-5


# ---------------------------------------------------------------- result files the leaderboard cannot read

def test_an_unreadable_result_file_is_named_and_left_out(digits_root, tmp_path):
    enc = pixel_encoder(digits_root)
    h, _, _ = sweep(tmp_path, enc, ["knn"], root=digits_root, datasets=["digits"])
    (h.out_dir / "zz-truncated.json").write_text('{"schema_version": 2, "status": "ok", "cel')
    with pytest.warns(UserWarning, match="zz-truncated.json"):
        out = build(h.out_dir, tmp_path / "lb", reported_csv=None)
    assert out["cells"] == 1 and any("zz-truncated.json" in p for p in out["unreadable"])
    assert "zz-truncated.json" in (tmp_path / "lb" / "leaderboard.md").read_text()


def test_a_sweep_side_by_side_gives_the_numbers_of_one_process(digits_root, tmp_path):
    """`workers=2` runs the models in two spawned processes of one thread each (a model's cells in one
    of them): the same result files, with the same numbers, as one process on one thread."""
    from benchmarks.sweep import harness_from_config

    cfg = {"suite": str(suite_file(digits_root, tmp_path)), "models": ["pixels:8", "pixels:12", "pixels:16"],
           "tasks": ["knn", "segmentation"], "bootstrap": False}

    def run(out: str, workers: int) -> dict:
        h = harness_from_config(cfg, out=tmp_path / out, cache_dir=tmp_path / f"cache-{out}", show_progress=False)
        summary = run_sweep(cfg, h, workers=workers)
        assert summary.total == summary.ok == 6 and summary.failed == 0
        return {(r["cell"]["model"], r["cell"]["task"]): r["metrics"] for r in load_results(h.out_dir)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run("one", 1)
    finally:
        torch.set_num_threads(threads)
    side = run("two", 2)
    assert side.keys() == alone.keys() and len(side) == 6
    for cell, metrics in alone.items():
        assert side[cell] == pytest.approx(metrics, rel=1e-6, abs=1e-9), cell
