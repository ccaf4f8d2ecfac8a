"""Find what is wrong with a dataset: likely label errors, duplicates, train/valid leaks, outliers, bad images.

Everything here reads the run's cached backbone features (see `ursa.train.features`), so a search after
training costs seconds, not another pass of the backbone:

- Label issues: out-of-sample probabilities for every image (train and valid) from a k-fold of heads
  trained on the cached features (`ursa.train.head.fit_fold_heads`), with duplicate groups kept in one
  fold so a copy cannot vouch for itself; then confident learning (`cleanlab.filter.find_label_issues`), ranked by self-confidence,
  each with the most likely label as the suggestion.
- Duplicates: byte-identical files (sha256) and near duplicates (cosine similarity of plain-view
  embeddings), grouped; groups whose members carry different labels and groups that straddle train and
  valid (leaks) are reported, and the validation error is recomputed with leaked images left out.
- Outliers: images whose nearest neighbours in embedding space are unusually far away.
- Quality: very dark, very bright, blurry and tiny images, measured on the pixels; a file that cannot be
  opened to measure is reported as unreadable.

`find_issues(run_dir)` writes `runs/NAME/issues.csv` (one row per finding) and `issues.json` (the summary).
This is the only module that imports cleanlab.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ursa._io import atomic_write_bytes, atomic_write_json, sha256_file
from ursa.errors import InterpretError

__all__ = [
    "KIND_TITLES",
    "KINDS",
    "ISSUE_COLUMNS",
    "Issue",
    "IssueReport",
    "out_of_sample_probs",
    "label_issues",
    "duplicate_groups",
    "outlier_scores",
    "image_quality",
    "quality_flags",
    "search_issues",
    "find_issues",
    "read_issues",
]

# Kinds of finding, in the order the review page shows them.
KINDS = ("label", "duplicate", "leak", "outlier", "dark", "bright", "blurry", "tiny", "unreadable")
ISSUE_COLUMNS = ("kind", "name", "label", "split", "suggested", "confidence", "score", "group", "detail")
# What each kind is, for a person: a title and a line of help (the review page and the notebook cleaner).
KIND_TITLES = {
    "label": ("Likely label errors", "The model, never trained on these images, is confident they belong to another class."),
    "duplicate": ("Duplicates", "The same picture more than once (exact or near copies); keep one."),
    "leak": ("Train/valid leaks", "Copies on both sides of the split make the validation score look better than it is."),
    "outlier": ("Outliers", "Far from every other image: maybe not a picture of any class."),
    "dark": ("Very dark", ""),
    "bright": ("Very bright", ""),
    "blurry": ("Blurry or flat", ""),
    "tiny": ("Tiny", "Too few pixels to learn from."),
    "unreadable": ("Unreadable", "The file could not be opened to measure its pixels: it may have changed or gone since training."),
}


@dataclass(frozen=True)
class Issue:
    """One finding about one image (a row of issues.csv)."""

    kind: str  # one of KINDS
    name: str  # image path relative to the dataset root
    label: str  # its current label
    split: str  # "train" or "valid"
    suggested: str = ""  # label issues: the most likely label (out of sample)
    confidence: float | None = None  # label issues: out-of-sample probability of `suggested`, in [0, 1]
    score: float | None = None  # kind-specific: label -> p(given label); duplicate -> cosine; outlier -> kNN distance; quality -> the measure; unreadable -> None
    group: str = ""  # duplicates and leaks: the group id shared by the copies
    detail: str = ""  # a short human-readable explanation


@dataclass
class IssueReport:
    """Every finding of a search, the out-of-sample probabilities behind them and a summary."""

    issues: list[Issue]
    names: list[str]  # every searched image, train first then valid
    labels: np.ndarray  # (n,) int64 class index of each name
    probs: np.ndarray  # (n, n_classes) float32 out-of-sample probabilities
    classes: list[str]
    summary: dict[str, Any] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[Issue]:
        """The findings of one kind, in rank order."""
        return [i for i in self.issues if i.kind == kind]

    def to_csv(self) -> str:
        """issues.csv as text: a header of ISSUE_COLUMNS and one row per finding."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(ISSUE_COLUMNS)
        for it in self.issues:
            d = asdict(it)
            w.writerow(["" if d[c] is None else (f"{d[c]:.6f}" if isinstance(d[c], float) else d[c]) for c in ISSUE_COLUMNS])
        return buf.getvalue()


