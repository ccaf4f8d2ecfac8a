"""Lesson: gradient descent from scratch on the simplest model there is, y = x @ a.

The recipe every neural network is trained with, written out by hand:

1. a model with parameters: here `y_hat = x @ a`, a straight line (x has a column of ones, so `a` holds
   the slope and the intercept);
2. a loss that says how wrong the model is: the mean squared error;
3. the gradient of the loss with respect to the parameters (autograd computes it with `loss.backward()`;
   `mse_grad` writes the same formula out by hand so you can check it);
4. a step downhill, `a -= lr * grad`, done under `torch.no_grad()` because the step itself is not part of
   the model, and then the gradient is zeroed because `backward()` adds to whatever is already there.

Repeat, and the line fits itself to the noisy points. `sgd_lesson` does this and saves the animation
(GIF, and HTML for notebooks) with the loss curve beside it.

Every step here uses all 100 points (plain gradient descent); `minibatch.py` shows why real training
uses small random batches instead, which is what makes it *stochastic*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["SGDResult", "make_line", "mse", "mse_grad", "fit_line", "sgd_lesson"]


@dataclass
class SGDResult:
    """Numbers of one run of `sgd_lesson`.

    `a_true`, `a_fitted`, `a_best` are (slope, intercept); `a_best` is the exact least-squares answer
    for these noisy points, which gradient descent should reach. `losses[t]` is the MSE after t steps
    (length epochs + 1), `params[t]` the (slope, intercept) after t steps.
    """

    a_true: tuple[float, float]
    a_fitted: tuple[float, float]
    a_best: tuple[float, float]
    losses: list[float]
    params: list[tuple[float, float]] = field(repr=False)
    lr: float = 0.1
    epochs: int = 100

    columns = ("", "slope", "intercept", "MSE")

    def rows(self) -> list[list[str]]:
        """Table rows: the true parameters, where gradient descent started and ended, and the exact best fit."""
        first, last = self.losses[0], self.losses[-1]
        return [
            ["true (used to make the data)", f"{self.a_true[0]:.3f}", f"{self.a_true[1]:.3f}", ""],
            ["start (step 0)", f"{self.params[0][0]:.3f}", f"{self.params[0][1]:.3f}", f"{first:.4f}"],
            [f"fitted (step {self.epochs})", f"{self.a_fitted[0]:.3f}", f"{self.a_fitted[1]:.3f}", f"{last:.4f}"],
            ["best possible (least squares)", f"{self.a_best[0]:.3f}", f"{self.a_best[1]:.3f}", ""],
        ]

    @property
    def notice(self) -> str:
        """The one thing to see in this lesson."""
        return (
            f"From a bad guess, {self.epochs} small steps downhill (lr={self.lr:g}) bring the line to the best fit; "
            "it lands near, not on, the true line, because the points are noisy."
        )


def make_line(
    n: int = 100, *, a: Sequence[float] = (3.0, 2.0), noise: float = 0.5, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy points on a line: (x (n, 2) with x[:, 1] == 1, y (n,), a_true (2,)).

    x[:, 0] is uniform in [-1, 1]; y = x @ a + noise * N(0, 1). The noise has mean zero, so the best fit
    is close to `a` (a uniform [0, 1) noise would shift the intercept by 0.5).
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 points to fit a line, got {n}. Try the default, 100.")
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 2)
    x[:, 0].uniform_(-1.0, 1.0, generator=g)
    a_true = torch.tensor([float(v) for v in a])
    y = x @ a_true + noise * torch.randn(n, generator=g)
    return x, y, a_true


def mse(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error, a scalar tensor: mean((y_hat - y)^2) over the n points."""
    return ((y_hat - y) ** 2).mean()


