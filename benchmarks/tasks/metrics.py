"""Classification metrics shared by zero-shot and kNN (fractions in [0, 1]; tasks report percent)."""
from __future__ import annotations

import math

import torch


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of rows whose target is among the k highest scores; NaN when there are fewer than k classes
    (top-5 of a 3-class problem would always be 100 % and say nothing)."""
    if scores.shape[1] < k:
        return math.nan
    top = scores.topk(k, dim=1).indices
    return (top == targets.view(-1, 1).to(top.device)).any(dim=1).float().mean().item()


def mean_per_class_recall(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Recall averaged over the classes that occur in `targets` (scikit-learn's balanced accuracy)."""
    pred, targets = pred.cpu().long(), targets.cpu().long()
    hits = torch.bincount(targets[pred == targets], minlength=num_classes).double()
    count = torch.bincount(targets, minlength=num_classes).double()
    present = count > 0
    return (hits[present] / count[present]).mean().item()


def check_targets(targets: torch.Tensor, num_classes: int, where: str) -> None:
    """Labels outside 0..C-1 would silently index the wrong class (or crash deep inside a kernel)."""
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        bad = sorted({int(t) for t in targets.tolist() if not 0 <= t < num_classes})
        raise ValueError(f"{where}: labels {bad[:10]} are outside 0..{num_classes - 1} ({num_classes} class "
                         "names); the class-name list and the labels disagree -- check the reader's classes "
                         "or the 'classnames' override")


def train_test_labels(ctx, task: str) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """The `train` and `test` splits' labels, the class names (empty when the reader gives none) and the
    class count (from the labels then), checked: what every probe on a labelled bank starts from."""
    train_ds, test_ds = ctx.dataset("train"), ctx.dataset("test")
    ytr = torch.as_tensor(list(train_ds.targets), dtype=torch.long)
    yte = torch.as_tensor(list(test_ds.targets), dtype=torch.long)
    classes = list(getattr(train_ds, "classes", None) or [])
    num_classes = len(classes) if classes else int(max(ytr.max(), yte.max())) + 1
    check_targets(ytr, num_classes, f"{task} (train)")
    check_targets(yte, num_classes, f"{task} (test)")
    return ytr, yte, classes, num_classes


def classification_items(scores: torch.Tensor, targets: torch.Tensor, num_classes: int,
                         metrics: tuple[str, ...] = ("top1", "top5")) -> dict:
    """Per-image rows behind top-1 / top-5 / mean per-class recall, for bootstrap intervals
    (distill.stats); top-5 is left out where it is NaN (fewer than 5 classes)."""
    from distill.stats import class_recall_rows, hits
    targets = targets.view(-1, 1).to(scores.device)
    out = {}
    for name in metrics:
        if name == "mean_per_class_recall":
            out[name] = class_recall_rows(scores.argmax(1).cpu().numpy(), targets.view(-1).cpu().numpy())
            continue
        k = int(name[3:])
        if scores.shape[1] >= k:
            out[name] = hits((scores.topk(k, dim=1).indices == targets).any(1).cpu().numpy())
    return out
