"""Linear heads fitted on cached backbone features: the recipe's L-BFGS head and the batched k-fold heads.

- `fit_linear_head`: the default recipe's head stage. Multinomial logistic regression with an L2 penalty
  (scikit-learn's C convention), fitted to convergence by full-batch L-BFGS (`lbfgs_linear`). On frozen
  features this is the strongest linear head, and it has no learning rate or epoch count to tune
  (benchmarks/train_speed.py compares it with a one-cycle head).
- `fit_fold_heads`: k linear heads trained together as one batched model, head f on every item outside
  fold f, so each item gets probabilities from a head that never saw it (the label-issue search,
  `ursa.interpret.issues`). They train by mini-batch AdamW with a one-cycle schedule: torch's L-BFGS
  treats its parameters as one vector, so k heads in one model would share a single line search.

Features are float32 (n, d), labels (n,) int64 class indices.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ursa.errors import TrainError
from ursa.models import Head
from ursa.train.callbacks import CACHED
from ursa.train.schedule import apply_one_cycle

__all__ = ["lbfgs_linear", "set_linear", "fit_linear_head", "assign_folds", "fit_fold_heads", "fold_logits_lbfgs", "MIN_FOLD_STEPS"]

MIN_FOLD_STEPS = 150  # fewest optimiser steps of the k-fold heads, however small the dataset


def lbfgs_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, c: float = 0.5, max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight (n_classes, d), bias (n_classes,), loss evaluations) minimising the mean cross-entropy of
    x @ W.T + b plus (1 / (2 c n)) |W|^2, by full-batch L-BFGS with a strong-Wolfe line search from zero."""
    n = len(y)
    l2 = 1.0 / (c * n)
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    evals = 0

    def closure() -> torch.Tensor:
        nonlocal evals
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        evals += 1
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), evals


def set_linear(head: Head, w: torch.Tensor, b: torch.Tensor) -> None:
    """Make `head` compute exactly x @ w.T + b: its BatchNorm becomes the identity (mean 0, variance
    1 - eps, so the eps cancels) and stays trainable for fine-tuning; leaves the head in eval mode."""
    with torch.no_grad():
        head.bn.reset_parameters()
        head.bn.running_var.fill_(1.0 - head.bn.eps)
        head.fc.weight.copy_(w)
        head.fc.bias.copy_(b)
    head.eval()


def fit_linear_head(learn: Any, *, c: float = 0.5, max_iter: int = 300) -> None:
    """Fit the linear layer of the Head that `learn` (a `ursa.train.learner.Learner` over cached features)
    trains, on its whole feature cache (`lbfgs_linear`), and record one history row: L-BFGS iterations
    are not mini-batches, so there are no batch losses. The head's dropout is set to 0: the fitted head
    never saw dropout, and fine-tuning after it keeps its logits as they were fitted."""
    head = learn.model
    if not isinstance(head, Head):
        raise TrainError("fit_linear_head needs a Head on cached features.")
    x, y = learn.train_dl.dataset.tensors
    t0 = time.perf_counter()
    w, b, evals = lbfgs_linear(x, y, len(learn.classes), c=c, max_iter=max_iter)
    set_linear(head, w, b)
    head.drop.p = 0.0
    with torch.no_grad():
        ce = float(F.cross_entropy(head(x), y))
    learn.recorder.add_row({"stage": "head", "epoch": 0, "train_loss": ce, "lr": float("nan"), "seconds": round(time.perf_counter() - t0, 3), "batches": 0, "iterations": evals, **learn.validate()}, path=CACHED)