def mse_grad(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The gradient of mse(x @ a, y) with respect to `a`, by hand: (2 / n) * x.T @ (x @ a - y), shape (2,).

    From the chain rule: d/da of mean((x@a - y)^2) = mean(2 * (x@a - y) * x) over the n rows.
    """
    return 2.0 / x.shape[0] * (x.T @ (x @ a - y))


def fit_line(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 0.1,
    epochs: int = 100,
    a0: Sequence[float] = (-1.0, 1.0),
) -> tuple[torch.Tensor, list[float], list[tuple[float, float]]]:
    """Gradient descent on mse(x @ a, y) from `a0`: (fitted a (2,), losses (epochs+1,), params (epochs+1,)).

    `losses[t]` and `params[t]` are the loss and parameters after t steps (t = 0 is the starting guess).
    """
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr}. Try 0.1.")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}. Try 100.")
    a = torch.nn.Parameter(torch.tensor([float(v) for v in a0]))
    losses: list[float] = []
    params: list[tuple[float, float]] = []
    for _ in range(epochs):
        y_hat = x @ a
        loss = mse(y_hat, y)
        losses.append(loss.item())
        params.append((a[0].item(), a[1].item()))
        loss.backward()  # fills a.grad with d loss / d a
        with torch.no_grad():  # the update is bookkeeping, not part of the model: keep it out of the graph
            a -= lr * a.grad
            a.grad.zero_()  # backward() accumulates; without this every step would reuse old gradients
    with torch.no_grad():
        losses.append(mse(x @ a, y).item())
        params.append((a[0].item(), a[1].item()))
    return a.detach(), losses, params


def sgd_lesson(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    a_true: Sequence[float] | None = None,
    lr: float = 0.1,
    epochs: int = 100,
    a0: Sequence[float] = (-1.0, 1.0),
    out: str | Path | None = None,
    html: str | Path | None = None,
    fps: int = 15,
) -> SGDResult:
    """Fit a line to (x (n, 2), y (n,)) by gradient descent; write the animation to `out` (GIF) and `html`.

    `a_true` is the (slope, intercept) used to make the data, drawn as a dashed line and reported next to the
    fitted one. One animation frame per step (every k-th step beyond 100 steps), at `fps` frames per second.
    """
    a, losses, params = fit_line(x, y, lr=lr, epochs=epochs, a0=a0)
    # The exact minimiser of the same loss, to compare gradient descent's answer with.
    best = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    truth = (float(a_true[0]), float(a_true[1])) if a_true is not None else (float("nan"), float("nan"))
    result = SGDResult(
        a_true=truth,
        a_fitted=(a[0].item(), a[1].item()),
        a_best=(best[0].item(), best[1].item()),
        losses=losses,
        params=params,
        lr=lr,
        epochs=epochs,
    )
    if out is not None or html is not None:
        _animate(x, y, result, out=out, html=html, fps=fps)
    return result


def _animate(
    x: torch.Tensor,
    y: torch.Tensor,
    result: SGDResult,
    *,
    out: str | Path | None,
    html: str | Path | None,
    fps: int,
    max_frames: int = 60,
) -> None:
    """Two panels: the points with the line after step t, and the loss curve up to step t."""
    # A bare Figure on an Agg canvas: files only, no window, and no pyplot state touched (calling a
    # lesson in a notebook leaves its inline plots alone, and nothing stays open afterwards).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.animation import HTMLWriter, PillowWriter
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    xs = x[:, 0].numpy()
    ys = y.numpy()
    grid = torch.tensor([xs.min(), xs.max()])
    steps = len(result.losses)
    stride = max(1, -(-steps // max_frames))  # a bounded number of frames keeps the files small and quick
    frames = list(range(0, steps, stride))
    if frames[-1] != steps - 1:
        frames.append(steps - 1)

    dpi = 72
    fig = Figure(figsize=(10, 4), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_fit, ax_loss = fig.subplots(1, 2)
    ax_fit.scatter(xs, ys, s=14, color="tab:blue", alpha=0.7, label="data: y = x@a + noise")
    if result.a_true[0] == result.a_true[0]:  # not NaN: the true line is known
        ax_fit.plot(grid, grid * result.a_true[0] + result.a_true[1], "--", color="gray", label="true line")
    (line,) = ax_fit.plot([], [], color="tab:red", lw=2.5, label="model: y_hat = x@a")
    ax_fit.set_ylim(float(ys.min()) - 1.0, float(ys.max()) + 1.0)  # fixed, so the frame does not jump
    ax_fit.set_xlabel("x (feature; x also has a column of ones)")
    ax_fit.set_ylabel("y")
    ax_fit.legend(loc="upper left", fontsize=9)
    title = ax_fit.set_title("step 0: slope 0.00, intercept 0.00")

    ax_loss.plot(range(steps), result.losses, color="lightgray", lw=1, label="whole run")
    (curve,) = ax_loss.plot([], [], color="tab:red", lw=2, label="so far")
    (dot,) = ax_loss.plot([], [], "o", color="tab:red")
    ax_loss.set_yscale("log")
    # Plain numbers at 1, 2, 5 x 10^k: a learner reads "0.2" more easily than "2 x 10^-1".
    ax_loss.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax_loss.yaxis.set_minor_formatter(NullFormatter())
    ax_loss.set_xlabel("step (one gradient-descent update)")
    ax_loss.set_ylabel("loss: mean squared error (log scale)")
    ax_loss.set_title(f"the loss falls as the line fits (lr = {result.lr:g})")
    ax_loss.legend(loc="upper right", fontsize=9)
    fig.tight_layout()

    # Draw everything that does not move once, then per frame restore it and draw only the moving
    # artists (blitting): laying out and drawing axes, ticks and text again for every frame would cost far
    # more than the few artists that move.
    moving = (line, title, curve, dot)
    for artist in moving:
        artist.set_animated(True)
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    images: list[np.ndarray] = []
    for t in frames:
        slope, intercept = result.params[t]
        line.set_data(grid, grid * slope + intercept)
        title.set_text(f"step {t}: slope {slope:.2f}, intercept {intercept:.2f}")
        curve.set_data(range(t + 1), result.losses[: t + 1])
        dot.set_data([t], [result.losses[t]])
        fig.canvas.restore_region(background)
        for artist in moving:
            artist.axes.draw_artist(artist)
        images.append(np.asarray(fig.canvas.buffer_rgba()).copy())

    # Play the frames back through matplotlib's writers: PillowWriter for the GIF and HTMLWriter with
    # embedded frames (what FuncAnimation.to_jshtml uses) for a page that plays inline in a notebook.
    height, width = images[0].shape[:2]
    player = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(player)
    screen = player.add_axes((0.0, 0.0, 1.0, 1.0))
    screen.set_axis_off()
    shown = screen.imshow(images[0], interpolation="none", aspect="auto")
    writers: list[tuple[object, str]] = []
    if out is not None:
        writers.append((PillowWriter(fps=fps), str(out)))
    if html is not None:
        writers.append((HTMLWriter(fps=fps, embed_frames=True, default_mode="once"), str(html)))
    for writer, path in writers:
        with writer.saving(player, path, dpi=dpi):  # type: ignore[attr-defined]
            for image in images:
                shown.set_data(image)
                writer.grab_frame()  # type: ignore[attr-defined]
