"""What to label next: rank unlabelled pool images by how much their labels would help the model.

Works on embeddings (cached backbone features, `ursa.train.features`) and the run's head, so a selection
over a thousand images takes well under a second once the features are cached:

- Uncertainty: the margin between the two most likely classes of the calibrated probabilities (softmax of
  the head's logits divided by the run's temperature, `temperature_of`); entropy is the alternative.
- Diversity and coverage: the candidates are clustered (k-means on normalised embeddings, together with
  the labelled images, seeded); clusters no labelled image falls in are unexplored regions, taken first,
  weighted by their size, their uncertainty and their distance from what is labelled or picked. Each
  pick comes from its own cluster, so no two picks show the same thing, and near duplicates of a pick
  (cosine >= `NEAR_DUPLICATE`) are never picked as well.
- Pool images that duplicate a training image (same bytes, or cosine >= `NEAR_DUPLICATE`, the threshold
  of the duplicate search in `ursa.interpret.issues`) are skipped: their labels add nothing.

`select` returns `Pick`s, each with the model's guess, its confidence and a reason a person can read
("uncertain between A and B", "covers an unexplored region"). Deterministic for a given seed.
numpy and scikit-learn only (no torch): the heads' logits are passed in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ursa.errors import InterpretError

__all__ = [
    "NEAR_DUPLICATE",
    "Pick",
    "Selection",
    "temperature_of",
    "calibrated_probs",
    "uncertainty",
    "training_duplicates",
    "select",
]

NEAR_DUPLICATE = 0.95  # cosine from which two images count as near copies: the default of `ursa issues --near`
UNCERTAIN_MARGIN = 0.35  # a pick whose two best classes are closer than this is called uncertain between them


@dataclass(frozen=True)
class Pick:
    """One pool image chosen for labelling: its index in the pool, the model's guess and why it was chosen."""

    index: int  # row of the pool arrays given to `select`
    guess: str  # the most likely class under the calibrated probabilities
    confidence: float  # its probability, in [0, 1]
    runner_up: str  # the second most likely class
    margin: float  # p(guess) - p(runner_up), in [0, 1]
    novelty: float  # cosine distance to the nearest labelled image, in [0, 2]
    cluster_size: int  # pool images (after duplicates are set aside) in the pick's cluster
    reason: str  # a sentence a person reads


@dataclass
class Selection:
    """The picks, best first, and what was set aside on the way."""

    picks: list[Pick]
    n_pool: int  # pool images considered
    n_train_duplicates: int  # pool images that copy a training image (skipped)
    n_pool_duplicates: int  # pool images that copy another pool image (only one of each kept)