# ---- out-of-sample probabilities -----------------------------------------------------------------


def out_of_sample_probs(
    views: Sequence[Sequence[np.ndarray]],
    labels: np.ndarray,
    *,
    n_classes: int,
    predict_views: int = 1,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    epochs: int = 12,
    lr: float = 6e-3,
    batch_size: int = 128,
    label_smoothing: float = 0.0,
    wd: float = 0.01,
    dropout: float = 0.25,
    seed: int = 42,
) -> np.ndarray:
    """Probabilities for every item from a head that never saw that item (stratified group k-fold).

    `views[i]` holds item i's feature vectors (each (d,), the plain view first). Items are dealt into
    `folds` folds, stratified by label; `groups` keeps copies of one picture in the same fold, so a copy
    cannot vouch for itself. Fold f's head is a linear head on standardised features (dropout, AdamW,
    one-cycle; see `ursa.train.head.fit_fold_heads`) trained on every view of the items outside fold f;
    it predicts the mean softmax over the first `predict_views` views of the items in fold f. The k heads
    train together as one batched model, which is what makes the search take seconds. No label
    smoothing by default: confident learning reads the probabilities themselves, and smoothing caps them.
    Returns (n, n_classes) float32; rows sum to 1.
    """
    from ursa.errors import TrainError
    from ursa.train.head import assign_folds, fit_fold_heads

    n = len(views)
    labels = np.asarray(labels, dtype=np.int64)
    if n != len(labels):
        raise InterpretError(f"{n} feature rows but {len(labels)} labels; they must match.")
    k = int(folds)
    try:
        fold_of = assign_folds(labels, folds=k, groups=groups, seed=seed)
    except TrainError as exc:
        raise InterpretError(str(exc)) from None
    return fit_fold_heads(views, labels, fold_of, folds=k, n_classes=n_classes, predict_views=predict_views, epochs=epochs, lr=lr, batch_size=batch_size, label_smoothing=label_smoothing, wd=wd, dropout=dropout, seed=seed)


def label_issues(labels: np.ndarray, probs: np.ndarray, *, filter_by: str = "both", min_given: float = 0.05) -> np.ndarray:
    """Indices of likely label errors, most likely first (confident learning, ranked by self-confidence).

    `filter_by="both"` flags an image only when both of cleanlab's pruning rules agree (per-class noise
    rates and the confident joint): on real photos with 10% flipped labels it trades a little recall
    for clearly better precision than either rule alone (see benchmarks/label_noise.py).
    Images the model puts in another class while giving their own label less than `min_given` are
    flagged as well: confident learning's per-class thresholds are noisy on small classes and miss
    some of these clear disagreements (on the benchmark this adds recall at almost no precision).

    `labels` (n,) int class indices, `probs` (n, n_classes) out-of-sample probabilities.
    """
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise InterpretError(f"probabilities of shape {probs.shape} do not fit {len(labels)} labels; pass (n, n_classes).")
    present = np.unique(labels)
    if len(present) < 2:
        return np.zeros(0, np.int64)
    # cleanlab wants every class to appear in the labels; search over the classes that do.
    remap = {int(c): i for i, c in enumerate(present)}
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    y = np.array([remap[int(c)] for c in labels])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idx = find_label_issues(y, sub, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1)
    given = probs[np.arange(len(labels)), labels]
    clear = np.flatnonzero((probs.argmax(1) != labels) & (given < min_given))
    found = np.union1d(np.asarray(idx, dtype=np.int64), clear)
    return found[np.argsort(given[found], kind="stable")]  # least self-confident first


