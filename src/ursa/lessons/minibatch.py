"""Lesson: mini-batches make gradient descent cheap.

Plain gradient descent (`sgd.py`) computes the loss over every example before each step. With 100,000
examples that is a lot of arithmetic for one small step. Stochastic gradient descent instead takes each
step from a small random *mini-batch* (64 examples here): the gradient is noisier, but it points roughly
the same way and costs about a thousandth as much.

`minibatch_lesson` trains the same linear model both ways for the same number of steps and plots the
loss over all the data against steps (the full-batch run is a bit better per step) and against seconds
(the mini-batch run gets there many times sooner). That trade is why every deep-learning library trains
on mini-batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["MinibatchResult", "make_regression", "run_gd", "minibatch_lesson"]


@dataclass
class MinibatchResult:
    """Numbers of one run of `minibatch_lesson`, per method ("full batch", "mini-batch").

    `losses[m][t]`: mean squared error over all the data after t steps; `seconds[m][t]`: training time
    (excluding the loss measurement) up to step t. `best_loss` is the lowest loss any model of this
    form can reach (least squares). `time_to_target[m]` is the seconds until the loss is within 10% of
    `best_loss` (NaN if never).
    """

    n: int
    batch_size: int
    best_loss: float
    losses: dict[str, list[float]] = field(repr=False)
    seconds: dict[str, list[float]] = field(repr=False)
    time_to_target: dict[str, float]
    steps_to_target: dict[str, float]

    columns = ("method", "examples / step", "final loss", "steps to near-best", "seconds to near-best", "seconds / step")

    def rows(self) -> list[list[str]]:
        """Table rows, one per method."""
        out = []
        for name in self.losses:
            per_step = self.seconds[name][-1] / max(1, len(self.losses[name]) - 1)
            size = self.n if name == "full batch" else self.batch_size
            out.append(
                [
                    name,
                    f"{size:,}",
                    f"{self.losses[name][-1]:.4f}",
                    f"{self.steps_to_target[name]:.0f}",
                    f"{self.time_to_target[name]:.3f}",
                    f"{per_step * 1000:.2f} ms",
                ]
            )
        return out

    @property
    def notice(self) -> str:
        """The one thing to see in this lesson."""
        full, mini = self.time_to_target["full batch"], self.time_to_target["mini-batch"]
        speed = f"{full / mini:.0f}x sooner" if mini > 0 and full == full else "far sooner"
        return (
            f"Per step the two runs are alike, but a step on {self.batch_size} examples costs a fraction of one "
            f"on {self.n:,}: the mini-batch run reaches a near-best loss {speed} in seconds."
        )


def make_regression(
    n: int = 100_000, *, d: int = 50, noise: float = 0.5, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear-regression dataset: x (n, d) standard normal, y (n,) = x @ w + noise * N(0, 1), w random."""
    if n < 2 or d < 1:
        raise ValueError(f"need at least 2 examples and 1 feature, got n={n}, d={d}. Try the defaults.")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = x @ w + noise * torch.randn(n, generator=g)
    return x, y


def run_gd(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int | None,
    lr: float = 0.05,
    steps: int = 200,
    seed: int = 42,
) -> tuple[list[float], list[float]]:
    """Train y_hat = x @ w from w = 0 with `steps` updates; returns (losses (steps+1,), seconds (steps+1,)).

    `batch_size=None` takes each step on all n examples (plain gradient descent); otherwise on a random
    mini-batch of `batch_size`, drawn by walking through a fresh shuffle of the data each epoch. The loss
    reported is over all the data, measured with the clock stopped so both methods are timed fairly.
    """
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr}. Try 0.05.")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}. Try 200.")
    n = x.shape[0]
    if batch_size is not None and not 1 <= batch_size <= n:
        raise ValueError(f"batch size must be between 1 and the number of examples ({n}), got {batch_size}.")
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    order = torch.randperm(n, generator=g)
    cursor = 0
    with torch.no_grad():
        losses = [((x @ w - y) ** 2).mean().item()]
    seconds = [0.0]
    elapsed = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        if batch_size is None:
            xb, yb = x, y
        else:
            if cursor + batch_size > n:  # a new epoch: a new random order
                order, cursor = torch.randperm(n, generator=g), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            xb, yb = x[idx], y[idx]
        loss = ((xb @ w - yb) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            w -= lr * w.grad
            w.grad.zero_()
        elapsed += time.perf_counter() - start
        with torch.no_grad():  # measuring progress is not part of training: off the clock
            losses.append(((x @ w - y) ** 2).mean().item())
        seconds.append(elapsed)
    return losses, seconds


def _first_below(values: list[float], target: float) -> int | None:
    return next((i for i, v in enumerate(values) if v <= target), None)


def minibatch_lesson(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 64,
    lr: float = 0.05,
    steps: int = 200,
    seed: int = 42,
    out: str | Path | None = None,
) -> MinibatchResult:
    """Full-batch vs mini-batch gradient descent on (x (n, d), y (n,)); plot to `out` (PNG).

    Both runs take `steps` updates with learning rate `lr` from the same start.
    """
    best_w = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    best = ((x @ best_w - y) ** 2).mean().item()
    target = 1.1 * best
    losses: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for name, size in (("full batch", None), ("mini-batch", batch_size)):
        losses[name], seconds[name] = run_gd(x, y, batch_size=size, lr=lr, steps=steps, seed=seed)
    steps_to: dict[str, float] = {}
    time_to: dict[str, float] = {}
    for name in losses:
        i = _first_below(losses[name], target)
        steps_to[name] = float("nan") if i is None else float(i)
        time_to[name] = float("nan") if i is None else seconds[name][i]
    result = MinibatchResult(
        n=x.shape[0],
        batch_size=batch_size,
        best_loss=best,
        losses=losses,
        seconds=seconds,
        time_to_target=time_to,
        steps_to_target=steps_to,
    )
    if out is not None:
        _plot(result, out)
    return result


def _plot(result: MinibatchResult, out: str | Path) -> None:
    """Left: loss against steps. Right: loss against seconds of training (log time axis)."""
    # A bare Figure on an Agg canvas: files only, no window, and no pyplot state touched (calling a
    # lesson in a notebook leaves its inline plots alone, and nothing stays open afterwards).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    colors = {"full batch": "tab:blue", "mini-batch": "tab:orange"}
    labels = {"full batch": f"full batch ({result.n:,} per step)", "mini-batch": f"mini-batch ({result.batch_size} per step)"}
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_steps, ax_time = fig.subplots(1, 2)
    for name, loss in result.losses.items():
        ax_steps.plot(range(len(loss)), loss, color=colors[name], label=labels[name])
        # Step 0 takes no time; start the log-time axis at the first step.
        ax_time.plot(result.seconds[name][1:], loss[1:], color=colors[name], label=labels[name])
    for ax in (ax_steps, ax_time):
        ax.axhline(result.best_loss, color="gray", ls="--", lw=1, label="best possible (least squares)")
        ax.set_yscale("log")
        # Plain numbers at 1, 2, 5 x 10^k: "0.3" reads more easily than "3 x 10^-1".
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("loss over all the data (MSE, log scale)")
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    ax_steps.set_xlabel("step (one parameter update)")
    ax_steps.set_title("per step: about the same progress")
    ax_time.set_xscale("log")
    ax_time.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax_time.xaxis.set_minor_formatter(NullFormatter())
    ax_time.set_xlabel("seconds of training (log scale)")
    ax_time.set_title("per second: mini-batches win by far")
    fig.suptitle("Full-batch gradient descent vs mini-batch SGD on the same linear model")
    fig.tight_layout()
    fig.savefig(out)
