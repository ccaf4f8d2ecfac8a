"""`ursa next RUN --plan`: how many more images each class needs, and what to search for to get them.

- Learning curve: the default head (`ursa.train.head.lbfgs_linear`, the run's C) is fitted on 25, 50, 75
  and 100% of the training images (a stratified draw of images, each with all its cached views; the
  smaller shares averaged over `repeats` draws) and scored on the validation set (plain and mirrored
  views averaged when cached), all on the cached features: seconds, no backbone pass.
- A power law error = a * n^-b is fitted to the curve (least squares in log-log), and solved for the
  training-set size that reaches the target error (default: half the current error); the images per
  class needed follow, less what each class has.
- From the most-confused pairs of the validation set, search queries per class ("A" and "A -B" for a
  class A taken for B), with how many images each should bring.

`make_plan` works on features in memory; `plan_for_run` reads a run folder and writes `plan.json`;
`download_plan` runs the queries through a search provider into the class folders.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ursa._io import atomic_write_json
from ursa.errors import InterpretError

__all__ = ["CurvePoint", "ClassPlan", "Plan", "learning_curve", "fit_power_law", "make_plan", "plan_for_run", "download_plan", "FRACTIONS"]

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class CurvePoint:
    """Validation error of the head trained on `fraction` of the training images (`n_train` of them)."""

    fraction: float
    n_train: int
    error: float


@dataclass
class ClassPlan:
    """One class: images it has, images it should have for the target, and the queries to get them."""

    label: str
    have: int
    need: int | None  # None: the curve gave no estimate
    add: int  # images to collect (need - have, or the default for a confused class without an estimate)
    confused_with: list[tuple[str, int]] = field(default_factory=list)  # (class it is taken for, validation images)
    queries: list[dict[str, Any]] = field(default_factory=list)  # {"query", "count"}


@dataclass
class Plan:
    """The learning curve, its power law, the target and what to collect per class."""

    curve: list[CurvePoint]
    a: float  # error ~ a * n^-b
    b: float
    current_error: float
    target_error: float
    needed_train: int | None  # training images for the target (None: more images of the same kind do not lower the error here)
    classes: list[ClassPlan]
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """plan.json."""
        return {**asdict(self), "curve": [asdict(p) for p in self.curve], "classes": [asdict(c) for c in self.classes]}


def _stratified(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified draw of `fraction` of each class (at least one image per class)."""
    out = []
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        m = max(1, int(round(fraction * len(idx))))
        out.append(idx if m >= len(idx) else rng.choice(idx, size=m, replace=False))
    return np.sort(np.concatenate(out))


def learning_curve(x_views: np.ndarray, y: np.ndarray, valid_views: Sequence[np.ndarray], y_valid: np.ndarray, n_classes: int, *, fractions: Sequence[float] = FRACTIONS,
                   c: float = 0.5, repeats: int = 2, seed: int = 42) -> list[CurvePoint]:  # fmt: skip
    """Validation error of the default head on shares of the training images.

    `x_views` (views, n_train, d) cached training features, `y` (n_train,) labels, `valid_views` one
    (n_valid, d) array per evaluation view (probabilities averaged), `y_valid` (n_valid,). Shares below
    1 are the mean over `repeats` seeded stratified draws.
    """
    import torch

    from ursa.train.head import lbfgs_linear

    if len(y_valid) == 0:
        raise InterpretError("the run has no validation images to measure a learning curve on. Train with a validation set (--valid-pct).")
    rng = np.random.default_rng(seed)
    xv = [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in valid_views]
    out = []
    for f in fractions:
        errs, n_used = [], 0
        for _ in range(repeats if f < 1 else 1):
            idx = _stratified(y, f, rng)
            x = torch.from_numpy(np.ascontiguousarray(x_views[:, idx].reshape(-1, x_views.shape[-1]), dtype=np.float32))
            yy = torch.from_numpy(np.tile(y[idx], x_views.shape[0]).astype(np.int64))
            w, b, _ = lbfgs_linear(x, yy, n_classes, c=c)
            probs = torch.stack([(v @ w.T + b).softmax(-1) for v in xv]).mean(0)
            errs.append(float((probs.argmax(1).numpy() != y_valid).mean()))
            n_used = len(idx)
        out.append(CurvePoint(float(f), n_used, float(np.mean(errs))))
    return out


