"""Answers you can trust, in numpy only: calibration, the open-set detector and class-activation maps.

Training fits these (`ursa.train.trust`), the export stores them and the Predictor applies them with no
torch (serving imports this module), so every function here takes and returns numpy arrays:

- Calibration: `expected_calibration_error` (ECE, equal-width confidence bins) and `fit_temperature`,
  one scalar T that divides the logits (temperature scaling, Guo et al. 2017). T > 1 softens
  over-confident probabilities; the argmax, hence the accuracy, never changes.
- Open set: `OpenSetDetector`, a distance in the backbone's embedding space (pooled features, the
  head's input). "mahalanobis": the smallest Mahalanobis distance to a class mean under one shared,
  shrunk covariance (Lee et al. 2018); "knn": the cosine distance to the k-th nearest training
  embedding (Sun et al. 2022). Larger scores are less familiar; the threshold is chosen by training.
- Why: `class_activation_map` (Grad-CAM of a linear head on globally pooled features, which equals CAM:
  the gradient of a class logit with respect to the last feature map is the head's weight row over
  h * w) and `overlay` (a heat map over the photo, Pillow and numpy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ursa.errors import UrsaError

__all__ = [
    "DETECTORS",
    "DETECTOR_FILE",
    "ECE_BINS",
    "OpenSetDetector",
    "class_activation_map",
    "detector_from_bytes",
    "detector_to_bytes",
    "expected_calibration_error",
    "fit_temperature",
    "heat_colors",
    "overlay",
    "scaled_softmax",
]

ECE_BINS = 15
DETECTORS = ("mahalanobis", "knn")
DETECTOR_FILE = "open_set.safetensors"  # the detector's arrays, in a run's models/ folder and in an export folder


# ---- calibration ---------------------------------------------------------------------------------


def scaled_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of (n, C) `logits` / `temperature`, float32, stable for large values."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """ECE of (n, C) probabilities against (n,) int labels: the share-weighted mean over `bins` equal-width
    bins of the top probability of |accuracy - mean confidence| in the bin. 0 is perfectly calibrated;
    "90% sure" is then right 9 times in 10. NaN for no rows."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    conf, pred = p.max(1), p.argmax(1)
    right = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] bins; 0 in the first
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(total)


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, lo: float = 0.05, hi: float = 20.0) -> float:
    """The temperature T in [lo, hi] minimising the mean negative log-likelihood of softmax(logits / T)
    on (n, C) held-out `logits` with (n,) int `labels` (golden-section search on log T; the NLL is
    unimodal in it). 1.0 when there are no rows."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5.0) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll(z, y, np.exp(c)), _nll(z, y, np.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll(z, y, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll(z, y, np.exp(d))
    return float(np.exp((a + b) / 2))


# ---- open set ------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


@dataclass
class OpenSetDetector:
    """A distance from the training embeddings: `score(emb)` (n, d) -> (n,) float32, larger = less familiar.

    mahalanobis: `arrays` holds `whiten` (d, d), with whiten @ whiten.T the inverse of the shared
    covariance, and `means` (C, d) the class means already multiplied by `whiten`; the score is the
    smallest squared distance min_c |x @ whiten - means_c|^2. knn: `arrays` holds `reference` (m, d),
    unit-length training embeddings (float16 to halve the file); the score is 1 - the k-th largest
    cosine similarity. `threshold`: scores above it are "unfamiliar" (inf: never).
    """

    method: str
    arrays: dict[str, np.ndarray]
    threshold: float = float("inf")
    k: int = 1

    @classmethod
    def fit(cls, emb: np.ndarray, labels: np.ndarray, *, n_classes: int, method: str = "mahalanobis", k: int = 1, max_reference: int = 5000, seed: int = 0) -> "OpenSetDetector":
        """Fit on (n, d) training embeddings with (n,) int labels. mahalanobis: class means and one
        Ledoit-Wolf-shrunk covariance of the embeddings less their class mean (well-conditioned even when
        n < d). knn: the unit-length embeddings, at most `max_reference` of them (a seeded sample)."""
        x = np.asarray(emb, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if method not in DETECTORS:
            raise UrsaError(f"unknown open-set detector {method!r}; use one of {', '.join(DETECTORS)}.")
        if len(x) < 2:
            raise UrsaError(f"the open-set detector needs at least 2 training embeddings, got {len(x)}. Add images.")
        if method == "knn":
            ref = _unit(x)
            if len(ref) > max_reference:
                ref = ref[np.sort(np.random.default_rng(seed).choice(len(ref), max_reference, replace=False))]
            return cls("knn", {"reference": ref.astype(np.float16)}, k=max(1, min(int(k), len(ref))))
        means = np.zeros((n_classes, x.shape[1]))
        for c in range(n_classes):
            if (y == c).any():
                means[c] = x[y == c].mean(0)
        centered = x - means[y]
        cov, _ = _ledoit_wolf(centered)
        w = np.linalg.cholesky(np.linalg.inv(cov))  # inv(cov) = w @ w.T
        present = np.unique(y)
        return cls("mahalanobis", {"whiten": w.astype(np.float32), "means": (means[present] @ w).astype(np.float32)})

    def score(self, emb: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n,) float32 unfamiliarity (see the class docstring)."""
        x = np.asarray(emb, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if self.method == "knn":
            ref = self.arrays["reference"].astype(np.float32)
            sim = _unit(x) @ ref.T  # (n, m) cosine similarities
            kk = min(self.k, sim.shape[1])
            kth = -np.partition(-sim, kk - 1, axis=1)[:, kk - 1]
            return (1.0 - kth).astype(np.float32)
        z = x @ self.arrays["whiten"]
        m = self.arrays["means"]
        d2 = (z * z).sum(1)[:, None] - 2 * z @ m.T + (m * m).sum(1)[None, :]
        return d2.min(1).astype(np.float32)

    def unfamiliar(self, emb: np.ndarray) -> np.ndarray:
        """(n,) bool: scores above the threshold."""
        return self.score(emb) > self.threshold

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays to store (safetensors, `ursa.export`)."""
        return {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}

    def describe(self) -> dict[str, Any]:
        """model.json's record of the detector (its arrays live in a safetensors file)."""
        return {"method": self.method, "threshold": float(self.threshold), "k": int(self.k) if self.method == "knn" else None}

    @classmethod
    def from_parts(cls, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> "OpenSetDetector":
        """Rebuild from model.json's record and the stored arrays; UrsaError when they do not fit."""
        method = info.get("method")
        need = {"mahalanobis": ("whiten", "means"), "knn": ("reference",)}.get(str(method))
        if need is None or any(k not in arrays for k in need):
            raise UrsaError(f"the open-set detector record ({method!r}, arrays {sorted(arrays)}) is not one this Ursa reads.")
        return cls(str(method), dict(arrays), float(info.get("threshold", float("inf"))), int(info.get("k") or 1))


def detector_to_bytes(det: OpenSetDetector) -> bytes:
    """The detector as safetensors bytes: its arrays, and its record (`describe`) as the header's metadata."""
    import json

    from safetensors.numpy import save

    return save(det.tensors(), metadata={"open_set": json.dumps(det.describe())})


def detector_from_bytes(data: bytes, *, where: str = "the detector file") -> OpenSetDetector:
    """Read `detector_to_bytes`'s output back (safetensors: tensors and a JSON header, never code)."""
    import json

    from safetensors.numpy import load

    try:
        arrays = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}
        info = json.loads(meta.get("open_set", "{}"))
    except Exception as exc:  # SafetensorError, UnicodeDecodeError, JSONDecodeError
        raise UrsaError(f"{where} is not a readable open-set detector ({type(exc).__name__}: {exc}).") from None
    if not isinstance(info, dict):
        raise UrsaError(f"{where} carries no open-set detector record.")
    return OpenSetDetector.from_parts(info, arrays)


def _ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance, shrinkage) of centred (n, d) rows: Ledoit-Wolf shrinkage towards a scaled identity."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    x2 = x * x
    beta = (((x2.T @ x2) / n - s * s).sum() / d) / n
    shrink = float(min(1.0, beta / delta)) if delta > 0 else 1.0
    return shrink * mu * np.eye(d) + (1 - shrink) * s, shrink