# ---- duplicates, outliers, quality ---------------------------------------------------------------


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(emb: np.ndarray, *, hashes: Sequence[str] | None = None, threshold: float = 0.95, chunk: int = 2048) -> list[dict[str, Any]]:
    """Groups of exact and near duplicates among `emb` (n, d) embeddings.

    Two items are duplicates when their file hashes are equal (exact) or the cosine similarity of their
    embeddings is at least `threshold` (near). Returns groups (size >= 2) as dicts with `members`
    (sorted indices), `exact` (all members byte-identical) and `similarity` (the lowest linking cosine),
    ordered by their first member.
    """
    x = _normalise(emb)
    n = len(x)
    uf = _UnionFind(n)
    link: dict[tuple[int, int], float] = {}
    if hashes is not None:
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if h in first:
                uf.union(first[h], i)
                link[(first[h], i)] = 1.0
            else:
                first[h] = i
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.T  # (chunk, n) cosine similarities
        rows, cols = np.nonzero(sim >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = s + r
            if c > i:
                uf.union(i, c)
                link.setdefault((i, c), float(sim[r, c]))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    out = []
    for root in sorted(members):
        m = members[root]
        if len(m) < 2:
            continue
        sims = [v for (a, b), v in link.items() if a in m and b in m] if len(m) < 64 else [threshold]
        exact = hashes is not None and len({hashes[i] for i in m}) == 1
        out.append({"members": sorted(m), "exact": bool(exact), "similarity": float(min(sims) if sims else 1.0)})
    return out


def outlier_scores(emb: np.ndarray, *, k: int = 5) -> np.ndarray:
    """Mean cosine distance of each embedding to its `k` nearest other embeddings: (n,) in [0, 2].

    Copies (distance ~0) are skipped so a duplicated odd picture is still found.
    """
    x = _normalise(emb)
    n = len(x)
    if n < 2:
        return np.zeros(n, np.float32)
    dist = 1.0 - x @ x.T
    np.fill_diagonal(dist, np.inf)
    dist[dist < 1e-3] = np.inf  # copies
    kk = max(1, min(k, n - 1))
    part = np.partition(dist, kk - 1, axis=1)[:, :kk]
    part = np.where(np.isfinite(part), part, np.nan)
    out = np.nanmean(part, axis=1)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def image_quality(path: str | Path) -> dict[str, float]:
    """Pixel measures of one image: width, height (pixels), brightness mean and its 5th/95th percentiles
    (0 black .. 1 white) and sharpness (variance of the Laplacian of the grey image at <= 256 px, 0..1 scale).
    """
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        im.draft("L", (256, 256))  # JPEG: decode at reduced size, much faster
        g = im.convert("L")
        if max(g.size) > 256:
            g.thumbnail((256, 256))
        a = np.asarray(g, dtype=np.float32) / 255.0
    lap = a[1:-1, 1:-1] * -4 + a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] if min(a.shape) > 2 else np.zeros(1)
    return {
        "width": float(w),
        "height": float(h),
        "brightness": float(a.mean()),
        "p05": float(np.percentile(a, 5)),
        "p95": float(np.percentile(a, 95)),
        "sharpness": float(lap.var()),
    }


def quality_flags(q: dict[str, float], *, tiny_px: int = 32, dark: float = 0.12, bright: float = 0.9, blurry: float = 2e-4) -> list[tuple[str, float, str]]:
    """(kind, score, detail) for each quality problem of one image's measures (see `image_quality`).

    dark: mean brightness below `dark` and 95th percentile below 2x that; bright: mean above `bright` and
    5th percentile above 0.7; blurry: Laplacian variance below `blurry` (flat or out-of-focus);
    tiny: shorter side below `tiny_px` pixels.
    """
    out: list[tuple[str, float, str]] = []
    if q["brightness"] < dark and q["p95"] < 2 * dark:
        out.append(("dark", q["brightness"], f"mean brightness {q['brightness']:.2f} (0 black, 1 white)"))
    if q["brightness"] > bright and q["p05"] > 0.7:
        out.append(("bright", q["brightness"], f"mean brightness {q['brightness']:.2f} (0 black, 1 white)"))
    if q["sharpness"] < blurry:
        out.append(("blurry", q["sharpness"], f"sharpness {q['sharpness']:.2e} (Laplacian variance; below {blurry:.0e} is flat or blurred)"))
    if min(q["width"], q["height"]) < tiny_px:
        out.append(("tiny", min(q["width"], q["height"]), f"{int(q['width'])}x{int(q['height'])} pixels"))
    return out


