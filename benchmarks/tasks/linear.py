"""Linear probe classification on frozen summary features, optionally per factor of the class names.

Per head: standardise the train and test summary vectors with the train split's per-dimension mean and
std (once per head), fit a multinomial logistic regression (scikit-learn, L-BFGS, inverse regularisation `C`) on the
train split, score top-1 / top-5 on the test split. The plain protocol of DINOv2/v3's linear evaluation
without its learning-rate grid; scikit-learn on the CPU suits banks up to ~10^5 images.

`factors` (e.g. {"colour": 0, "shape": -1}) names words of the class names: for classes such as
"red circle" each factor gets its own probe on the same features, reported as `<head>/top1_<factor>`.
It says *what* an encoder knows: on the mini-world a row can be 99 % right on colour and at chance on
shape, which one class-level score hides (docs/tasks.md).
"""
from __future__ import annotations

import torch

from .base import TaskConfigError, percent, register_task, select_heads, unknown_keys
from .metrics import classification_items, topk_accuracy, train_test_labels


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits in float64, scaled by the train split's per-dimension mean and std."""
    train, test = train.double(), test.double()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def fit_linear_probe(train: torch.Tensor, ytr: torch.Tensor, test: torch.Tensor, num_classes: int, c: float,
                     max_iter: int) -> torch.Tensor:
    """(N_test, num_classes) class probabilities of a logistic regression fitted on (standardised)
    `train` features (classes absent from the train split get probability 0)."""
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=0).fit(train.numpy(), ytr.numpy())
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    scores[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = torch.from_numpy(clf.predict_proba(test.numpy()))
    return scores


def factor_labels(classes: list[str], index: int, name: str) -> tuple[list[str], list[int]]:
    """The factor's vocabulary (sorted) and, per class, the id of its word at `index`."""
    words = []
    for cls in classes:
        parts = cls.split()
        if not -len(parts) <= index < len(parts):
            raise TaskConfigError(f"linear: factor '{name}' takes word {index} of each class name, but class "
                                  f"'{cls}' has {len(parts)} word(s); fix 'factors' in the task config")
        words.append(parts[index])
    vocab = sorted(set(words))
    if len(vocab) < 2:
        raise TaskConfigError(f"linear: factor '{name}' (word {index}) has one value ('{vocab[0]}') across the "
                              "classes; a probe needs at least two")
    return vocab, [vocab.index(w) for w in words]


class LinearTask:
    name = "linear"
    version = "1"
    roles = ("train", "test")
    needs_patches = False
    defaults = {
        "C": 0.1,           # inverse L2 strength; small banks (the mini-world's 470 images) over-fit at 1.0
        "max_iter": 1000,
        "factors": None,    # {"factor": word index in the class names}; null: the classes only
        "heads": None,      # null: every summary head of the encoder
    }

    def run(self, ctx, cfg: dict) -> dict[str, float]:
        unknown_keys(cfg, self.defaults, self.name)
        cfg = {**self.defaults, **cfg}
        c, max_iter, factors = cfg["C"], cfg["max_iter"], cfg["factors"] or {}
        if not isinstance(c, (int, float)) or not c > 0:
            raise TaskConfigError(f"linear: 'C' must be a positive number, got {c!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise TaskConfigError(f"linear: 'max_iter' must be a positive int, got {max_iter!r}")
        if not isinstance(factors, dict) or not all(isinstance(k, str) and isinstance(v, int)
                                                    for k, v in factors.items()):
            raise TaskConfigError(f"linear: 'factors' must map names to word indices, e.g. "
                                  f"{{\"colour\": 0, \"shape\": -1}}, got {factors!r}")
        ytr, yte, classes, num_classes = train_test_labels(ctx, self.name)
        if factors and not classes:
            raise TaskConfigError("linear: 'factors' needs class names, and this dataset's reader gives none")
        # each probe: (metric suffix, train labels, test labels, number of labels)
        probes = [("", ytr, yte, num_classes)]
        for name, index in factors.items():
            vocab, of_class = factor_labels(classes, index, name)
            lut = torch.tensor(of_class)
            probes.append((f"_{name}", lut[ytr], lut[yte], len(vocab)))
        train, test = ctx.features("train"), ctx.features("test")
        heads = select_heads([h for h in ctx.encoder.heads if h in train.summary] or list(train.summary),
                             cfg["heads"], self.name, ctx.encoder.name)
        out: dict[str, float] = {}
        for head in heads:
            xtr, xte = standardise(train.summary[head], test.summary[head])   # once for all of the head's probes
            for suffix, y_train, y_test, n in probes:
                scores = fit_linear_probe(xtr, y_train, xte, n, float(c), max_iter)
                metrics = ("top1", "top5") if suffix == "" else ("top1",)   # a factor has few values
                for metric in metrics:
                    out[f"{head}/{metric}{suffix}"] = percent(topk_accuracy(scores, y_test, int(metric[3:])))
                for metric, rows in classification_items(scores, y_test, n, metrics).items():
                    ctx.record_items(f"{head}/{metric}{suffix}", rows)
        return out


register_task(LinearTask())
