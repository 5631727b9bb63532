"""Benchmark task internals against independent computations (scikit-learn, numpy, hand-made cases)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from benchmarks.tasks import TaskConfigError, UnknownTaskError, get_task, list_tasks, register_task
from benchmarks.tasks.knn import entropy_weighted_votes, knn_topk, knn_topk_reference, knn_vote
from benchmarks.tasks.metrics import check_targets, mean_per_class_recall, topk_accuracy
from benchmarks.tasks.retrieval import recall_at_k, retrieval_metrics
from distill.seg_metrics import metrics_from_areas
from benchmarks.tasks.segmentation import (Labels, evaluate_head, lr_at, resolve_protocol,
                                           train_and_evaluate, load_presets)
from benchmarks.tasks.zeroshot import (class_weights, entropy_weighted_logits, resolve_classnames,
                                       resolve_templates)


# ---------------------------------------------------------------- registry

def test_registry_lists_the_four_tasks_and_names_unknown_ones():
    assert {"zeroshot", "knn", "retrieval", "segmentation"} <= set(list_tasks())
    with pytest.raises(UnknownTaskError, match="unknown task 'knnn'; known tasks: .*knn.*zeroshot"):
        get_task("knnn")
    for name in ("zeroshot", "knn", "retrieval", "segmentation"):
        t = get_task(name)
        assert t.name == name and t.version and t.roles and isinstance(t.defaults, dict)

    class Dup:
        name, version, roles, needs_patches, defaults = "knn", "9", ("test",), False, {}

        def run(self, ctx, cfg):
            return {}

    with pytest.raises(ValueError, match="already registered"):
        register_task(Dup())


def test_an_encoder_without_a_usable_head_is_a_missing_head_error():
    # the harness turns MissingHeadError into a "skipped" cell, so the subclass must stay one
    from benchmarks.tasks.base import select_heads
    from distill.encoders.base import MissingHeadError
    with pytest.raises(MissingHeadError, match="^encoder 'enc' has no text tower that zeroshot can use"):
        select_heads([], None, "zeroshot", "enc", "text tower")
    with pytest.raises(MissingHeadError, match="no head 'z'; available: a, b"):
        select_heads(["a", "b"], ["a", "z"], "knn", "enc")
    assert select_heads(["a", "b"], None, "knn", "enc") == ["a", "b"]


# ---------------------------------------------------------------- classification metrics

def test_topk_and_balanced_recall_match_sklearn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 12, generator=g)
    y = torch.randint(0, 12, (300,), generator=g)
    y[:40] = 3   # imbalanced, so balanced recall differs from plain accuracy
    for k in (1, 5):
        assert topk_accuracy(scores, y, k) == pytest.approx(
            top_k_accuracy_score(y.numpy(), scores.numpy(), k=k, labels=np.arange(12)))
    pred = scores.argmax(1)
    assert mean_per_class_recall(pred, y, 12) == pytest.approx(balanced_accuracy_score(y.numpy(), pred.numpy()))
    assert mean_per_class_recall(pred, y, 12) != pytest.approx(float((pred == y).float().mean()))
    assert math.isnan(topk_accuracy(scores[:, :3], y.clamp(max=2), 5))   # top-5 of 3 classes: NaN


def test_label_and_classname_disagreement_is_a_clear_error():
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0..4"):
        check_targets(torch.tensor([0, 1, 7]), 5, "zeroshot")
    with pytest.raises(ValueError, match="3 class names given but the dataset has 4 classes"):
        resolve_classnames(["a", "b", "c"], ["w", "x", "y", "z"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside 0..1"):
        resolve_classnames(None, ["x", "y"], torch.tensor([0, 2]))


# ---------------------------------------------------------------- zero-shot pieces

def test_templates_from_open_clip_dataset_or_list():
    openai = resolve_templates(None, None)
    assert len(openai) == 80 and openai[0]("dog") == "a bad photo of a dog."
    own = resolve_templates(None, ["a {} here.", "the {}!"])
    assert [t("cat") for t in own] == ["a cat here.", "the cat!"]
    assert len(resolve_templates("openai_imagenet", ["x {}"])) == 80
    with pytest.raises(TaskConfigError, match="must contain"):
        resolve_templates(["no placeholder"], None)


def test_class_weights_average_normalised_template_embeddings():
    # class 0: templates (3, 0) and (0, 1) -> normalised (1,0), (0,1) -> mean (.5,.5) -> (1,1)/sqrt2
    emb = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [0.0, -5.0]])
    w = class_weights(emb, num_classes=2, num_templates=2)
    torch.testing.assert_close(w, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]))


def test_entropy_weighted_ensemble_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    la, lb = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g)
    out = entropy_weighted_logits([la, lb], beta=5.0)
    a, b = la.double().numpy(), lb.double().numpy()

    def entropy(x):
        p = np.exp(x - x.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p = np.maximum(p, 1e-8)
        return -(p * np.log(p)).sum(1)

    wa = np.exp(-5 * entropy(a)) / (np.exp(-5 * entropy(a)) + np.exp(-5 * entropy(b)))
    expect = wa[:, None] * a + (1 - wa[:, None]) * b
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-6)
    # a confident head dominates: a one-hot-ish head against a flat one
    sharp, flat = torch.tensor([[20.0, 0, 0]]), torch.tensor([[0.0, 0.1, 0.2]])
    assert entropy_weighted_logits([sharp, flat], 5.0).argmax().item() == 0


# ---------------------------------------------------------------- kNN

def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_knn_streaming_topk_matches_reference_with_other_chunking_or_gpu():
    bank, test = _features(257, 16, 0), _features(45, 16, 1)
    ref_v, ref_i = knn_topk_reference(test, bank, 20)
    # the fast path on the GPU when there is one; otherwise on the CPU with chunks that split the bank
    # and the queries unevenly, which exercises the running top-k merge
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for tc, bc in ((7, 13), (64, 1000), (1, 20)):
        v, i = knn_topk(test, bank, 20, device=device, test_chunk=tc, bank_chunk=bc)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(v, ref_v, rtol=0, atol=1e-5)


def test_knn_vote_matches_sklearn_weighted_neighbours():
    bank, test = _features(200, 8, 2), _features(60, 8, 3)
    g = torch.Generator().manual_seed(4)
    ytr = torch.randint(0, 6, (200,), generator=g)
    T, k = 0.07, 20
    sims, idx = knn_topk(test, bank, k, test_chunk=16, bank_chunk=50)
    scores = knn_vote(sims, idx, ytr, 6, k, T)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / T))
    clf.fit(bank.numpy(), ytr.numpy())
    proba = clf.predict_proba(test.numpy())
    np.testing.assert_allclose(scores.numpy() / scores.numpy().sum(1, keepdims=True), proba, rtol=1e-4, atol=1e-6)
    assert torch.equal(scores.argmax(1), torch.from_numpy(clf.predict(test.numpy())))


def test_knn_ensemble_weighs_each_image_towards_the_more_decided_head_by_hand():
    # image 0: head a votes all for class 0 (entropy 0), head b evenly (entropy ln 2)
    # image 1: the other way round, head b all for class 1
    a = torch.tensor([[4.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    beta, ln2 = 5.0, math.log(2)
    w_dec = 1 / (1 + math.exp(-beta * ln2))          # softmax(-beta * [0, ln 2])[0]
    want = torch.tensor([[w_dec * 4 + (1 - w_dec) * 3, (1 - w_dec) * 3],
                         [(1 - w_dec) * 1, (1 - w_dec) * 1 + w_dec * 2]], dtype=torch.float64)
    torch.testing.assert_close(entropy_weighted_votes([a, b], beta), want)
    # beta 0: plain sum of votes weighted 1/2 each
    torch.testing.assert_close(entropy_weighted_votes([a, b], 0.0), (a + b) / 2)


# ---------------------------------------------------------------- retrieval

def test_retrieval_recall_hand_made():
    # 3 images, captions owned [0, 0, 1, 2, 2]; the similarity table is chosen by hand
    sim = torch.tensor([[0.1, 0.9, 0.8, 0.0, 0.2],     # img0: best caption is its own (idx 1) -> hit@1
                        [0.7, 0.1, 0.6, 0.5, 0.4],     # img1: own caption (idx 2) ranks 2nd -> hit@5 only
                        [0.9, 0.8, 0.7, 0.6, 0.1]])    # img2: own captions rank 4th and 5th -> hit@5
    owner = torch.tensor([0, 0, 1, 2, 2])
    pos = owner.view(1, -1) == torch.arange(3).view(-1, 1)
    i2t = recall_at_k(sim, pos, [1, 2, 4, 5])
    assert i2t == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(1.0), 5: pytest.approx(1.0)}
    t2i = recall_at_k(sim.T, pos.T, [1, 2])
    # per caption, ranks of its own image: c0 img0 3rd; c1 img0 1st; c2 img1 3rd; c3 img2 1st; c4 img2 3rd
    assert t2i == {1: pytest.approx(2 / 5), 2: pytest.approx(2 / 5)}


def test_retrieval_metrics_from_embeddings_and_caps_k():
    img = torch.eye(3)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0], [0.1, 1.0, 0], [0.0, 0.2, 1.0],
                                                      [0.0, 0.0, 1.0]]), dim=-1)
    m = retrieval_metrics(img, txt, torch.tensor([0, 1, 2, 2]), ks=(1, 10))
    assert m == {"i2t_r1": 100.0, "i2t_r10": 100.0, "t2i_r1": 100.0, "t2i_r10": 100.0}


# ---------------------------------------------------------------- segmentation

class _Masks:
    def __init__(self, masks):
        self.masks = masks

    def load_label(self, i):
        return self.masks[i]


def test_iou_metric_matches_hand_computed_confusion_matrix():
    from mmseg.evaluation import IoUMetric
    g = np.random.default_rng(0)
    k = 4
    preds = [g.integers(0, k, size=(9, 11)) for _ in range(3)]
    labels = [g.integers(0, k, size=(9, 11)) for _ in range(3)]
    labels[1][:3] = 255                    # ignored pixels
    labels[2][labels[2] == 3] = 0          # class 3 absent from every label of image 2
    areas = [torch.zeros(k, dtype=torch.float64) for _ in range(4)]
    for p, lab in zip(preds, labels):
        for acc, a in zip(areas, IoUMetric.intersect_and_union(torch.from_numpy(p), torch.from_numpy(lab), k, 255)):
            acc += a.double()
    got = metrics_from_areas(*areas)
    conf = np.zeros((k, k))
    for p, lab in zip(preds, labels):
        keep = lab != 255
        np.add.at(conf, (lab[keep], p[keep]), 1)
    inter = np.diag(conf)
    iou = inter / (conf.sum(0) + conf.sum(1) - inter)
    assert got["miou"] == pytest.approx(100 * iou.mean())
    assert got["aacc"] == pytest.approx(100 * inter.sum() / conf.sum())
    assert got["macc"] == pytest.approx(100 * (inter / conf.sum(1)).mean())


def test_lr_schedule_warmup_then_poly():
    kw = dict(total=100, base_lr=1e-3, warmup_iters=10, warmup_start_factor=0.0, poly_power=1.0, min_lr=0.0)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(5e-4)
    assert lr_at(50, **kw) == pytest.approx(5e-4)
    assert lr_at(100, **kw) == pytest.approx(0.0)
    assert lr_at(70, **{**kw, "poly_power": None}) == 1e-3


def test_presets_are_complete_and_bad_overrides_are_named():
    presets = load_presets()
    assert {"miniworld", "amoe", "radio", "dinov3"} <= set(presets)
    for name in presets:
        proto = resolve_protocol({"preset": name})
        assert proto["preset"] == name
    amoe = resolve_protocol({"preset": "amoe"})
    assert amoe["epochs"] == 10 and amoe["batch_size"] == 16 and amoe["weight_decay"] == 1e-3
    assert min(amoe["lrs"]) == 4e-4 and max(amoe["lrs"]) == 2e-2 and amoe["select"] == "best_epoch"
    radio = resolve_protocol({"preset": "radio"})
    assert radio["iterations"] == 80000 and radio["warmup_iters"] == 1500 and radio["poly_power"] == 1.0
    assert resolve_protocol({"preset": "amoe", "lrs": [0.1]})["lrs"] == [0.1]
    with pytest.raises(TaskConfigError, match="unknown preset 'nope'"):
        resolve_protocol({"preset": "nope"})
    with pytest.raises(TaskConfigError, match="exactly one of 'epochs' and 'iterations'"):
        resolve_protocol({"preset": "miniworld", "iterations": 5})


@pytest.mark.parametrize("loss_at", ["patch", "pixel"])
def test_probe_learns_a_separable_problem(loss_at):
    # patch features are a noisy one-hot of the (constant per patch) label: a linear probe must nail it
    g = torch.Generator().manual_seed(0)
    k, ps = 3, 4
    feats, grids, masks = [], [], []
    for _ in range(24):
        h, w = int(torch.randint(3, 6, (1,), generator=g)), int(torch.randint(3, 6, (1,), generator=g))
        cls = torch.randint(0, k, (h, w), generator=g)
        feats.append(torch.nn.functional.one_hot(cls.reshape(-1), k).float() * 2
                     + 0.1 * torch.randn(h * w, k, generator=g))
        grids.append((h, w))
        m = cls.repeat_interleave(ps, 0).repeat_interleave(ps, 1).numpy().copy()
        m[0, 0] = 255
        masks.append(m)
    proto = {**resolve_protocol({"preset": "miniworld"}), "epochs": 15, "batch_size": 8, "lrs": [0.05],
             "train_loss_at": loss_at}
    labels = Labels(_Masks(masks), k)
    evals = train_and_evaluate(feats[:16], grids[:16], labels, feats, grids, labels, k, proto, 0.05, "cpu")
    assert len(evals) == 1 and evals[0]["aacc"] > 85 and evals[0]["miou"] > 70
    best_epoch = {**proto, "select": "best_epoch", "epochs": 3}
    evals = train_and_evaluate(feats[:16], grids[:16], labels, feats, grids, labels, k, best_epoch, 0.05, "cpu")
    assert [e["epoch"] for e in evals] == [1, 2, 3]


def test_segmentation_label_outside_class_list_is_named():
    labels = Labels(_Masks([np.array([[0, 1], [9, 255]])]), 3)
    with pytest.raises(ValueError, match=r"values \[9\] outside 0..2"):
        labels.full(0)


def test_evaluate_head_perfect_probe_scores_100():
    from benchmarks.tasks.segmentation import build_head
    head = build_head(2, 2)
    with torch.no_grad():   # BN in eval mode with default running stats is the identity; conv = identity
        head.conv_seg.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        head.conv_seg.bias.zero_()
    feats = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]     # a 1x2 grid: left class 0, right class 1
    mask = np.array([[0, 0, 1, 1]])
    m = evaluate_head(head, feats, [(1, 2)], Labels(_Masks([mask]), 2), 2, "cpu")
    areas = m.pop("areas")   # one image: [intersect | union | pred | label] per class
    assert m == {"miou": 100.0, "aacc": 100.0, "macc": 100.0}
    assert areas.tolist() == [[2, 2, 2, 2, 2, 2, 2, 2]]


def test_evaluate_head_breaks_ties_towards_the_first_class_as_argmax_does():
    from benchmarks.tasks.segmentation import build_head
    head = build_head(2, 3)
    with torch.no_grad():   # every class scores 0 everywhere: a tie at every pixel
        head.conv_seg.weight.zero_()
        head.conv_seg.bias.zero_()
    mask = np.array([[0, 1, 2, 2]])
    m = evaluate_head(head, [torch.randn(2, 2)], [(1, 2)], Labels(_Masks([mask]), 3), 3, "cpu")
    assert m["areas"].tolist() == [[1, 0, 0, 4, 1, 2, 4, 0, 0, 1, 1, 2]]   # all predicted class 0
