"""Lesson: how many epochs? Too few underfit, too many overfit, and the validation set tells them apart.

An epoch is one pass over the training set. Early on, training and validation loss fall together: the
model is still learning things that are true of digits in general (it is *underfitting*: train longer).
Given enough epochs, a model with many parameters and little data starts to learn the training set
itself, every smudge and every wrong label, by heart. Then the training loss keeps falling but the
validation loss turns and rises: the model is *overfitting*, and the extra epochs made it worse.

To make this show quickly the lesson uses a few hundred training images, a network with two wide hidden
layers, and 30% of the training labels swapped for a wrong class (real datasets have some of this; a
model that memorises them has learned noise). The validation labels stay clean, because validation is
there to measure what we want: the true class.

`epochs_lesson` trains once for many epochs and plots both losses and both error rates by epoch, marking
the epoch where validation loss was lowest.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EpochsResult", "add_label_noise", "epochs_lesson"]


@dataclass
class EpochsResult:
    """Numbers of one run of `epochs_lesson`; lists are per epoch, index 0 = before training.

    Losses are mean cross-entropy; errors are fractions misclassified. Training numbers are measured
    against the noisy labels the model was given, validation numbers against the clean labels.
    `best_epoch` is where validation loss was lowest; `flipped` how many training labels were changed.
    """

    train_loss: list[float]
    valid_loss: list[float]
    train_error: list[float]
    valid_error: list[float]
    best_epoch: int
    n_train: int
    flipped: int

    columns = ("epoch", "train loss", "valid loss", "train error (noisy labels)", "valid error")

    def rows(self) -> list[list[str]]:
        """Table rows: the first epoch, the best epoch (lowest validation loss) and the last."""
        last = len(self.valid_loss) - 1
        picks = [(1, "1 (underfit)"), (self.best_epoch, f"{self.best_epoch} (lowest valid loss)"), (last, f"{last} (overfit)")]
        return [
            [
                label,
                f"{self.train_loss[i]:.3f}",
                f"{self.valid_loss[i]:.3f}",
                f"{self.train_error[i]:.1%}",
                f"{self.valid_error[i]:.1%}",
            ]
            for i, label in picks
        ]

    @property
    def notice(self) -> str:
        """The one thing to see in this lesson."""
        b = self.best_epoch
        return (
            f"After epoch {b} the training loss keeps falling ({self.train_loss[b]:.2f} -> {self.train_loss[-1]:.2f}) "
            f"but the validation loss rises ({self.valid_loss[b]:.2f} -> {self.valid_loss[-1]:.2f}): the model is "
            f"memorising the {self.flipped} wrong labels. Only the validation set shows it."
        )


def add_label_noise(
    y: torch.Tensor, *, fraction: float, n_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of labels `y` (n,) with about `fraction` of them changed to a different class, and the mask (n,) of changed ones."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label noise must be a fraction in [0, 1), got {fraction}. Try 0.3 for 30%.")
    flip = torch.rand(len(y), generator=generator) < fraction
    # Adding 1..k-1 (mod k) always lands on a *different* class, uniformly.
    shift = torch.randint(1, n_classes, (len(y),), generator=generator)
    noisy = torch.where(flip, (y + shift) % n_classes, y)
    return noisy, flip


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting.

    The matrices are small: waking extra threads costs more than the arithmetic, and when another
    program keeps a core busy, every step of a multi-threaded run waits for the thread on that core, so
    it ends up far slower than one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def epochs_lesson(
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_valid: np.ndarray | torch.Tensor,
    y_valid: np.ndarray | torch.Tensor,
    *,
    epochs: int = 100,
    n_train: int | None = 300,
    noise: float = 0.3,
    hidden: int = 256,
    lr: float = 0.02,
    batch_size: int = 32,
    seed: int = 42,
    out: str | Path | None = None,
) -> EpochsResult:
    """Train a wide two-hidden-layer network for `epochs` epochs on few, noisy labels; plot to `out`.

    x_* are (n, features) floats, e.g. flattened images; y_* int class indices. Keeps a random
    `n_train` of the training examples (None: all), swaps a `noise` fraction of their labels for wrong ones,
    and trains with SGD (momentum 0.9, learning rate `lr`, mini-batches of `batch_size`).
    """
    xt = torch.as_tensor(np.asarray(x_train), dtype=torch.float32)
    xv = torch.as_tensor(np.asarray(x_valid), dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    yv = torch.as_tensor(np.asarray(y_valid), dtype=torch.int64)
    if xt.ndim != 2 or xv.ndim != 2 or xt.shape[1] != xv.shape[1]:
        raise ValueError(
            f"x_train and x_valid must be 2-D (examples, features) with the same number of features, got "
            f"{tuple(xt.shape)} and {tuple(xv.shape)}. Flatten each image into one row."
        )
    if len(xt) != len(yt) or len(xv) != len(yv) or len(xt) < 2 or len(xv) < 1:
        raise ValueError("each x needs one label per row, at least 2 training and 1 validation example.")
    if epochs < 2 or batch_size < 1 or hidden < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(
            f"need epochs >= 2, batch size >= 1, hidden >= 1 and a positive lr; got {epochs}, {batch_size}, {hidden}, {lr}."
        )
    g = torch.Generator().manual_seed(seed)
    if n_train is not None:
        if n_train < 2:
            raise ValueError(f"n_train must be at least 2, got {n_train}. Try 300.")
        # A random subset, not the first rows: datasets often come sorted by class, and the first few
        # hundred images of a sorted folder hold only two or three of the classes.
        keep = torch.randperm(len(xt), generator=g)[:n_train]
        xt, yt = xt[keep], yt[keep]
    n_classes = int(max(yt.max(), yv.max())) + 1
    yt, flipped = add_label_noise(yt, fraction=noise, n_classes=n_classes, generator=g)
    mean, std = xt.mean(), xt.std().clamp_min(1e-8)  # normalise with training statistics only
    xt, xv = (xt - mean) / std, (xv - mean) / std

    # Wide for the data: 256 * 256 weights in the middle for a few hundred images is plenty to memorise.
    model = torch.nn.Sequential(
        torch.nn.Linear(xt.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, n_classes),
    )
    with torch.no_grad():  # PyTorch's default init range, drawn from our generator so runs are repeatable
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    history: dict[str, list[float]] = {"train_loss": [], "valid_loss": [], "train_error": [], "valid_error": []}
    with _one_thread():
        for epoch in range(epochs + 1):
            if epoch > 0:
                for idx in torch.randperm(len(xt), generator=g).split(batch_size):
                    loss = F.cross_entropy(model(xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                for name, x, y in (("train", xt, yt), ("valid", xv, yv)):
                    logits = model(x)
                    history[f"{name}_loss"].append(F.cross_entropy(logits, y).item())
                    history[f"{name}_error"].append((logits.argmax(dim=1) != y).float().mean().item())
    valid = history["valid_loss"]
    result = EpochsResult(
        **history,
        best_epoch=min(range(1, len(valid)), key=valid.__getitem__),
        n_train=len(xt),
        flipped=int(flipped.sum()),
    )
    if out is not None:
        _plot(result, out)
    return result


def _plot(result: EpochsResult, out: str | Path) -> None:
    """Left: train and valid loss by epoch, with the under- and overfitting regions. Right: error rates."""
    # A bare Figure on an Agg canvas: files only, no window, and no pyplot state touched (calling a
    # lesson in a notebook leaves its inline plots alone, and nothing stays open afterwards).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = range(len(result.valid_loss))
    last, best = len(result.valid_loss) - 1, result.best_epoch
    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_err = fig.subplots(1, 2)
    for ax in (ax_loss, ax_err):
        ax.axvspan(0, best, color="tab:blue", alpha=0.07)
        ax.axvspan(best, last, color="tab:red", alpha=0.07)
        ax.axvline(best, color="gray", ls="--", lw=1, label=f"lowest valid loss (epoch {best})")
        ax.set_xlabel("epoch (one pass over the training set)")
        ax.set_xlim(0, last)
        ax.grid(alpha=0.3)
    ax_loss.plot(epochs, result.train_loss, color="tab:blue", label="training loss (noisy labels)")
    ax_loss.plot(epochs, result.valid_loss, color="tab:orange", label="validation loss (clean labels)")
    ax_loss.set_ylabel("loss (cross-entropy)")
    top = max(max(result.valid_loss), max(result.train_loss))
    ax_loss.set_ylim(0, 1.3 * top)  # headroom for the two region labels
    box = {"facecolor": "white", "alpha": 0.8, "edgecolor": "none"}
    # Region labels in axes coordinates, so they stay inside the plot wherever the best epoch falls.
    ax_loss.text(0.01, 0.98, "underfitting: both fall", transform=ax_loss.transAxes, ha="left", va="top", color="tab:blue", bbox=box)
    ax_loss.text(0.99, 0.98, "overfitting: train falls, valid rises", transform=ax_loss.transAxes, ha="right", va="top", color="tab:red", bbox=box)
    ax_loss.set_title("loss by epoch")
    ax_loss.legend(loc="lower right", fontsize=9)
    ax_err.plot(epochs, [100 * e for e in result.train_error], color="tab:blue", label="training error (vs. noisy labels)")
    ax_err.plot(epochs, [100 * e for e in result.valid_error], color="tab:orange", label="validation error")
    ax_err.set_ylabel("error rate (%)")
    ax_err.set_ylim(0, 100)
    ax_err.set_title("error rate by epoch (0% training error: wrong labels learnt by heart)", fontsize=10)
    ax_err.legend(loc="upper right", fontsize=9)
    fig.suptitle(
        f"{result.n_train} training images, {result.flipped} of them with a wrong label, a wide network, many epochs"
    )
    fig.tight_layout()
    fig.savefig(out)
