"""The four tasks end to end through the real HarnessContext: a generated mini-world read by the real
readers, the sweep machinery with the real task registry, and an encoder whose answers are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.cache import FeatureCache
from benchmarks.context import HarnessContext
from benchmarks.leaderboard import pick_metric
from distill.results import read_result, result_path
from benchmarks.suites import dataset_entry, load_suite
from benchmarks.sweep import Harness, run_sweep
from benchmarks.tasks import TaskConfigError, get_task
from benchmarks.world import make_world
from distill.encoders.base import MissingHeadError
from distill.features import Features

from test_harness_fakes import COLOURS, FakeEncoder, fake_dataset_loader, fake_encoder_loader

WORLD = {
    "classification": {"shapes": 4, "colours": 2, "image_size": 64, "train_max_per_class": 10,
                       "train_min_per_class": 3, "zipf_alpha": 1.0, "val_per_class": 3, "distractor_prob": 0.3},
    "retrieval": {"images": 10, "image_size": 64, "max_objects": 2},
    "segmentation": {"train": 10, "val": 4, "image_size": 64, "min_objects": 2, "max_objects": 3},
    "refer": {"images": 8, "min_side": 96, "max_side": 128, "min_objects": 3, "max_objects": 4,
              "split_fractions": {"train": 0.5, "val": 0.25, "testA": 0.125, "testB": 0.125}},
    "pool": {"images": 8, "per_shard": 8, "min_side": 96, "max_side": 128, "zipf_alpha": 1.1, "max_objects": 2},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("task-world") / "w"
    make_world(out, size=WORLD, seed=0, workers=1, progress=False)
    return out


class ColourEncoder(FakeEncoder):
    """Image summary = mean RGB (centred); text = the RGB of the colour the prompt names.

    On the fake colours dataset zero-shot and kNN must therefore be perfect, for each head and the
    ensemble; head "b" is a scaled copy so two text heads exist."""

    def __init__(self):
        super().__init__(name="colour")
        self.text_heads = ("a", "b")

    def encode(self, images):
        batch = torch.stack(list(images))
        rgb = batch.mean(dim=(2, 3)) - 0.5
        return Features(summary={"a": rgb, "b": 2 * rgb})

    def encode_text(self, texts, head):
        self.require_head(head, text=True)
        names = ["red", "green", "blue", "yellow"]
        rows = []
        for t in texts:
            colour = next(c for n, c in zip(names, COLOURS) if n in t)
            rows.append(torch.tensor(colour, dtype=torch.float32) / 255.0 - 0.5)
        return torch.stack(rows)


def _ctx(tmp_path, encoder, ds_cfg=None, loader=fake_dataset_loader):
    ds_cfg = ds_cfg or {"id": "colours", "reader": "fakecls", "root": str(tmp_path / "data"),
                        "roles": {"train": "train", "test": "val"}}
    return HarnessContext(encoder, ds_cfg, cache=FeatureCache(tmp_path / "cache"), batch_size=8,
                          show_progress=False, load_dataset=loader)


def test_zeroshot_and_knn_are_perfect_where_the_answer_is_known(tmp_path):
    ctx = _ctx(tmp_path, ColourEncoder())
    zs = get_task("zeroshot").run(ctx, {})
    for head in ("a", "b", "ensemble"):
        assert zs[f"{head}/top1"] == 100.0 and zs[f"{head}/mean_per_class_recall"] == 100.0
        assert math.isnan(zs[f"{head}/top5"])                      # 4 classes: no top-5
    knn = get_task("knn").run(ctx, {"k": [3, 5]})
    assert knn["a/top1"] == knn["a/top1@k3"] == knn["b/top1@k5"] == 100.0
    with pytest.raises(MissingHeadError, match="no text tower 'z'"):
        get_task("zeroshot").run(ctx, {"heads": ["z"]})
    with pytest.raises(TaskConfigError, match=r"unknown key 'kk' in the knn task config \(did you mean 'k'\?\)"):
        get_task("knn").run(ctx, {"kk": 3})


def test_knn_ensemble_fuses_the_branches_only_where_all_are_run():
    """With both branches run, an 'ensemble' kNN head equal to the entropy-weighted fusion of the two
    heads' votes; one branch alone, an encoder without them (the
    default branches are siglip2 and dinov3: a teacher has one), or [] in the config: none."""
    from benchmarks.tasks.knn import entropy_weighted_votes, knn_topk, knn_vote

    g = torch.Generator().manual_seed(0)
    ytr, yte = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 6, (200,), generator=g)
    centres = torch.randn(6, 8, generator=g)

    def noisy(y, noise):   # class centre plus noise: each head is right on some images
        return centres[y] + noise * torch.randn(len(y), 8, generator=g)

    heads = {"siglip2": (noisy(ytr, 1.5), noisy(yte, 1.5)), "dinov3": (noisy(ytr, 1.5), noisy(yte, 1.5))}
    ctx = _ProbeCtx(None, {h: f[0] for h, f in heads.items()}, ytr, {h: f[1] for h, f in heads.items()}, yte)
    got = get_task("knn").run(ctx, {"k": 10})
    votes = [knn_vote(*knn_topk(F.normalize(heads[h][1], dim=-1), F.normalize(heads[h][0], dim=-1), 10),
                      ytr, 6, 10, 0.07) for h in ("siglip2", "dinov3")]
    fused = entropy_weighted_votes(votes, 5.0).argmax(1)
    assert got["ensemble/top1"] == pytest.approx(100.0 * float((fused == yte).float().mean()))
    assert all((fused != v.argmax(1)).any() for v in votes)    # per image, now one head, now the other
    assert len(ctx.items["ensemble/top1"]) == len(yte)
    for cfg in ({"heads": ["siglip2"]}, {"ensemble_heads": []}, {"ensemble_heads": ["siglip2", "radio"]}):
        assert not any(k.startswith("ensemble/") for k in get_task("knn").run(ctx, {"k": 10, **cfg}))
    with pytest.raises(TaskConfigError, match="two heads or more"):
        get_task("knn").run(ctx, {"ensemble_heads": ["siglip2"]})


def test_zeroshot_rejects_classnames_that_do_not_match(tmp_path):
    ctx = _ctx(tmp_path, ColourEncoder())
    with pytest.raises(ValueError, match="2 class names given but the dataset has 4"):
        get_task("zeroshot").run(ctx, {"classnames": ["red", "green"]})


def test_retrieval_ensemble_fuses_the_text_heads_as_zeroshot_does(world, tmp_path):
    """Two text heads: each head's recalls, and the ensemble equals the entropy-weighted fusion of their
    similarity matrices (softmax over each image's captions), ranked both ways."""
    from benchmarks.tasks.retrieval import similarity_metrics
    from benchmarks.tasks.zeroshot import entropy_weighted_logits

    enc = FakeEncoder()
    enc.text_heads = ("a", "b")
    ctx = _ctx(tmp_path, enc, dataset_entry(load_suite("miniworld"), "mw-ret", {"world": str(world)}), loader=None)
    got = get_task("retrieval").run(ctx, {})
    ds, feats = ctx.dataset("test"), ctx.features("test")
    texts = [t for caps in ds.captions for t in caps]
    owner = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps])
    sims = [F.normalize(feats.summary[h], dim=-1) @ F.normalize(enc.encode_text(texts, h), dim=-1).T
            for h in ("a", "b")]
    want = similarity_metrics(entropy_weighted_logits(sims, 5.0), owner)
    assert {k: got[f"ensemble/{k}"] for k in want} == pytest.approx(want)
    assert get_task("retrieval").run(ctx, {"ensemble": False}).keys() == {k for k in got if not k.startswith("ens")}