def temperature_of(run_dir: str | Path) -> float:
    """The run's calibration temperature (`temperature` in metrics.json), or 1.0 when the run has none.

    Probabilities are calibrated as softmax(logits / temperature); a missing, unreadable or non-positive
    value means the head's own probabilities (temperature 1).
    """
    path = Path(run_dir) / "metrics.json"
    try:
        t = float(json.loads(path.read_text(encoding="utf-8")).get("temperature", 1.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1.0
    return t if math.isfinite(t) and t > 0 else 1.0


def calibrated_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis: (n, classes) float64, rows sum to 1."""
    z = np.asarray(logits, dtype=np.float64) / max(float(temperature), 1e-6)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def uncertainty(probs: np.ndarray, kind: str = "margin") -> np.ndarray:
    """(n,) in [0, 1], 1 most uncertain: `margin` is 1 - (p1 - p2) of the two most likely classes,
    `entropy` the entropy of each row divided by log(classes)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise InterpretError(f"probabilities of shape {p.shape} are not (n, classes >= 2).")
    if kind == "margin":
        top = np.sort(p, axis=1)[:, -2:]
        return 1.0 - (top[:, 1] - top[:, 0])
    if kind == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(1) / math.log(p.shape[1])
    raise InterpretError(f"unknown uncertainty {kind!r}; use 'margin' or 'entropy'.")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _max_cosine(a: np.ndarray, b: np.ndarray, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine, its row in b) of each row of normalised `a` against normalised `b`; (-1, -1) when b is empty."""
    best, arg = np.full(len(a), -1.0, np.float32), np.full(len(a), -1, np.int64)
    if len(b) == 0:
        return best, arg
    for s in range(0, len(a), chunk):
        sim = a[s : s + chunk] @ b.T
        arg[s : s + chunk] = sim.argmax(1)
        best[s : s + chunk] = sim[np.arange(len(sim)), arg[s : s + chunk]]
    return best, arg


def training_duplicates(pool_emb: np.ndarray, train_emb: np.ndarray, *, pool_hashes: Sequence[str] | None = None, train_hashes: Sequence[str] | None = None, threshold: float = NEAR_DUPLICATE) -> np.ndarray:
    """(n_pool,) bool: the pool images that copy a training image, byte for byte (equal hashes) or nearly
    (cosine of the embeddings >= `threshold`)."""
    sim, _ = _max_cosine(_normalise(pool_emb), _normalise(train_emb))
    dup = sim >= threshold
    if pool_hashes is not None and train_hashes is not None:
        seen = set(train_hashes)
        dup |= np.array([h in seen for h in pool_hashes], dtype=bool)
    return dup


def _pool_duplicates(x: np.ndarray, hashes: Sequence[str] | None, threshold: float) -> np.ndarray:
    """(n,) bool: images that copy an earlier pool image (the first of each group is kept)."""
    n = len(x)
    dup = np.zeros(n, bool)
    if hashes is not None:
        first: set[str] = set()
        for i, h in enumerate(hashes):
            dup[i] = h in first
            first.add(h)
    for s in range(0, n, 2048):
        sim = x[s : s + 2048] @ x.T  # (chunk, n)
        for r in range(len(sim)):
            i = s + r
            if dup[i]:
                continue
            earlier = sim[r, :i] >= threshold
            if earlier.any() and (~dup[:i][earlier]).any():
                dup[i] = True
    return dup


def _kmeans(x: np.ndarray, k: int, seed: int, *, dims: int = 64) -> np.ndarray:
    """Cluster labels (n,) of k-means (k-means++ seeding, seeded; scikit-learn) on the
    first `dims` principal components of `x`: the clusters are nearly the same, and found many times faster."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    k = max(1, min(k, len(x)))
    z = np.asarray(x, dtype=np.float64)
    if min(z.shape) > dims:
        z = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit_transform(z)
    return KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit_predict(z)


def select(
    pool_emb: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    n: int,
    labelled_emb: np.ndarray | None = None,
    pool_hashes: Sequence[str] | None = None,
    train_hashes: Sequence[str] | None = None,
    kind: str = "margin",
    near: float = NEAR_DUPLICATE,
    seed: int = 42,
) -> Selection:
    """The `n` pool images whose labels would help most, best first.

    `pool_emb` (n_pool, d) embeddings of the pool, `probs` (n_pool, classes) their calibrated
    probabilities, `labelled_emb` (n_labelled, d) the training images' embeddings (and `train_hashes`
    their sha256, `pool_hashes` the pool's, to skip byte-identical copies). Pool images copying a
    training image or an earlier pool image are set aside. The rest are clustered together with the
    labelled images into `n_labelled + n` k-means clusters. Clusters with no labelled image come first,
    one at a time, the one with the largest (images x mean uncertainty x cosine distance from its centre
    to every labelled image and pick so far); then the others by their mean uncertainty. From each
    cluster the pick is the image with the highest uncertainty times typicality (cosine to the cluster's
    centre). Fewer than `n` picks come back when fewer distinct images are left.
    """
    from threadpoolctl import threadpool_limits

    # One BLAS/OpenMP thread: right after torch has run (a head fit, a feature pass) its spinning worker
    # threads and a second pool of BLAS threads fight over the cores, and these small matrices lose ~10x.
    with threadpool_limits(1):
        return _select(pool_emb, probs, list(classes), n=n, labelled_emb=labelled_emb, pool_hashes=pool_hashes, train_hashes=train_hashes, kind=kind, near=near, seed=seed)


def _select(pool_emb: np.ndarray, probs: np.ndarray, classes: list[str], *, n: int, labelled_emb: np.ndarray | None, pool_hashes: Sequence[str] | None,
            train_hashes: Sequence[str] | None, kind: str, near: float, seed: int) -> Selection:  # fmt: skip
    pool = _normalise(pool_emb)
    p = np.asarray(probs, dtype=np.float64)
    if pool.ndim != 2 or len(p) != len(pool) or p.shape[1] != len(classes):
        raise InterpretError(f"pool embeddings {pool.shape} and probabilities {p.shape} do not fit {len(classes)} classes.")
    if n < 1:
        raise InterpretError(f"n must be at least 1 (got {n}).")
    lab = _normalise(labelled_emb) if labelled_emb is not None and len(labelled_emb) else np.zeros((0, pool.shape[1]), np.float32)
    dup_train = training_duplicates(pool, lab, pool_hashes=pool_hashes, train_hashes=train_hashes, threshold=near)
    dup_pool = _pool_duplicates(pool, pool_hashes, near) & ~dup_train
    cand = np.flatnonzero(~dup_train & ~dup_pool)
    picks: list[Pick] = []
    if len(cand):
        picks = _pick(pool, p, cand, lab, list(classes), n=min(n, len(cand)), kind=kind, near=near, seed=seed)
    return Selection(picks, len(pool), int(dup_train.sum()), int(dup_pool.sum()))


def _pick(pool: np.ndarray, p: np.ndarray, cand: np.ndarray, lab: np.ndarray, classes: list[str], *, n: int, kind: str, near: float, seed: int) -> list[Pick]:
    unc = uncertainty(p, kind)
    novelty = 1.0 - _max_cosine(pool, lab)[0] if len(lab) else np.full(len(pool), 2.0, np.float32)
    x = np.concatenate([pool[cand], lab])
    labels = _kmeans(x, len(lab) + n, seed)
    cl_pool, cl_lab = labels[: len(cand)], labels[len(cand) :]
    covered = set(cl_lab.tolist())
    centres = {c: _normalise(x[labels == c].mean(0, keepdims=True))[0] for c in np.unique(cl_pool)}
    unexplored, explored = [], []
    for c in np.unique(cl_pool):
        members = cand[cl_pool == c]
        (explored if c in covered else unexplored).append((int(c), members))
    out: list[Pick] = []
    chosen: list[int] = []

    def take(c: int, members: np.ndarray, *, fresh: bool) -> None:
        typical = pool[members] @ centres[c]
        score = unc[members] * np.clip(typical, 0.0, None)
        for j in np.argsort(-score, kind="stable"):
            i = int(members[j])
            if chosen and float((pool[chosen] @ pool[i]).max()) >= near:
                continue  # a near copy of a pick already made
            chosen.append(i)
            out.append(_make_pick(i, p[i], classes, novelty=float(novelty[i]), size=len(members), unexplored=fresh))
            return

    # Unexplored clusters (no labelled image in them) first: each time the one with the largest images x
    # mean uncertainty x distance to every labelled image and pick so far (so a region split in two is not
    # taken twice while another is untouched). Then the explored clusters, most uncertain (on average) first.
    while unexplored and len(out) < n:
        seen = np.concatenate([lab, pool[chosen]]) if chosen else lab
        gaps = [len(m) * float(unc[m].mean()) * ((1.0 - float(_max_cosine(centres[c][None], seen)[0][0])) if len(seen) else 1.0) for c, m in unexplored]
        c, members = unexplored.pop(int(np.argmax(gaps)))
        take(c, members, fresh=True)
    explored.sort(key=lambda t: (-float(unc[t[1]].mean()), t[0]))
    for c, members in explored:
        if len(out) == n:
            break
        take(c, members, fresh=False)
    if len(out) < n:  # fewer clusters than picks wanted: the most uncertain of the rest
        for i in cand[np.argsort(-unc[cand], kind="stable")].tolist():
            if len(out) == n:
                break
            if i in chosen or float((pool[chosen] @ pool[i]).max()) >= near:
                continue
            chosen.append(i)
            out.append(_make_pick(i, p[i], classes, novelty=float(novelty[i]), size=1, unexplored=False))
    return out


def _make_pick(i: int, p: np.ndarray, classes: list[str], *, novelty: float, size: int, unexplored: bool) -> Pick:
    order = np.argsort(-p, kind="stable")
    a, b = int(order[0]), int(order[1])
    margin = float(p[a] - p[b])
    others = f"; stands for {size} similar pool images" if size > 1 else ""
    if margin < UNCERTAIN_MARGIN:
        reason = f"uncertain between {classes[a]} and {classes[b]} ({p[a]:.0%} vs {p[b]:.0%}){others}"
    elif unexplored:
        reason = f"covers an unexplored region: no labelled image is like it (nearest at cosine distance {novelty:.2f}){others}"
    else:
        reason = f"the model says {classes[a]} at only {p[a]:.0%}, in a region with few labelled images{others}"
    return Pick(i, classes[a], float(p[a]), classes[b], margin, novelty, size, reason)