# ---- why: class activation maps -----------------------------------------------------------------


def class_activation_map(feature_map: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Grad-CAM of a linear head on globally average-pooled features, for one image and one class:
    `feature_map` (C, h, w) the backbone's last stage, `weights` (C,) the class's row of the head's
    effective weight -> (h, w) float32 in [0, 1], ReLU(sum_c weights_c * feature_map_c) over its max."""
    cam = np.tensordot(np.asarray(weights, np.float32), np.asarray(feature_map, np.float32), axes=(0, 0))
    cam = np.maximum(cam, 0.0)
    top = float(cam.max())
    return (cam / top if top > 0 else cam).astype(np.float32)


def heat_colors(v: np.ndarray) -> np.ndarray:
    """(...,) values in [0, 1] -> (..., 3) uint8 RGB on a blue-cyan-yellow-red ramp (a "jet"-like map)."""
    v = np.clip(np.asarray(v, np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: Any, cam: np.ndarray, *, alpha: float = 0.45) -> Any:
    """A PIL RGB image: `image` (PIL) with the (h, w) map `cam` in [0, 1] resized onto it (bilinear) and
    blended as a heat map, weighted by `alpha` and by the map itself (cold areas stay photo)."""
    from PIL import Image

    im = image.convert("RGB")
    small = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8), "L")
    big = np.asarray(small.resize(im.size, Image.BILINEAR), np.float32) / 255.0
    heat = heat_colors(big).astype(np.float32)
    a = (alpha * (0.35 + 0.65 * big))[..., None]
    out = np.asarray(im, np.float32) * (1 - a) + heat * a
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
