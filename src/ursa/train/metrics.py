"""Validation metrics on predictions. `error_rate` is exactly one minus `accuracy`."""

from __future__ import annotations

import torch

__all__ = ["accuracy", "error_rate", "METRICS"]


def accuracy(logits_or_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose argmax equals the target; inputs (n, classes) and (n,)."""
    if len(targets) == 0:
        return float("nan")
    return (logits_or_probs.argmax(dim=-1) == targets).float().mean().item()


def error_rate(logits_or_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - accuracy."""
    return 1.0 - accuracy(logits_or_probs, targets)


METRICS = {"error_rate": error_rate, "accuracy": accuracy}
