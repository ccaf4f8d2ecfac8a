"""Every plot Ursa draws. The only module that imports matplotlib.

Each function returns the Figure and, given `out`, also writes a PNG and closes the figure so long
runs do not pile figures up in memory. In a Jupyter notebook (the inline backend) a plot is shown the
moment it is drawn, once, and None is returned, as fastai's plots do: a returned Figure would be shown
a second time as the cell's value, and several plots in one cell would pile up at its end.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "widget", "ipympl")):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_losses", "plot_lr_find", "image_grid", "show_batch", "finish", "plot_confusion"]


def _inline() -> bool:
    """True inside a Jupyter kernel drawing with the inline backend."""
    return "ipykernel" in sys.modules and "inline" in matplotlib.get_backend().lower()


def finish(fig: Any, out: str | Path | None) -> Any:
    """Save `fig` to `out` (PNG, atomic) and close it; return the figure (None in a notebook: shown now)."""
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(out)
    if _inline():
        from IPython.display import display

        display(fig)
        plt.close(fig)
        return None
    if out is not None:
        plt.close(fig)
    return fig


def plot_losses(batch_losses: Sequence[float], rows: Sequence[dict[str, Any]], *, out: str | Path | None = None) -> Any:
    """Training loss per batch (light) and its running mean, validation loss and error rate per epoch.

    Epoch i's batches are spread over (i - 1, i]; each row may say how many batches it had
    (`batches`; 0 for a head fitted in one solve), else the batches are shared out evenly.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    b = np.asarray(batch_losses, float)
    counts = [r.get("batches") for r in rows]
    if any(c is None for c in counts):
        counts = [len(b) // max(1, len(rows))] * len(rows)
    xs: list[float] = []
    for i, n in enumerate(counts):
        xs.extend(i + (np.arange(1, int(n) + 1) / int(n)) if n else [])
    x = np.asarray(xs[: len(b)])
    b = b[: len(x)]
    if len(b):
        ax.plot(x, b, color="tab:blue", alpha=0.25, lw=0.8)
        k = max(1, min(len(b), int(np.median([c for c in counts if c]) if any(counts) else 1)))
        run = np.convolve(b, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], run, color="tab:blue", label="train loss")
    if rows:
        ep = np.arange(1, len(rows) + 1)
        tl = [r.get("train_loss", np.nan) if not r.get("batches", 1) else np.nan for r in rows]
        if not all(np.isnan(tl)):
            ax.plot(ep, tl, "D", color="tab:blue", ms=6, label="train loss (fitted head)")
        ax.plot(ep, [r.get("valid_loss", np.nan) for r in rows], "o-", color="tab:orange", label="valid loss")
        ax2 = ax.twinx()
        ax2.plot(ep, [r.get("error_rate", np.nan) for r in rows], "s--", color="tab:green", label="error rate", ms=4)
        ax2.set_ylabel("error rate")
        ax2.set_ylim(bottom=0)
        stages = [r.get("stage") for r in rows]
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i + 0.5, color="grey", ls=":", lw=1)
                ax.text(i + 0.6, ax.get_ylim()[1] * 0.95, str(stages[i]), fontsize=8, color="grey", va="top")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower left" if len(rows) == 1 else "upper right", fontsize=8)
        ax.set_xlim(0, len(rows) + 0.3)
        top = np.nanmax([*(r.get("valid_loss", np.nan) for r in rows), *(b if len(b) else [np.nan]), *tl])
        if np.isfinite(top):
            ax.set_ylim(0, top * 1.3)
        ax2.set_ylim(0, max(0.05, np.nanmax([r.get("error_rate", np.nan) for r in rows] or [0.05]) * 1.3))
        last = rows[-1]
        ax.set_title(f"Training and validation loss (final error rate {last.get('error_rate', float('nan')):.2%})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (cross-entropy)")
    ax.set_ylim(bottom=0)
    if not rows:
        ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    return finish(fig, out)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: Any, *, out: str | Path | None = None) -> Any:
    """Smoothed loss against learning rate (log x axis), with the suggested learning rates marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss (smoothed)")
    lrs_a, l = np.asarray(lrs), np.asarray(losses)
    for name, color, marker in (("valley", "tab:red", "o"), ("steep", "tab:green", "^"), ("minimum", "tab:purple", "v")):
        lr = getattr(suggestion, name)
        y = float(np.interp(np.log10(lr), np.log10(lrs_a), l))
        ax.plot([lr], [y], marker=marker, color=color, ms=9, ls="none", label=f"{name}: {lr:.1e}")
    lo, hi = float(np.min(l)), float(np.percentile(l, 90))
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    ax.legend(title="suggested (valley is the default)")
    ax.set_title("Learning rate finder")
    ax.grid(alpha=0.3, which="both")
    return finish(fig, out)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], *, ncols: int | None = None, suptitle: str | None = None, title_colors: Sequence[str] | None = None, figsize: tuple[float, float] | None = None, out: str | Path | None = None) -> Any:
    """Images (H, W, 3) in [0, 1] or uint8 in a grid, one title each; `figsize` inches (default 2.4 x 2.6 per image)."""
    return finish(_grid(images, titles, ncols=ncols, suptitle=suptitle, title_colors=title_colors, figsize=figsize), out)


def _grid(images: Sequence[np.ndarray], titles: Sequence[str], *, ncols: int | None, suptitle: str | None, title_colors: Sequence[str] | None = None, figsize: tuple[float, float] | None = None) -> Any:
    n = len(images)
    ncols = ncols or min(n, max(1, math.ceil(math.sqrt(n))))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.6 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            ax.set_title(titles[i], fontsize=9, color=(title_colors[i] if title_colors else "black"))
    if suptitle:
        fig.suptitle(suptitle)
    if figsize is not None:
        fig.set_size_inches(*figsize)
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, classes: Sequence[str], *, normalize: bool = False, title: str = "Confusion matrix", figsize: tuple[float, float] | None = None, out: str | Path | None = None) -> Any:
    """Confusion matrix (n_classes, n_classes) counts, rows actual and columns predicted, numbers in cells.

    `normalize` shows each row as shares of that class (recall on the diagonal) instead of counts.
    """
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.clip(cm.sum(1, keepdims=True), 1, None) if normalize else cm
    n = len(classes)
    side = min(14.0, max(4.0, 0.55 * n + 2.5))
    fig, ax = plt.subplots(figsize=figsize or (side, side))
    ax.imshow(shown, cmap="Blues", vmin=0)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    hi = shown.max() if shown.size else 0
    if n <= 30:
        for i in range(n):
            for j in range(n):
                v = shown[i, j]
                txt = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8 if n > 12 else 10, color="white" if v > hi / 2 else "black")
    fig.tight_layout()
    return finish(fig, out)


def show_batch(dls: Any, n: int = 9, *, valid: bool = False, ncols: int | None = None, figsize: tuple[float, float] | None = None, out: str | Path | None = None) -> Any:
    """A grid of `n` images of a DataBunch (augmented training images by default) with their labels,
    `ncols` to a row (default: a square grid), the figure `figsize` inches (default: by the grid)."""
    imgs, titles, caption = dls.sample_batch(n, valid=valid)
    return finish(_grid(imgs, titles, ncols=min(ncols, len(imgs)) if ncols and imgs else None, suptitle=caption, figsize=figsize), out)
