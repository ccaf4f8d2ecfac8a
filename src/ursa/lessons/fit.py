"""Lesson: underfitting and overfitting, in a picture you can see at a glance.

The same noisy points, three models of growing flexibility (polynomials of degree 1, 4 and 15):

- degree 1, a straight line, is too stiff to follow the curve: wrong on training *and* validation points
  (*underfitting*);
- degree 4 follows the shape and ignores the noise: good on both;
- degree 15 bends to pass near every training point, noise included, and swings wildly in between:
  the best training error of the three and the worst validation error (*overfitting*).

The training error alone always prefers the most flexible model; only points the model never saw (the
validation set) reveal which one learned the curve rather than the noise. Each model here is fitted
exactly by least squares, which is where gradient descent on the same squared error would end up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["FitResult", "make_curve", "fit_lesson"]


@dataclass
class FitResult:
    """Numbers of one run of `fit_lesson`: per degree, mean squared error on train and validation points."""

    degrees: list[int]
    names: list[str]
    train_mse: list[float]
    valid_mse: list[float]

    columns = ("model", "polynomial degree", "train MSE", "valid MSE")

    def rows(self) -> list[list[str]]:
        """Table rows, one per model."""
        return [
            [name, str(d), f"{t:.4f}", f"{v:.4f}"]
            for name, d, t, v in zip(self.names, self.degrees, self.train_mse, self.valid_mse)
        ]

    @property
    def notice(self) -> str:
        """The one thing to see in this lesson."""
        best_train = self.degrees[int(np.argmin(self.train_mse))]
        best_valid = self.degrees[int(np.argmin(self.valid_mse))]
        return (
            f"Training error always favours the most flexible model (degree {best_train}); the validation points "
            f"pick degree {best_valid}, the one that learned the curve and not the noise."
        )


def make_curve(
    n_train: int = 18, n_valid: int = 40, *, noise: float = 0.25, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noisy samples of y = sin(pi * x): (x_train, y_train, x_valid, y_valid), all 1-D float64.

    Training x are spread evenly over [-1, 1] with a little jitter, and validation x fall between them:
    the question is how well a model fills the gaps, not how it guesses beyond the data (which a
    polynomial does badly whatever its degree).
    """
    if n_train < 2 or n_valid < 1:
        raise ValueError(f"need at least 2 training and 1 validation point, got {n_train} and {n_valid}.")
    rng = np.random.default_rng(seed)
    gap = 2.0 / (n_train - 1)
    x_train = np.clip(np.linspace(-1.0, 1.0, n_train) + rng.uniform(-0.4, 0.4, n_train) * gap, -1.0, 1.0)
    x_valid = rng.uniform(x_train.min(), x_train.max(), n_valid)
    y_train = np.sin(np.pi * x_train) + noise * rng.standard_normal(n_train)
    y_valid = np.sin(np.pi * x_valid) + noise * rng.standard_normal(n_valid)
    return x_train, y_train, x_valid, y_valid


def fit_lesson(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    *,
    degrees: Sequence[int] = (1, 4, 15),
    names: Sequence[str] = ("underfit", "good fit", "overfit"),
    out: str | Path | None = None,
) -> FitResult:
    """Fit one polynomial per degree to (x_train (n,), y_train (n,)) and score it on both sets; plot to `out`."""
    xt, yt = np.asarray(x_train, dtype=np.float64), np.asarray(y_train, dtype=np.float64)
    xv, yv = np.asarray(x_valid, dtype=np.float64), np.asarray(y_valid, dtype=np.float64)
    if xt.ndim != 1 or xt.shape != yt.shape or xv.ndim != 1 or xv.shape != yv.shape:
        raise ValueError("x and y must be 1-D arrays of the same length (one number per point).")
    if len(degrees) != len(names):
        raise ValueError(f"give one name per degree, got {len(degrees)} degrees and {len(names)} names.")
    if any(d < 0 or d >= len(xt) for d in degrees):
        raise ValueError(f"each degree must be between 0 and {len(xt) - 1} (the number of training points - 1), got {list(degrees)}.")
    # Polynomial.fit rescales x to [-1, 1] internally, which keeps degree 15 numerically sane.
    fits = [np.polynomial.Polynomial.fit(xt, yt, deg=d) for d in degrees]
    result = FitResult(
        degrees=list(degrees),
        names=list(names),
        train_mse=[float(np.mean((p(xt) - yt) ** 2)) for p in fits],
        valid_mse=[float(np.mean((p(xv) - yv) ** 2)) for p in fits],
    )
    if out is not None:
        _plot(xt, yt, xv, yv, fits, result, out)
    return result


def _plot(
    xt: np.ndarray,
    yt: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    fits: list[np.polynomial.Polynomial],
    result: FitResult,
    out: str | Path,
) -> None:
    """One panel per model: the curve, training points (filled) and validation points (hollow)."""
    # A bare Figure on an Agg canvas: files only, no window, and no pyplot state touched (calling a
    # lesson in a notebook leaves its inline plots alone, and nothing stays open afterwards).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = min(xt.min(), xv.min()), max(xt.max(), xv.max())
    grid = np.linspace(lo, hi, 400)
    span = max(yt.max(), yv.max()) - min(yt.min(), yv.min())
    ylim = (min(yt.min(), yv.min()) - 0.3 * span, max(yt.max(), yv.max()) + 0.3 * span)
    fig = Figure(figsize=(4.4 * len(fits), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(fits), sharey=True)
    for ax, poly, name, d, tr, va in zip(
        np.atleast_1d(axes), fits, result.names, result.degrees, result.train_mse, result.valid_mse
    ):
        ax.plot(grid, poly(grid), color="tab:red", lw=2, label=f"model: degree-{d} polynomial")
        ax.scatter(xt, yt, s=30, color="tab:blue", label="training points (fitted)", zorder=3)
        ax.scatter(xv, yv, s=30, facecolors="none", edgecolors="tab:orange", lw=1.5, label="validation points (held out)", zorder=3)
        ax.set_ylim(*ylim)  # the overfit curve shoots off; clip it so the points stay readable
        ax.set_title(f"{name} (degree {d})\ntrain MSE {tr:.4f}   valid MSE {va:.4f}")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("y")
    first.legend(loc="lower right", fontsize=8)
    fig.suptitle("Underfitting, a good fit and overfitting on the same noisy points")
    fig.tight_layout()
    fig.savefig(out)
