"""Lesson: the learning rate, too high, about right, and too low.

Each SGD step moves the parameters by `lr * gradient`. The learning rate is the one number you must pick:

- too high: the steps overshoot the bottom of the valley and the loss jumps up instead of down; in a
  network with ReLUs a few huge steps can push every unit to output zero ("dead"), and the model is
  stuck guessing one class for ever;
- too low: every step is safe but tiny, so the loss crawls down and you pay for many more epochs;
- about right: the loss drops fast and keeps dropping.

`lr_lesson` trains the same small network (one hidden layer) on the same data three times, changing
only the learning rate, and plots the validation loss and error rate after every epoch: the validation
set, not the training loss, is what says which run learned something that carries over.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LRRun", "LRResult", "DEFAULT_LRS", "train_classifier", "lr_lesson"]

# Too high, about right, too low: chosen on the digits data, 10x apart and 100x apart.
DEFAULT_LRS: tuple[float, float, float] = (3.0, 0.3, 0.003)


@dataclass
class LRRun:
    """One training run. Lists are per epoch, index 0 = before any training (length epochs + 1).

    Losses are mean cross-entropy (nats); errors are fractions of examples misclassified. `batch_losses`
    is the training loss of every mini-batch in order (what the optimiser actually saw).
    """

    lr: float
    train_loss: list[float]
    valid_loss: list[float]
    valid_error: list[float]
    batch_losses: list[float] = field(repr=False, default_factory=list)

    @property
    def improvement_per_epoch(self) -> float:
        """How much the validation loss fell per epoch, on average (negative: it rose)."""
        epochs = len(self.valid_loss) - 1
        return (self.valid_loss[0] - self.valid_loss[-1]) / epochs if epochs else 0.0


@dataclass
class LRResult:
    """Numbers of one run of `lr_lesson`: runs in order (too high, good, too low) with their names."""

    runs: list[LRRun]
    names: list[str]
    epochs: int

    columns = ("run", "learning rate", "final train loss", "final valid loss", "valid error rate", "valid loss fall / epoch")

    def rows(self) -> list[list[str]]:
        """Table rows, one per run."""
        return [
            [name, f"{r.lr:g}", _fmt(r.train_loss[-1]), _fmt(r.valid_loss[-1]), f"{r.valid_error[-1]:.1%}", _fmt(r.improvement_per_epoch)]
            for name, r in zip(self.names, self.runs)
        ]

    @property
    def notice(self) -> str:
        """The one thing to see in this lesson."""
        high, good, low = self.runs
        return (
            f"Only the learning rate differs: {high.lr:g} wrecks the model ({high.valid_error[-1]:.0%} wrong), "
            f"{low.lr:g} is still crawling after {self.epochs} epochs ({low.valid_error[-1]:.0%} wrong), "
            f"{good.lr:g} gets {good.valid_error[-1]:.1%} wrong."
        )


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).to(dtype)


def _check(x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor) -> None:
    if x_train.ndim != 2 or x_valid.ndim != 2 or x_train.shape[1] != x_valid.shape[1]:
        raise ValueError(
            f"x_train and x_valid must be 2-D (examples, features) with the same number of features, got "
            f"{tuple(x_train.shape)} and {tuple(x_valid.shape)}. Flatten each image into one row."
        )
    if len(x_train) != len(y_train) or len(x_valid) != len(y_valid):
        raise ValueError("each x must have one label per row in its y; the lengths differ.")
    if len(x_train) == 0 or len(x_valid) == 0:
        raise ValueError("the training and validation sets both need at least one example.")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting.

    These matrices are tiny (64 x 64): waking extra threads costs more than the arithmetic, and when
    another program keeps a core busy, every step of a multi-threaded run waits for the thread on that
    core, so it ends up far slower than one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    *,
    lr: float,
    epochs: int = 10,
    batch_size: int = 64,
    hidden: int = 64,
    seed: int = 42,
) -> LRRun:
    """Train a one-hidden-layer network (features -> `hidden` ReLU units -> classes) with plain mini-batch SGD.

    x_* are float (n, features), already normalised; y_* are int64 class indices (n,). The weights start
    from the same seeded values whatever `lr` is, and the batches come in the same order, so runs differ
    only by the learning rate.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rates must be positive numbers, got {lr}. Try {DEFAULT_LRS[1]}.")
    if epochs < 1 or batch_size < 1 or hidden < 1:
        raise ValueError(f"epochs, batch size and hidden size must be at least 1, got {epochs}, {batch_size}, {hidden}.")
    g = torch.Generator().manual_seed(seed)
    n_classes = int(max(y_train.max(), y_valid.max())) + 1
    layers = torch.nn.Sequential(
        torch.nn.Linear(x_train.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
    )
    with torch.no_grad():  # PyTorch's default init range, drawn from our generator so runs are repeatable
        for layer in (layers[0], layers[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.SGD(layers.parameters(), lr=lr)

    def measure() -> tuple[float, float, float]:
        with torch.no_grad():
            logits = layers(x_valid)
            return (
                F.cross_entropy(layers(x_train), y_train).item(),
                F.cross_entropy(logits, y_valid).item(),
                (logits.argmax(dim=1) != y_valid).float().mean().item(),
            )

    run = LRRun(lr=lr, train_loss=[], valid_loss=[], valid_error=[])
    for epoch in range(epochs + 1):
        if epoch > 0:
            for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
                loss = F.cross_entropy(layers(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.batch_losses.append(loss.item())
        tl, vl, ve = measure()
        run.train_loss.append(tl)
        run.valid_loss.append(vl)
        run.valid_error.append(ve)
    return run


def lr_lesson(
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_valid: np.ndarray | torch.Tensor,
    y_valid: np.ndarray | torch.Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 10,
    batch_size: int = 64,
    hidden: int = 64,
    seed: int = 42,
    out: str | Path | None = None,
) -> LRResult:
    """Train with a too-high, a good and a too-low learning rate (`lrs`, in that order); plot to `out`.

    x_* are (n, features) floats, e.g. flattened images with pixels in [0, 1]; y_* are class indices.
    The inputs are normalised with the training set's mean and standard deviation first, so one set of
    learning rates suits pixels in [0, 1] or [0, 255] alike.
    """
    if len(lrs) != 3:
        raise ValueError(f"give three learning rates (too high, good, too low), got {len(lrs)}.")
    xt, xv = _tensor(x_train, torch.float32), _tensor(x_valid, torch.float32)
    yt, yv = _tensor(y_train, torch.int64), _tensor(y_valid, torch.int64)
    _check(xt, yt, xv, yv)
    mean, std = xt.mean(), xt.std().clamp_min(1e-8)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    with _one_thread():
        runs = [
            train_classifier(xt, yt, xv, yv, lr=lr, epochs=epochs, batch_size=batch_size, hidden=hidden, seed=seed)
            for lr in lrs
        ]
    result = LRResult(runs=runs, names=["too high", "good", "too low"], epochs=epochs)
    if out is not None:
        _plot(result, out)
    return result


def _plot(result: LRResult, out: str | Path) -> None:
    """Three panels: training loss per batch, validation loss per epoch, validation error rate per epoch."""
    # A bare Figure on an Agg canvas: files only, no window, and no pyplot state touched (calling a
    # lesson in a notebook leaves its inline plots alone, and nothing stays open afterwards).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = ["tab:red", "tab:green", "tab:blue"]
    fig = Figure(figsize=(15, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax_batch, ax_loss, ax_err = fig.subplots(1, 3)
    for name, run, color in zip(result.names, result.runs, colors):
        label = f"{name}: lr = {run.lr:g}"
        ax_batch.plot(range(1, len(run.batch_losses) + 1), run.batch_losses, color=color, lw=0.8, alpha=0.8, label=label)
        epochs = range(len(run.valid_loss))
        ax_loss.plot(epochs, run.valid_loss, "o-", color=color, ms=3)
        ax_err.plot(epochs, [100 * e for e in run.valid_error], "o-", color=color, ms=3)
    ax_batch.set_yscale("log")
    ax_batch.set_xlabel("step (one mini-batch)")
    ax_batch.set_ylabel("training loss of the batch (cross-entropy, log scale)")
    ax_batch.set_title("what the optimiser sees, batch by batch")
    ax_loss.set_xlabel("epoch (0 = before training)")
    ax_loss.set_ylabel("validation loss (cross-entropy)")
    ax_loss.set_title("validation loss after each epoch")
    ax_err.set_xlabel("epoch (0 = before training)")
    ax_err.set_ylabel("validation error rate (%)")
    ax_err.set_ylim(0, 100)
    ax_err.set_title("validation error rate after each epoch")
    for ax in (ax_batch, ax_loss, ax_err):
        ax.grid(alpha=0.3)
    # One legend for all three panels, above them, where it covers no curve.
    handles, labels = ax_batch.get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.93), frameon=False)
    for line in legend.get_lines():
        line.set_linewidth(2.5)  # the batch curves are thin; the legend's samples need not be
    fig.suptitle("Same model, same data, three learning rates")
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(out)
