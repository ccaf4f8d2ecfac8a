"""What the model gets wrong on the validation set: confusion matrix, most confused pairs, top losses, per-class metrics.

`ClassificationInterpretation.from_run("runs/bears")` reads the run's `predictions.csv` (validation
probabilities written by `ursa train`), so it needs no model and no backbone pass;
`ClassificationInterpretation.from_learner(learn)` takes a Learner's predictions on its validation set,
with the image files behind them. The plotting methods return matplotlib Figures (shown inline in
Jupyter) and also write PNGs when given `out`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ursa.errors import BadImageError, InterpretError
from ursa.imageio import decode_image

__all__ = ["ClassificationInterpretation", "ClassMetrics"]


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall and F1 of one class on the validation set, and its number of images."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


class ClassificationInterpretation:
    """Validation predictions of a classifier and the views a person reads to see what goes wrong.

    `probs` (n, n_classes) predicted probabilities, `targets` (n,) class indices, `names` the image paths
    relative to `root` (needed only for `plot_top_losses`).
    """

    def __init__(self, probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], *, names: Sequence[str] | None = None, root: str | Path | None = None):
        self.probs = np.asarray(probs, dtype=np.float64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        if self.probs.ndim != 2 or self.probs.shape != (len(self.targets), len(self.classes)):
            raise InterpretError(f"probabilities of shape {self.probs.shape} do not fit {len(self.targets)} targets and {len(self.classes)} classes.")
        self.names = list(names) if names is not None else None
        self.root = Path(root) if root is not None else None
        self.preds = self.probs.argmax(1) if len(self.targets) else np.zeros(0, np.int64)
        # cross-entropy of each image under the model, in nats
        self.losses = -np.log(np.clip(self.probs[np.arange(len(self.targets)), self.targets], 1e-12, None))
        self.run_dir: Path | None = None  # set by from_run
        self.learn: Any = None  # set by from_learner

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path) -> "ClassificationInterpretation":
        """Read `run_dir/predictions.csv` and `config.json` (written by `ursa train`)."""
        run = Path(run_dir)
        pred = run / "predictions.csv"
        if not pred.is_file():
            raise InterpretError(f"{pred} does not exist. Pass a run folder written by `ursa train DATA --out {run}`.")
        classes: list[str] | None = None
        root: Path | None = None
        cfg_path = run / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            classes, root = list(cfg.get("classes") or []) or None, Path(cfg["root"]) if cfg.get("root") else None
        with open(pred, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            rows = list(reader)
        if classes is None:
            classes = [c[2:] for c in cols if c.startswith("p_")]
        missing = [c for c in classes if f"p_{c}" not in cols]
        if missing or "label" not in cols or "name" not in cols:
            raise InterpretError(f"{pred} lacks columns for {missing or ['name', 'label']}; it was not written for this run. Train again to rewrite it.")
        index = {c: i for i, c in enumerate(classes)}
        try:
            probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
            targets = np.array([index[r["label"]] for r in rows], dtype=np.int64)
        except (KeyError, ValueError) as exc:
            raise InterpretError(f"{pred} has a row that cannot be read ({exc}). Train again to rewrite it.") from None
        interp = cls(probs, targets, classes, names=[r["name"] for r in rows], root=root)
        interp.run_dir = run  # what `plan` reads the cached features of
        return interp

    @classmethod
    def from_learner(cls, learn: Any, dl: Any = None) -> "ClassificationInterpretation":
        """From a `Learner`'s predictions on `dl` (default: its validation set).

        For an image learner's validation set (made by `vision_learner`) the image files are known, so
        `plot_top_losses` works: the validation items of its DataBunch's split, in loader order, less the
        files that failed to decode (the loader drops them from their batch). Other loaders give no names.
        """
        probs, y = learn.get_preds(dl)
        probs, y = probs.float().numpy(), y.numpy()
        names, root = (None, None) if dl is not None else _valid_files(learn, y)
        interp = cls(probs, y, learn.classes, names=names, root=root)
        interp.learn = learn  # what `plan` reads the cached features of
        return interp

    # ---- numbers ----------------------------------------------------------------------------------
    @property
    def error_rate(self) -> float:
        """Share of images predicted wrong, in [0, 1]."""
        return float((self.preds != self.targets).mean()) if len(self.targets) else float("nan")

    def plan(self, target: float | None = None) -> Any:
        """How many more images each class needs for the `target` validation error (default: half the
        current one), from a learning curve on the cached features, and search queries for the most
        confused pairs (`ursa.interpret.plan`; `ursa next RUN --plan`). Needs an interpretation made by
        `from_run` (writes the run's plan.json) or `from_learner` (an image learner; writes nothing)."""
        from ursa.interpret.plan import _plan_from_features, plan_for_run

        if self.run_dir is not None:
            return plan_for_run(self.run_dir, target=target)
        im = getattr(self.learn, "_image", None)
        if im is None:
            raise InterpretError("plan() needs the cached features: make the interpretation with from_run(run_dir) or from_learner(learn) of an image learner.")
        return _plan_from_features(self.learn.features(), self.classes, self.most_confused(1), target=target, c=im.train.c, seed=im.data.seed)

    def confusion_matrix(self) -> np.ndarray:
        """(n_classes, n_classes) int64 counts: row = actual class, column = predicted class."""
        n = len(self.classes)
        cm = np.zeros((n, n), np.int64)
        np.add.at(cm, (self.targets, self.preds), 1)
        return cm

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        """(actual, predicted, count) for every off-diagonal cell with count >= `min_val`, largest first."""
        cm = self.confusion_matrix()
        out = [(self.classes[i], self.classes[j], int(cm[i, j])) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] >= min_val]
        return sorted(out, key=lambda t: (-t[2], t[0], t[1]))

    def top_losses(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(losses, indices) of the `k` images with the largest loss (all images when k is None), largest first."""
        idx = np.argsort(-self.losses, kind="stable")[: (len(self.losses) if k is None else k)]
        return self.losses[idx], idx

    def per_class(self) -> list[ClassMetrics]:
        """Precision, recall, F1 and support of each class (0 where undefined)."""
        from sklearn.metrics import precision_recall_fscore_support

        p, r, f, s = precision_recall_fscore_support(self.targets, self.preds, labels=list(range(len(self.classes))), zero_division=0)
        return [ClassMetrics(c, float(p[i]), float(r[i]), float(f[i]), int(s[i])) for i, c in enumerate(self.classes)]

    # ---- plots ------------------------------------------------------------------------------------
    def plot_confusion_matrix(self, *, normalize: bool = False, figsize: tuple[float, float] | None = None, out: str | Path | None = None) -> Any:
        """The confusion matrix as a Figure (rows actual, columns predicted); written to `out` when given.
        `figsize` is (width, height) in inches (default: grows with the number of classes)."""
        from ursa.interpret.plots import plot_confusion

        figsize = _figsize(figsize)
        return plot_confusion(self.confusion_matrix(), self.classes, normalize=normalize, title=f"Confusion matrix (error rate {self.error_rate:.1%})", figsize=figsize, out=out)

    def plot_top_losses(self, k: int = 9, *, figsize: tuple[float, float] | None = None, out: str | Path | None = None, thumb: int = 192) -> Any:
        """The `k` validation images the model is most wrong about, titled `predicted/actual / loss / p(actual)`.

        Wrong predictions are titled in red. Needs the image files (`names` under `root`): an
        interpretation made by `from_run` or by `from_learner` on the validation set has them.
        `figsize` is (width, height) in inches (default: 2.4 x 2.6 per image).
        """
        from ursa.interpret.plots import image_grid

        figsize = _figsize(figsize)
        if self.names is None or self.root is None:
            raise InterpretError("plot_top_losses needs the image files; build the interpretation with from_run(run_dir), or with from_learner(learn) on its validation set.")
        losses, idx = self.top_losses(k)
        images, titles, colors = [], [], []
        for loss, i in zip(losses.tolist(), idx.tolist()):
            path = self.root / self.names[i]
            try:
                im = decode_image(path, min_side=thumb)  # upright, within the pixel limit, JPEGs drafted
                im.thumbnail((thumb, thumb))
                images.append(np.asarray(im))
            except BadImageError:
                images.append(np.full((thumb, thumb, 3), 200, np.uint8))  # moved or unreadable: grey tile
            t, p = self.targets[i], self.preds[i]
            titles.append(f"{self.classes[p]}/{self.classes[t]}\n{loss:.2f} / {self.probs[i, t]:.2f}")
            colors.append("black" if p == t else "tab:red")
        return image_grid(images, titles, title_colors=colors, suptitle="predicted/actual / loss / probability of actual", figsize=figsize, out=out)


    def plot_top_loss_heatmaps(self, k: int = 9, *, model: Any, data_config: dict[str, Any], figsize: tuple[float, float] | None = None, out: str | Path | None = None) -> Any:
        """`plot_top_losses` with a Grad-CAM heat map of the predicted class over each image (the model's
        input crop): where the model looked for the answer it gave. `model` is nn.Sequential(backbone,
        head) and `data_config` its preprocessing (`ursa.interpret.gradcam.load_run_model(run)` gives both)."""
        from ursa.interpret.gradcam import heatmap_overlays
        from ursa.interpret.plots import image_grid

        figsize = _figsize(figsize)
        if self.names is None or self.root is None:
            raise InterpretError("plot_top_loss_heatmaps needs the image files; build the interpretation with from_run(run_dir), or with from_learner(learn) on its validation set.")
        losses, idx = self.top_losses(k)
        images = heatmap_overlays(model, data_config, [self.root / self.names[i] for i in idx.tolist()], [int(self.preds[i]) for i in idx.tolist()])
        titles = [f"{self.classes[self.preds[i]]}/{self.classes[self.targets[i]]}\n{loss:.2f} / {self.probs[i, self.targets[i]]:.2f}" for loss, i in zip(losses.tolist(), idx.tolist())]
        colors = ["black" if self.preds[i] == self.targets[i] else "tab:red" for i in idx.tolist()]
        return image_grid(images, titles, title_colors=colors, suptitle="predicted/actual / loss / probability of actual; heat: where the model looked for its answer (Grad-CAM)", figsize=figsize, out=out)


def _figsize(figsize: Any) -> tuple[float, float] | None:
    """A checked (width, height) in inches, or None; checked before a figure is made."""
    if figsize is None:
        return None
    ok = isinstance(figsize, (tuple, list)) and len(figsize) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100 for v in figsize)
    if not ok:
        raise InterpretError(f"figsize must be (width, height) in inches, each in (0, 100], e.g. (12, 12); got {figsize!r}.")
    return float(figsize[0]), float(figsize[1])


def _valid_files(learn: Any, y: np.ndarray) -> tuple[list[str] | None, Path | None]:
    """(names under the root, root) of the images behind `learn.get_preds()` on its validation set, in order;
    (None, None) when the learner has no image split or the predictions do not line up with its items."""
    dls = getattr(learn, "dls", None)
    split = getattr(dls, "split", None)
    dataset = getattr(getattr(dls, "valid", None), "dataset", None)
    if split is None:
        return None, None
    failed = getattr(dataset, "failed", {}) or {}
    items = [it for it in split.valid if it.name not in failed]
    index = {c: i for i, c in enumerate(learn.classes)}
    if len(items) != len(y) or any(index.get(it.label) != int(t) for it, t in zip(items, y)):
        return None, None  # predictions not in the split's order: no names rather than wrong ones
    return [it.name for it in items], Path(split.root)