# ---- the whole search ---------------------------------------------------------------------------


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med)) * 1.4826
    return (x - med) / max(mad, 1e-6)


def search_issues(
    root: Path,
    names: Sequence[str],
    labels: Sequence[int],
    is_valid: Sequence[bool],
    views: Sequence[Sequence[np.ndarray]],
    classes: Sequence[str],
    *,
    predict_views: int = 1,
    valid_probs: np.ndarray | None = None,
    folds: int = 5,
    epochs: int = 12,
    seed: int = 42,
    near_threshold: float = 0.95,
    outlier_z: float = 5.0,
    quality: bool = True,
    tiny_px: int = 32,
    progress: Callable[[str], None] | None = None,
) -> IssueReport:
    """Every kind of finding over one dataset (in memory; `find_issues` is the run-folder front end).

    `names` relative to `root`, `labels` (n,) class indices into `classes`, `is_valid` (n,) marks
    validation images, `views[i]` the cached feature vectors of item i (plain view first).
    `valid_probs` (n_valid_in_order, n_classes): the run's own validation probabilities, used for the
    error rate with leaks removed. Returns the report; writes nothing.
    """
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    names = list(names)
    y = np.asarray(labels, dtype=np.int64)
    valid_mask = np.asarray(is_valid, dtype=bool)
    n = len(names)
    split_of = ["valid" if v else "train" for v in valid_mask]
    emb = np.stack([v[0] for v in views]).astype(np.float32)

    say("hashing files")
    hashes = [sha256_file(root / nm) for nm in names]
    say("duplicates")
    dups = duplicate_groups(emb, hashes=hashes, threshold=near_threshold)
    group_of = np.arange(n)
    for g in dups:
        group_of[g["members"]] = g["members"][0]

    say(f"out-of-sample probabilities ({folds}-fold)")
    probs = out_of_sample_probs(views, y, n_classes=len(classes), predict_views=predict_views, groups=group_of, folds=folds, epochs=epochs, seed=seed)
    say("confident learning")
    ranked = label_issues(y, probs)

    issues: list[Issue] = []
    for i in ranked.tolist():
        p = probs[i].copy()
        given = float(p[y[i]])
        p[y[i]] = -1
        s = int(np.argmax(p))
        issues.append(Issue("label", names[i], classes[y[i]], split_of[i], classes[s], float(probs[i, s]), given, "", f"model says {classes[s]} ({probs[i, s]:.0%}), labelled {classes[y[i]]} ({given:.0%})"))

    leaked_valid: set[int] = set()
    n_conflict = 0
    for gi, g in enumerate(dups):
        m = g["members"]
        gid = f"g{gi + 1}"
        labs = {classes[y[i]] for i in m}
        sides = {split_of[i] for i in m}
        how = "exact copies" if g["exact"] else f"near copies (cosine >= {g['similarity']:.3f})"
        if len(labs) > 1:
            n_conflict += 1
            how += ", labels differ: " + " vs ".join(sorted(labs))
        for i in m:
            others = ", ".join(names[j] for j in m if j != i)
            issues.append(Issue("duplicate", names[i], classes[y[i]], split_of[i], "", None, g["similarity"], gid, f"{how}; same as {others}"))
        if len(sides) > 1:
            for i in m:
                issues.append(Issue("leak", names[i], classes[y[i]], split_of[i], "", None, g["similarity"], gid, "in both train and valid: the validation score overstates accuracy"))
                if valid_mask[i]:
                    leaked_valid.add(i)

    say("outliers")
    dist = outlier_scores(emb)
    z = _robust_z(dist)
    for i in np.argsort(-z).tolist():
        if z[i] < outlier_z:
            break
        issues.append(Issue("outlier", names[i], classes[y[i]], split_of[i], "", None, float(dist[i]), "", f"far from every other image (distance {dist[i]:.3f}, {z[i]:.1f} robust z)"))

    if quality:
        say("image quality")
        found: list[Issue] = []
        for i, nm in enumerate(names):
            try:
                q = image_quality(root / nm)
            except (OSError, ValueError) as exc:
                found.append(Issue("unreadable", nm, classes[y[i]], split_of[i], "", None, None, "", f"could not be opened to measure: {exc}"))
                continue
            for kind, score, detail in quality_flags(q, tiny_px=tiny_px):
                found.append(Issue(kind, nm, classes[y[i]], split_of[i], "", None, float(score), "", detail))
        order = {k: j for j, k in enumerate(KINDS)}
        found.sort(key=lambda it: (order[it.kind], -(it.score or 0.0) if it.kind == "bright" else (it.score or 0.0)))
        issues.extend(found)

    summary: dict[str, Any] = {
        "n_images": n,
        "n_train": int((~valid_mask).sum()),
        "n_valid": int(valid_mask.sum()),
        "counts": {k: sum(1 for it in issues if it.kind == k) for k in KINDS},
        "n_label_issues": len(ranked),
        "n_duplicate_groups": len(dups),
        "n_conflicting_groups": n_conflict,
        "n_leaked_valid": len(leaked_valid),
        "oos_accuracy": float((probs.argmax(1) == y).mean()) if n else float("nan"),
        "folds": folds,
        "near_threshold": near_threshold,
    }
    if valid_probs is not None and valid_mask.any():
        vy = y[valid_mask]
        vp = np.asarray(valid_probs)
        wrong = vp.argmax(1) != vy
        keep = np.array([i not in leaked_valid for i in np.flatnonzero(valid_mask)])
        summary["error_rate"] = float(wrong.mean())
        summary["error_rate_without_leaks"] = float(wrong[keep].mean()) if keep.any() else float("nan")
        summary["n_valid_without_leaks"] = int(keep.sum())
    summary["search_s"] = round(time.perf_counter() - t0, 2)
    return IssueReport(issues, names, y, probs, list(classes), summary)