def fit_power_law(curve: Sequence[CurvePoint], *, floor: float) -> tuple[float, float]:
    """(a, b) of error = a * n^-b fitted in log-log space; errors below `floor` (half an image of the
    validation set) count as `floor`, so a perfect score stays finite."""
    n = np.array([p.n_train for p in curve], dtype=np.float64)
    e = np.clip(np.array([p.error for p in curve], dtype=np.float64), floor, None)
    if len(set(n.tolist())) < 2:
        return float(e.mean()), 0.0
    slope, intercept = np.polyfit(np.log(n), np.log(e), 1)
    return float(math.exp(intercept)), float(-slope)


def _query_name(label: str) -> str:
    return " ".join(label.replace("_", " ").replace("-", " ").split())


def make_plan(x_views: np.ndarray, y: np.ndarray, valid_views: Sequence[np.ndarray], y_valid: np.ndarray, classes: Sequence[str], confused: Sequence[tuple[str, str, int]], *,
              target: float | None = None, c: float = 0.5, repeats: int = 2, seed: int = 42, default_add: int = 20) -> Plan:  # fmt: skip
    """The plan for one dataset's cached features (see the module docstring).

    `confused` (actual, predicted, count) pairs, largest first (`ClassificationInterpretation.most_confused`).
    `target` is the validation error to reach, in [0, 1) (default: half the current error). A class taken
    for another gets `default_add` images when the curve gives no estimate.
    """
    t0 = time.perf_counter()
    classes = list(classes)
    if target is not None and not (0.0 <= target < 1.0):
        raise InterpretError(f"--target must be an error rate in [0, 1), got {target}. Try half the current error.")
    curve = learning_curve(x_views, y, valid_views, y_valid, len(classes), c=c, repeats=repeats, seed=seed)
    floor = 0.5 / len(y_valid)
    a, b = fit_power_law(curve, floor=floor)
    current = curve[-1].error
    n_now = curve[-1].n_train
    note = ""
    if target is None:
        target = current / 2
    needed: int | None = None
    if current <= target or current == 0.0:
        note = f"the validation error is already {current:.3f}, at or below the target {target:.3f}: no more images are needed for it"
        needed = n_now
    elif b <= 0.05:
        note = f"the error hardly falls with more images of the same kind (power law exponent {b:.2f}): check the labels (`ursa issues`) and collect the confused classes"
    else:
        goal = max(target, floor)
        needed = int(math.ceil((goal / a) ** (-1.0 / b)))
        if needed > 100 * n_now:
            note = f"the curve says about {needed} training images for error {target:.3f}: more than 100x what there is, so adding images alone will not get there; check the labels and the classes"
    have = np.bincount(y, minlength=len(classes))
    partners: dict[str, list[tuple[str, int]]] = {cl: [] for cl in classes}
    for actual, pred, k in confused:
        if actual in partners:
            partners[actual].append((pred, int(k)))
    plans = []
    for i, cl in enumerate(classes):
        if needed is None:
            need = None
        elif current <= target:
            need = int(have[i])
        else:
            need = int(math.ceil(needed / len(classes)))  # balanced classes: each its share of the total
        add = max(0, need - int(have[i])) if need is not None else (default_add if partners[cl] else 0)
        plans.append(ClassPlan(cl, int(have[i]), need, add, partners[cl], _queries(cl, partners[cl], add)))
    return Plan(curve, a, b, current, float(target), needed, plans, note, round(time.perf_counter() - t0, 2))