def test_every_task_on_the_mini_world_through_the_real_readers(world, tmp_path):
    suite = load_suite("miniworld")
    results = {}
    for ds_id, task in (("mw-cls", "zeroshot"), ("mw-cls", "knn"), ("mw-cls", "linear"), ("mw-ret", "retrieval"),
                        ("mw-seg", "segmentation")):
        entry = dataset_entry(suite, ds_id, {"world": str(world)})
        ctx = _ctx(tmp_path, FakeEncoder(), entry, loader=None)
        results[task] = get_task(task).run(ctx, (entry.get("task_cfg") or {}).get(task, {}))
    assert set(results["zeroshot"]) == {"a/top1", "a/top5", "a/mean_per_class_recall"}
    assert {"a/top1", "b/top1", "a/top5", "b/top5", "a/top1@k20"} <= set(results["knn"])
    assert set(results["linear"]) == {f"{h}/{m}" for h in ("a", "b")   # the suite asks for colour and shape
                                      for m in ("top1", "top5", "top1_colour", "top1_shape")}
    assert set(results["retrieval"]) == {f"a/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(results["segmentation"]) == {f"{h}/{m}" for h in ("a", "b") for m in ("miou", "aacc", "macc")}
    for metrics in results.values():
        assert all(math.isnan(v) or 0.0 <= v <= 100.0 for v in metrics.values())
    # a probe trained on the same cached features with the same seed gives the same numbers
    ctx = _ctx(tmp_path, FakeEncoder(), dataset_entry(suite, "mw-seg", {"world": str(world)}), loader=None)
    assert get_task("segmentation").run(ctx, {"preset": "miniworld"}) == results["segmentation"]


def test_sweep_with_the_real_task_registry_feeds_the_leaderboard(world, tmp_path):
    h = Harness(out_dir=tmp_path / "results", cache=FeatureCache(tmp_path / "cache"), batch_size=8,
                variables={"world": str(world)}, show_progress=False, encoder_loader=fake_encoder_loader,
                task_cfg={"knn": {"k": 5}, "segmentation": {"epochs": 2}})
    cfg = {"suite": "miniworld", "models": ["fake:1"],
           "tasks": ["zeroshot", "knn", "retrieval", "segmentation"], "vars": {"world": str(world)}}
    summary = run_sweep(cfg, h)
    assert summary.failed == 0, summary
    suite = load_suite("miniworld")
    columns = suite["leaderboard"]["columns"]
    prefs = suite["leaderboard"]["head_preference"]
    files = sorted((tmp_path / "results").glob("*.json"))
    assert len(files) == 4
    for f in files:
        rec = json.loads(f.read_text())
        assert rec["status"] == "ok", rec.get("error")
        task = rec["cell"]["task"]
        assert rec["task"]["version"] == get_task(task).version
        for metric in columns[task]:
            assert pick_metric(rec["metrics"], metric, prefs) is not None, (task, metric, rec["metrics"])
    knn = next(json.loads(f.read_text()) for f in files if "__knn__" in f.name)
    assert knn["config"]["task_cfg"]["k"] == 5 and "a/top1@k5" in knn["metrics"]


class _ProbeCtx:
    """Just what a classification task reads: datasets with targets / classes, cached summary features
    (one head "a", or {head: features} for several)."""

    device = "cpu"

    def __init__(self, classes, train, ytr, test, yte):
        from types import SimpleNamespace
        train, test = (x if isinstance(x, dict) else {"a": x} for x in (train, test))
        self._ds = {"train": SimpleNamespace(targets=ytr, classes=classes),
                    "test": SimpleNamespace(targets=yte, classes=classes)}
        self._feats = {"train": Features(summary=train), "test": Features(summary=test)}
        self.encoder = SimpleNamespace(name="probe", heads=tuple(train))
        self.items = {}

    def progress(self, it, *_, **__):
        return it

    def dataset(self, role):
        return self._ds[role]

    def features(self, role):
        return self._feats[role]

    def record_items(self, name, rows):
        self.items[name] = rows


def test_linear_probe_reports_each_factor_of_the_class_names():
    """Classes '<colour> <shape>'; features that carry the colour (one-hot) and noise: the colour probe is
    exact, the shape probe near chance, the class probe near 1 / shapes; with the class one-hot every probe
    is exact. The probe is scikit-learn's logistic regression on train-standardised features."""
    from sklearn.linear_model import LogisticRegression

    from benchmarks.tasks.linear import fit_linear_probe, standardise
    colours, shapes = ["red", "blue", "green"], ["circle", "square", "star", "ring"]
    classes = [f"{c} {s}" for c in colours for s in shapes]
    gen = torch.Generator().manual_seed(0)
    ytr, yte = torch.arange(12).repeat(20), torch.arange(12).repeat(10)

    def colour_features(y):
        return torch.cat([F.one_hot(y // len(shapes), 3).float() * 3, torch.randn(len(y), 5, generator=gen)], 1)
    ctx = _ProbeCtx(classes, colour_features(ytr), ytr, colour_features(yte), yte)
    got = get_task("linear").run(ctx, {"factors": {"colour": 0, "shape": -1}})
    assert set(got) == {"a/top1", "a/top5", "a/top1_colour", "a/top1_shape"}
    assert got["a/top1_colour"] == 100.0
    assert got["a/top1_shape"] < 50.0 and got["a/top1"] < 50.0
    assert set(ctx.items) == {"a/top1", "a/top5", "a/top1_colour", "a/top1_shape"}
    assert ctx.items["a/top1_colour"].metric() == 100.0         # per-item rows behind the bootstrap
    # the same predictions as scikit-learn's own fit on the standardised features
    train, test = ctx.features("train").summary["a"].double(), ctx.features("test").summary["a"].double()
    m, s = train.mean(0), train.std(0)
    want = LogisticRegression(C=0.1, max_iter=1000).fit(((train - m) / s).numpy(), ytr.numpy())
    xtr, xte = standardise(train, test)
    pred = fit_linear_probe(xtr, ytr, xte, 12, 0.1, 1000).argmax(1)
    assert (pred.numpy() == want.predict(((test - m) / s).numpy())).all()
    exact = _ProbeCtx(classes, F.one_hot(ytr, 12).float(), ytr, F.one_hot(yte, 12).float(), yte)
    got = get_task("linear").run(exact, {"factors": {"colour": 0, "shape": 1}})
    assert got["a/top1"] == got["a/top1_colour"] == got["a/top1_shape"] == 100.0
    for cfg, message in (({"factors": {"size": 2}}, "factor 'size' takes word 2"),
                         ({"factors": {"colour": 0, "shape": "last"}}, "'factors' must map names to word"),
                         ({"C": 0}, "'C' must be a positive number"), ({"max_iter": 0}, "'max_iter'")):
        with pytest.raises(TaskConfigError, match=message):
            get_task("linear").run(ctx, cfg)
    ytr2, yte2 = ytr % 2, yte % 2
    one_colour = _ProbeCtx(["red circle", "red star"], F.one_hot(ytr2, 2).float(), ytr2, F.one_hot(yte2, 2).float(), yte2)
    with pytest.raises(TaskConfigError, match="one value \\('red'\\)"):
        get_task("linear").run(one_colour, {"factors": {"colour": 0}})
