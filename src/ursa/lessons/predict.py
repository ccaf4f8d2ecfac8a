"""Lesson: what `predict` and `error_rate` really are.

An image classifier is a function: pixels in, one score per class out. Here that function is the
simplest there is, a linear layer (`logits = x @ W + b`), trained briefly with SGD (two epochs, so it
still makes a few mistakes worth looking at). Then:

- **probabilities**: softmax turns the scores of one image into positive numbers that add up to 1;
- **prediction**: the class with the highest probability, `argmax` (this is all `predict` does);
- **error rate**: the share of validation images whose prediction is not their label, i.e.
  `(preds != targets).float().mean()`, which is one minus accuracy.

`predict_lesson` does these three steps by hand on one validation batch, prints them, and draws the
probabilities of a few images next to the images themselves. The CLI checks the hand-computed error
rate against the library's metric.
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

__all__ = ["PredictResult", "predict_lesson"]


@dataclass
class PredictResult:
    """Numbers of one run of `predict_lesson`.

    `probs` (batch, classes) are softmax probabilities of one validation batch, `preds` (batch,) their
    argmax and `targets` (batch,) the labels; `error_rate` is computed by hand on that batch (a
    fraction) and `valid_error_rate` the same over the whole validation set. `shown` are the batch
    positions drawn in the picture.
    """

    classes: list[str]
    probs: torch.Tensor = field(repr=False)
    preds: torch.Tensor = field(repr=False)
    targets: torch.Tensor = field(repr=False)
    error_rate: float
    valid_error_rate: float
    shown: list[int] = field(default_factory=list)

    columns = ("batch row", "probabilities (top 3)", "argmax = prediction", "label", "right?")

    def rows(self) -> list[list[str]]:
        """Table rows for the images shown in the picture."""
        out = []
        for i in self.shown:
            top = torch.topk(self.probs[i], k=min(3, self.probs.shape[1]))
            top3 = ", ".join(f"{self.classes[int(c)]} {p:.2f}" for p, c in zip(top.values.tolist(), top.indices))
            pred, true = int(self.preds[i]), int(self.targets[i])
            out.append([str(i), top3, self.classes[pred], self.classes[true], "yes" if pred == true else "NO"])
        return out

    @property
    def wrong(self) -> int:
        """How many images of the batch are misclassified."""
        return int((self.preds != self.targets).sum())

    @property
    def notice(self) -> str:
        """The one thing to see in this lesson."""
        n = len(self.targets)
        return (
            f"predict = argmax of the probabilities; error rate = wrong / total = {self.wrong}/{n} = "
            f"{self.error_rate:.1%} on this batch ({self.valid_error_rate:.1%} over the whole validation set)."
        )


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting: tiny matrices run faster without thread wake-ups."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict_lesson(
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_valid: np.ndarray | torch.Tensor,
    y_valid: np.ndarray | torch.Tensor,
    *,
    classes: Sequence[str] | None = None,
    image_shape: tuple[int, int] | None = None,
    epochs: int = 2,
    lr: float = 0.1,
    batch_size: int = 64,
    show: int = 6,
    seed: int = 42,
    out: str | Path | None = None,
) -> PredictResult:
    """Train a linear classifier, then predict one validation batch of `batch_size` by hand; plot to `out`.

    x_* are (n, features) floats (flattened images); y_* int class indices; `classes` their names
    (default "0", "1", ...). `image_shape` (height, width) lets the picture show each image beside its
    probabilities. `show` images of the batch are drawn and listed.
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
    if len(xt) != len(yt) or len(xv) != len(yv) or len(xt) == 0 or len(xv) == 0:
        raise ValueError("each x needs one label per row, and both sets need at least one example.")
    if epochs < 1 or batch_size < 1 or show < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"need epochs, batch size and show >= 1 and a positive lr; got {epochs}, {batch_size}, {show}, {lr}.")
    n_classes = int(max(yt.max(), yv.max())) + 1
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise ValueError(f"got {len(names)} class names for {n_classes} classes; give one name per class.")
    if image_shape is not None and image_shape[0] * image_shape[1] != xt.shape[1]:
        raise ValueError(f"image_shape {tuple(image_shape)} does not hold {xt.shape[1]} pixels; pass (height, width) of the images.")

    g = torch.Generator().manual_seed(seed)
    mean, std = xt.mean(), xt.std().clamp_min(1e-8)
    model = torch.nn.Linear(xt.shape[1], len(names))  # the whole classifier: one score per class
    with torch.no_grad():
        model.weight.zero_()  # a linear model needs no random start; zeros = "no opinion yet"
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with _one_thread():
        for _ in range(epochs):
            for idx in torch.randperm(len(xt), generator=g).split(batch_size):
                loss = F.cross_entropy(model((xt[idx] - mean) / std), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

        with torch.no_grad():
            # One validation batch, as a data loader would hand it over.
            batch = torch.randperm(len(xv), generator=g)[:batch_size]
            logits = model((xv[batch] - mean) / std)  # (batch, classes): raw scores, any size, any sign
            probs = logits.softmax(dim=1)  # exp(score) / sum(exp(scores)): positive, each row sums to 1
            preds = probs.argmax(dim=1)  # the prediction: the most probable class
            targets = yv[batch]
            error_rate = (preds != targets).float().mean().item()  # wrong / total
            all_preds = model((xv - mean) / std).argmax(dim=1)
            valid_error_rate = (all_preds != yv).float().mean().item()

    shown = list(range(min(show, len(batch))))
    wrong = [i for i in range(len(batch)) if preds[i] != targets[i]]
    if wrong and not any(i in wrong for i in shown):
        shown[-1] = wrong[0]  # a mistake teaches more than another right answer: show one if there is one
    result = PredictResult(
        classes=names,
        probs=probs,
        preds=preds,
        targets=targets,
        error_rate=error_rate,
        valid_error_rate=valid_error_rate,
        shown=shown,
    )
    if out is not None:
        images = xv[batch].reshape(len(batch), *image_shape).numpy() if image_shape is not None else None
        _plot(result, images, out)
    return result


def _plot(result: PredictResult, images: np.ndarray | None, out: str | Path) -> None:
    """One column per shown image: the image (if known) above a bar chart of its class probabilities."""
    # A bare Figure on an Agg canvas: files only, no window, and no pyplot state touched (calling a
    # lesson in a notebook leaves its inline plots alone, and nothing stays open afterwards).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(result.shown)
    n_rows = 2 if images is not None else 1
    fig = Figure(figsize=(2.3 * k + 0.8, 2.4 * n_rows + 1.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, k, squeeze=False, gridspec_kw={"height_ratios": [1, 1.4] if n_rows == 2 else [1]})
    positions = np.arange(len(result.classes))
    for col, i in enumerate(result.shown):
        pred, true = int(result.preds[i]), int(result.targets[i])
        ok = pred == true
        if images is not None:
            ax_img = axes[0, col]
            ax_img.imshow(images[i], cmap="gray")
            ax_img.set_xticks([])
            ax_img.set_yticks([])
            ax_img.set_title(f"label: {result.classes[true]}", fontsize=10)
        ax = axes[n_rows - 1, col]
        colors = ["lightgray"] * len(result.classes)
        colors[pred] = "tab:green" if ok else "tab:red"
        if not ok:
            colors[true] = "tab:blue"  # where the probability should have been
        ax.barh(positions, result.probs[i].numpy(), color=colors)
        ax.set_yticks(positions, result.classes if col == 0 else [""] * len(positions), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
        verdict = "right" if ok else "WRONG (label in blue)"
        ax.set_title(
            f"argmax: {result.classes[pred]} ({result.probs[i, pred]:.0%})\n{verdict}",
            fontsize=10, color="tab:green" if ok else "tab:red",
        )
    axes[n_rows - 1, 0].set_ylabel("class")
    fig.suptitle(
        f"predict = argmax of the softmax probabilities; error rate on this batch = "
        f"{result.wrong}/{len(result.targets)} = {result.error_rate:.1%}"
    )
    fig.tight_layout()
    fig.savefig(out)