def _read_predictions(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    out = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out[row["name"]] = np.array([float(row[f"p_{c}"]) for c in classes], np.float32)
    return out


def find_issues(run_dir: str | Path, *, folds: int = 5, near_threshold: float = 0.95, quality: bool = True, progress: Callable[[str], None] | None = None) -> IssueReport:
    """Search the dataset of a training run and write `issues.csv` and `issues.json` into the run folder.

    Reads config.json and split.json, loads the run's cached features (computing only what is missing)
    and runs `search_issues` with the run's own validation probabilities from predictions.csv.
    """
    from ursa.interpret.runs import read_run
    from ursa.train.features import cached_features, prepare_backbone

    rf = read_run(run_dir)
    run, split, data, train = rf.path, rf.split, rf.data, rf.train
    backbone = prepare_backbone(train)
    fd = cached_features(split, backbone, train, data)
    n_tr, n_va = len(fd.train_names), len(fd.valid_names)
    n_views = len(fd.views)
    x_tr = fd.x_train.numpy().reshape(n_views, n_tr, -1)
    x_va = [v.numpy() for v in fd.x_valid]
    views: list[list[np.ndarray]] = [[x_tr[v, i] for v in range(n_views)] for i in range(n_tr)]
    views += [[x[i] for x in x_va] for i in range(n_va)]
    # predict on the views both sides have: the plain view, and its mirror when both cached it
    predict_views = 2 if (len(x_va) > 1 and n_views > 1 and fd.views[1] == 1) else 1
    names = fd.train_names + fd.valid_names
    labels = np.concatenate([fd.y_train[:n_tr].numpy(), fd.y_valid.numpy()])
    preds = _read_predictions(run / "predictions.csv", split.classes)
    valid_probs = np.stack([preds[n] for n in fd.valid_names]) if preds and all(n in preds for n in fd.valid_names) else None
    report = search_issues(
        split.root, names, labels, [False] * n_tr + [True] * n_va, views, split.classes,
        predict_views=predict_views, valid_probs=valid_probs, folds=folds, seed=data.seed,
        near_threshold=near_threshold, quality=quality, progress=progress,
    )
    report.summary["root"] = str(split.root)
    atomic_write_bytes(run / "issues.csv", report.to_csv().encode("utf-8"))
    atomic_write_json(run / "issues.json", report.summary)
    return report


def read_issues(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of `run_dir/issues.csv` as dicts of strings (columns ISSUE_COLUMNS)."""
    from ursa.interpret.runs import read_run_csv

    return read_run_csv(run_dir, "issues.csv", command=f"ursa issues {run_dir}")
