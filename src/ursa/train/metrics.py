"""Validation metrics on predictions, and the `metrics=` argument of a Learner.

`error_rate` is exactly one minus `accuracy`. A metric is any function (probabilities or logits (n,
classes), targets (n,)) -> a number; its `__name__` is its column in the history, as in fastai, so
`metrics=error_rate` and `metrics=[error_rate, accuracy]` work as written in the lesson.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ursa.errors import TrainError

__all__ = ["accuracy", "error_rate", "METRICS", "Metric", "as_metrics"]

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


def accuracy(logits_or_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose argmax equals the target; inputs (n, classes) and (n,)."""
    if len(targets) == 0:
        return float("nan")
    return (logits_or_probs.argmax(dim=-1) == targets).float().mean().item()


def error_rate(logits_or_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - accuracy."""
    return 1.0 - accuracy(logits_or_probs, targets)


METRICS = {"error_rate": error_rate, "accuracy": accuracy}

_HOW = "Pass a metric function such as error_rate, a list of them such as [error_rate, accuracy] (from ursa import error_rate, accuracy), or a dict of column name -> function."


def as_metrics(metrics: Any) -> dict[str, Metric]:
    """`metrics=` as {column name: function}: None gives error_rate and accuracy; a function is named by
    its `__name__`; a list or tuple of functions; or a dict name -> function. Anything else (a string, a
    number, a list holding a non-function) raises TrainError naming the fix."""
    if metrics is None:
        return dict(METRICS)
    if callable(metrics) and not isinstance(metrics, type):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        out = dict(metrics)
        bad = [f"{k!r}: {v!r}" for k, v in out.items() if not isinstance(k, str) or not _is_metric(v)]
        if bad:
            raise TrainError(f"metrics has entries that are not (name, function) pairs: {', '.join(bad[:3])}. {_HOW}")
        return out
    if isinstance(metrics, (list, tuple)):
        bad = [m for m in metrics if not _is_metric(m)]
        if bad:
            raise TrainError(f"metrics holds {_describe(bad[0])}, which is not a metric function. {_HOW}")
        out = {}
        for m in metrics:
            name = getattr(m, "__name__", None) or type(m).__name__
            if name in out and out[name] is not m:
                raise TrainError(f"two metrics are named {name!r}; pass a dict to give them distinct column names. {_HOW}")
            out[name] = m
        return out
    raise TrainError(f"metrics={_describe(metrics)} is not a metric. {_HOW}")


def _is_metric(m: Any) -> bool:
    return callable(m) and not isinstance(m, type)


def _describe(v: Any) -> str:
    if isinstance(v, str):
        return f"{v!r} (a string: pass the function itself, {v} without quotes)"
    return f"{v!r} ({type(v).__name__})"