def _queries(label: str, partners: list[tuple[str, int]], add: int) -> list[dict[str, Any]]:
    """Queries for class `label` and how many images each should bring: half of `add` for the class
    itself, half for "label -other" per class it is taken for (split by the confusion counts)."""
    if add <= 0:
        return []
    name = _query_name(label)
    if not partners:
        return [{"query": name, "count": add}]
    own = (add + 1) // 2
    rest, total = add - own, sum(k for _, k in partners)
    out = [{"query": name, "count": own}]
    for other, k in partners:
        cnt = int(round(rest * k / total)) if total else 0
        if cnt > 0:
            out.append({"query": f"{name} -{_query_name(other)}", "count": cnt})
    return out


def plan_for_run(run_dir: str | Path, *, target: float | None = None, write: bool = True, progress: Callable[[str, int, int], None] | None = None) -> Plan:
    """The plan of a training run, from its cached features (computed when missing) and its validation
    predictions; writes `plan.json` into the run folder with `write`."""
    from ursa.interpret.runs import read_run
    from ursa.train.features import cached_features, prepare_backbone

    rf = read_run(run_dir)
    run, split, data, train = rf.path, rf.split, rf.data, rf.train
    confused = _most_confused(run / "predictions.csv")
    fd = cached_features(split, prepare_backbone(train), train, data, progress=progress)
    plan = _plan_from_features(fd, split.classes, confused, target=target, c=train.c, seed=data.seed)
    if write:
        atomic_write_json(run / "plan.json", plan.to_dict())
    return plan


def _most_confused(path: Path) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) of the validation predictions in a run's predictions.csv, largest first
    (as `ClassificationInterpretation.most_confused`); [] when the file is missing."""
    import csv
    from collections import Counter

    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        pairs = Counter((r["label"], r["pred"]) for r in csv.DictReader(fh) if r.get("label") and r.get("pred") and r["label"] != r["pred"])
    return sorted(((a, p, k) for (a, p), k in pairs.items()), key=lambda t: (-t[2], t[0], t[1]))


def _plan_from_features(fd: Any, classes: Sequence[str], confused: Sequence[tuple[str, str, int]], *, target: float | None, c: float, seed: int) -> Plan:
    n_tr = len(fd.train_names)
    x = fd.x_train.numpy().reshape(len(fd.views), n_tr, -1)
    return make_plan(x, fd.y_train[:n_tr].numpy(), [v.numpy() for v in fd.x_valid], fd.y_valid.numpy(), classes, confused, target=target, c=c, seed=seed)


def download_plan(plan: Plan, root: str | Path, *, provider: Any, config: Any = None, transport: Any = None, on_progress: Callable[[Any], None] | None = None) -> Any:
    """Run the plan's queries through `provider` (a `ursa.collect.search` provider) and download the
    results into the class folders of dataset `root` (`<root>/<train>/<class>` for train/valid layouts),
    as `ursa search` does (manifest, duplicates skipped, resumable). Returns the DownloadReport, or None
    when the plan asks for nothing. Search results are cached in `<download root>/.ursa/search/`."""
    from ursa.collect.download import download, jobs_from_search
    from ursa.collect.manifest import META_DIR
    from ursa.collect.search import search_images
    from ursa.config import CollectConfig
    from ursa.data.items import find_split_folders

    root = Path(root)
    folders = find_split_folders(root)
    dest = root / folders[0] if folders else root
    jobs = []
    for cp in plan.classes:
        for q in cp.queries:
            results = search_images(q["query"], provider=provider, max_results=int(q["count"]), cache_dir=dest / META_DIR / "search")
            jobs += jobs_from_search(results[: int(q["count"])], cp.label, query=q["query"])
    if not jobs:
        return None
    return download(jobs, dest, config=config or CollectConfig(), on_progress=on_progress, transport=transport)
