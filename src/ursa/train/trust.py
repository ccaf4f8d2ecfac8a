"""Fit what makes a run's answers trustworthy, on its cached features: the temperature and the open-set detector.

Both are fitted on out-of-fold predictions of the training set, never on the validation set they are
reported on: the training images are dealt into k folds (`ursa.train.head.assign_folds`, the folds of
the label-issue search) and each fold is predicted by heads fitted without it (`fold_logits_lbfgs`:
the recipe's own L-BFGS head; with the one-cycle head, the label-issue search's batched fold heads).

- Temperature: the T minimising the out-of-fold negative log-likelihood (`ursa.trust.fit_temperature`).
- Open set: an `ursa.trust.OpenSetDetector` on the plain-view training embeddings. Its threshold is the
  `accept` quantile (default 95%) of the out-of-fold scores (each fold scored by a detector fitted on
  the other folds) of the correctly classified out-of-fold images, so about 95% of the images the model
  gets right are accepted.

`fit_trust` returns a `Trust`; the recipe writes it into the run (metrics.json and
models/open_set.safetensors) and the export carries it to the Predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ursa.errors import TrainError
from ursa.train.features import FeatureData
from ursa.train.head import assign_folds, fit_fold_heads, fold_logits_lbfgs
from ursa.trust import ECE_BINS, OpenSetDetector, expected_calibration_error, fit_temperature

__all__ = ["Trust", "fit_trust", "DEFAULT_DETECTOR", "ACCEPT"]

DEFAULT_DETECTOR = "knn"  # measured better than Mahalanobis on held-out species (benchmarks/trust.py)
ACCEPT = 0.95  # share of correctly classified out-of-fold training images the detector accepts


@dataclass
class Trust:
    """A run's calibration and open-set detector, and what they measured (`info`, for metrics.json)."""

    temperature: float
    detector: OpenSetDetector | None
    info: dict[str, Any] = field(default_factory=dict)


def _valid_logits(head: nn.Module, fd: FeatureData) -> list[np.ndarray]:
    head.eval()
    with torch.inference_mode():
        return [head(x).numpy().astype(np.float64) for x in fd.x_valid]


def _tta_probs(logits: list[np.ndarray], temperature: float) -> np.ndarray:
    from ursa.trust import scaled_softmax

    return np.mean([scaled_softmax(z, temperature) for z in logits], axis=0)


def fit_trust(fd: FeatureData, head: nn.Module, *, n_classes: int, solver: str = "lbfgs", c: float = 0.5, folds: int = 5, seed: int = 42, accept: float = ACCEPT, detector: str = DEFAULT_DETECTOR) -> Trust:
    """Temperature and open-set detector of the head `head` (on pooled features, (n, d) -> (n, C)
    logits) trained on `fd`'s training rows, fitted out of fold (see the module docstring). `solver` is
    the recipe's head solver ("lbfgs" with its `c`, or "one_cycle"). `info` holds the temperature, the
    validation ECE (15 bins) before and after scaling, and the detector's method, threshold and the shares
    of out-of-fold training and validation images it accepts. With fewer than 4 training images nothing
    is fitted (temperature 1, no detector) and `info["calibration_note"]` says why."""
    if not 0.5 <= accept < 1.0:
        raise TrainError(f"the open-set acceptance share must be in [0.5, 1), got {accept}. Use 0.95.")
    n_tr = len(fd.train_names)
    n_views = len(fd.views)
    y = fd.y_train[:n_tr].numpy()
    x_views = fd.x_train.numpy().reshape(n_views, n_tr, -1)
    views = [[x_views[v, i] for v in range(n_views)] for i in range(n_tr)]
    plain = x_views[0]
    valid_logits = _valid_logits(head, fd)
    yv = fd.y_valid.numpy()
    before = expected_calibration_error(_tta_probs(valid_logits, 1.0), yv)
    k = min(int(folds), n_tr // 2)
    if k < 2:
        why = f"{n_tr} training images are too few for out-of-fold calibration (at least 4)"
        return Trust(1.0, None, {"temperature": 1.0, "ece": {"before": round(before, 4), "after": round(before, 4), "bins": ECE_BINS}, "calibration_note": why})
    fold_of = assign_folds(y, folds=k, seed=seed)
    if solver == "lbfgs":
        oof = fold_logits_lbfgs(views, y, fold_of, folds=k, n_classes=n_classes, c=c)
    else:
        probs = fit_fold_heads(views, y, fold_of, folds=k, n_classes=n_classes, seed=seed)
        oof = np.log(np.clip(probs, 1e-12, None))  # log-probabilities: logits up to a per-row constant
    t = fit_temperature(oof, y)
    after = expected_calibration_error(_tta_probs(valid_logits, t), yv)

    # open set: out-of-fold detector scores of the training images, thresholded on the correct ones
    scores = np.zeros(n_tr, np.float32)
    for f in range(k):
        inside, outside = fold_of == f, fold_of != f
        if inside.any() and outside.sum() >= 2:
            scores[inside] = OpenSetDetector.fit(plain[outside], y[outside], n_classes=n_classes, method=detector, seed=seed).score(plain[inside])
    correct = oof.argmax(1) == y
    ref = scores[correct] if correct.any() else scores
    threshold = float(np.quantile(ref, accept, method="higher"))
    det = OpenSetDetector.fit(plain, y, n_classes=n_classes, method=detector, seed=seed)
    det.threshold = threshold
    valid_ok = ~det.unfamiliar(fd.x_valid[0].numpy())
    info = {
        "temperature": round(t, 4),
        "ece": {"before": round(before, 4), "after": round(after, 4), "bins": ECE_BINS},
        "calibration": f"temperature fitted on {k}-fold out-of-fold logits of the {n_tr} training images",
        "oof_accuracy": round(float(correct.mean()), 4),
        "open_set": {
            **det.describe(),
            "accept": accept,
            "train_oof_correct_accepted": round(float((scores[correct] <= threshold).mean()) if correct.any() else 1.0, 4),
            "valid_accepted": round(float(valid_ok.mean()) if len(valid_ok) else 1.0, 4),
        },
    }
    return Trust(t, det, info)