def assign_folds(labels: np.ndarray, *, folds: int, groups: Sequence[Any] | None = None, seed: int = 42) -> np.ndarray:
    """(n,) int64 fold of each item in 0..folds-1: a stratified group k-fold (scikit-learn's
    StratifiedGroupKFold, shuffled with `seed`), so folds keep the class mix and `groups` keeps copies
    of one picture in one fold (a copy cannot vouch for itself). TrainError when there are too few items."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels, dtype=np.int64)
    n, k = len(labels), int(folds)
    if k < 2 or n < 2 * k:
        raise TrainError(f"{n} images are too few for a {folds}-fold search; it needs at least {2 * max(2, folds)}. Add images.")
    grp = np.asarray(groups if groups is not None else np.arange(n))
    _, grp_ids = np.unique(grp, return_inverse=True)
    if grp_ids.max(initial=-1) + 1 < k:  # copies of one picture stay in one fold: a fold per group at least
        raise TrainError(f"the {n} images are only {grp_ids.max() + 1} distinct pictures (copies count once), too few for a {k}-fold search. Add images.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes smaller than k: some folds hold none of them, which is fine
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        fold_of = np.empty(n, np.int64)
        for f, (_, te) in enumerate(splitter.split(np.zeros(n), labels, grp_ids)):
            fold_of[te] = f
    return fold_of


def fold_logits_lbfgs(views: Sequence[Sequence[np.ndarray]], labels: np.ndarray, fold_of: np.ndarray, *, folds: int, n_classes: int, c: float = 0.5, max_iter: int = 300) -> np.ndarray:
    """Out-of-fold logits of the recipe's own head: for each fold f, `lbfgs_linear` (the L-BFGS head
    with the same `c`) on every view of the items outside fold f, applied to the plain view (views[i][0])
    of the items in fold f, as the exported model sees a photo. The heads are fitted one after another
    (see the module docstring for why not batched). Returns (n, n_classes) float32 logits."""
    labels = np.asarray(labels, dtype=np.int64)
    fold_of = np.asarray(fold_of, dtype=np.int64)
    plain = torch.from_numpy(np.stack([v[0] for v in views]).astype(np.float32))
    out = np.zeros((len(views), n_classes), np.float32)
    for f in range(folds):
        inside = np.flatnonzero(fold_of == f)
        outside = np.flatnonzero(fold_of != f)
        if len(inside) == 0 or len(outside) == 0:
            continue
        rows = [(v, int(labels[i])) for i in outside for v in views[i]]
        x = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.float32))
        y = torch.tensor([r[1] for r in rows], dtype=torch.long)
        w, b, _ = lbfgs_linear(x, y, n_classes, c=c, max_iter=max_iter)
        out[inside] = (plain[inside] @ w.T + b).numpy()
    return out


def fit_fold_heads(
    views: Sequence[Sequence[np.ndarray]],
    labels: np.ndarray,
    fold_of: np.ndarray,
    *,
    folds: int,
    n_classes: int,
    predict_views: int = 1,
    epochs: int = 12,
    lr: float = 6e-3,
    batch_size: int = 128,
    label_smoothing: float = 0.0,
    wd: float = 0.01,
    dropout: float = 0.25,
    seed: int = 42,
) -> np.ndarray:
    """Probabilities of every item from the head of its own fold, trained without that fold.

    `views[i]` holds item i's feature vectors (each (d,), the plain view first), `fold_of` (n,) its fold
    in 0..folds-1. Features are standardised over all rows (unsupervised: a frozen BatchNorm); head f trains
    on every view of the items outside fold f with dropout, AdamW and one-cycle for `epochs` epochs (at
    least MIN_FOLD_STEPS steps) and predicts the mean softmax over the first `predict_views` views of
    the items in fold f. The k heads train together as one batched model, one pass over the data per
    step instead of k, on one thread: these ops are too small to gain from more, and lose a lot on a
    busy machine. Returns (n, n_classes) float32; rows sum to 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_folds(views, np.asarray(labels, dtype=np.int64), np.asarray(fold_of, dtype=np.int64), folds, n_classes=n_classes, predict_views=predict_views, epochs=epochs, lr=lr,
                          batch_size=batch_size, label_smoothing=label_smoothing, wd=wd, dropout=dropout, seed=seed)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _fit_folds(views: Sequence[Sequence[np.ndarray]], labels: np.ndarray, fold_of: np.ndarray, k: int, *, n_classes: int, predict_views: int, epochs: int, lr: float, batch_size: int, label_smoothing: float, wd: float, dropout: float, seed: int) -> np.ndarray:
    n = len(views)
    item_of = np.array([i for i in range(n) for _ in views[i]], np.int64)
    x = torch.from_numpy(np.stack([v for i in range(n) for v in views[i]]).astype(np.float32))  # (rows, d)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.from_numpy(labels[item_of])
    train_mask = torch.from_numpy(fold_of[item_of][None, :] != np.arange(k)[:, None])  # (k, rows)
    d = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(k, d, n_classes, generator=gen) * (1.0 / d**0.5)).requires_grad_()
    b = torch.zeros(k, 1, n_classes, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=wd, betas=(0.9, 0.99))
    steps_per_epoch = max(1, int(np.ceil(len(x) / batch_size)))
    epochs = max(epochs, int(np.ceil(MIN_FOLD_STEPS / steps_per_epoch)))  # small sets: enough steps to converge
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s : s + batch_size]
            apply_one_cycle(opt, step, total, [lr])
            keep = (torch.rand(len(idx), d, generator=gen) > dropout).float() / (1 - dropout)
            logits = torch.einsum("nd,kdc->knc", x[idx] * keep, w) + b  # (k, batch, classes)
            loss = F.cross_entropy(logits.reshape(-1, n_classes), y[idx].repeat(k), reduction="none", label_smoothing=label_smoothing).reshape(k, -1)
            m = train_mask[:, idx].float()
            loss = (loss * m).sum(1) / m.sum(1).clamp_min(1)  # each head's mean over its own training rows
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            step += 1
    out = np.zeros((n, n_classes), np.float32)
    with torch.inference_mode():
        for v in range(max(1, predict_views)):
            xv = torch.from_numpy(np.stack([views[i][min(v, len(views[i]) - 1)] for i in range(n)]).astype(np.float32))
            xv = (xv - mean) / std
            logits = torch.einsum("nd,kdc->knc", xv, w) + b  # (k, n, classes)
            own = logits[torch.from_numpy(fold_of), torch.arange(n)]  # each item from the head of its own fold
            out += own.softmax(-1).numpy()
    return out / max(1, predict_views)
