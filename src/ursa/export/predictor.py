"""Predict with an export folder on a CPU: `load_model` / `Predictor`, and the preprocessing they share.

Prediction runs ONNX Runtime by default and PyTorch as the fallback; both use the one preprocessing
function here, which reproduces training's evaluation transform (`ursa.data.transforms.open_image` +
`eval_transform`) with Pillow and numpy only, so serving needs neither torch nor torchvision: torch,
timm and safetensors' torch loader are imported only inside the functions of the torch backend.

Calibration: probabilities are softmax(logits / T), T the temperature training fitted out of fold
(model.json "calibration"; 1 for an export without one).

Open set: a photo of none of the classes still gets a softmax over the classes, so there are two
reasons to answer `NONE_OF_THESE`. "unfamiliar": the open-set detector (a distance from the training
embeddings, `ursa.trust.OpenSetDetector`, on the model's "embedding" output) puts the photo beyond its
threshold. "unsure between A and B": the top probability is under the softmax threshold, calibrated on
the validation set (by default the 5th percentile of the top probability of correctly classified
validation images, so about 95% of good predictions pass). `Prediction.reason` says which.

Why: `Predictor.explain` gives a Grad-CAM heat map from the "feature_map" output and the head's weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ursa.errors import BadImageError, ExportError, UrsaError
from ursa.export.artifact import INT8_FILE, META_FILE, ONNX_FILE, WEIGHTS_FILE, read_export
from ursa.imageio import MAX_PIXELS, decode_image, eval_crop_mode, eval_geometry, eval_input, eval_min_side
from ursa.trust import DETECTOR_FILE, OpenSetDetector, class_activation_map, detector_from_bytes, overlay, scaled_softmax

__all__ = [
    "NONE_OF_THESE",
    "Prediction",
    "Predictor",
    "UNFAMILIAR",
    "build_torch",
    "load_model",
    "ort_session",
    "predict_paths",
    "preprocess",
    "softmax",
]

NONE_OF_THESE = "none of these"  # the label of a prediction under the open-set threshold
UNFAMILIAR = "unfamiliar"  # the reason of a prediction the open-set detector turns away
_HEAD_KEYS = ("1.bn.weight", "1.bn.bias", "1.bn.running_mean", "1.bn.running_var", "1.fc.weight", "1.fc.bias")


def preprocess(im: Image.Image, data_config: dict[str, Any], *, pool: Executor | None = None) -> np.ndarray:
    """Training's evaluation transform: an RGB image -> (1, 3, S, S) float32, NCHW.

    Resize the short side to floor(S / crop_pct) with the model's interpolation, center-crop S x S,
    scale to [0, 1], subtract `mean`, divide by `std`: the functions `ursa.data.transforms.eval_transform`
    calls, in Pillow and numpy only (tested equal). With `pool` (an executor with a free worker) the
    resize uses two cores.
    """
    size, short, resample = eval_geometry(data_config)
    mode = eval_crop_mode(data_config)
    return eval_input(im, short=short, size=size, resample=resample, mean=data_config["mean"], std=data_config["std"], pool=pool, crop_mode=mode)[None]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, C) logits in float32, stable for large values."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# the two backends (no ursa.train import: serving must not need the training code)
# ---------------------------------------------------------------------------------------------------


def build_torch(timm_name: str, state: dict[str, Any], *, where: str) -> Any:
    """nn.Sequential(timm backbone without classifier, `ursa.models.Head`) with `state` loaded strictly:
    the network training built, so a run's state dict loads with no renaming (`1.bn.*`, `1.fc.*`)."""
    import timm
    from torch import nn

    from ursa.models import Head

    missing = [k for k in _HEAD_KEYS if k not in state]
    if missing:
        raise ExportError(f"{where} has no classifier head of the expected form (missing {missing[:3]}). Export a run written by `ursa train`.")
    n_classes, n_features = (int(s) for s in state["1.fc.weight"].shape)
    try:
        backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
    except Exception as exc:  # timm raises RuntimeError / KeyError / ValueError for unknown names
        raise ExportError(f"cannot build the architecture {timm_name!r} recorded for {where} ({type(exc).__name__}: {exc}). Install the timm version it was trained with.") from None
    model = nn.Sequential(backbone, Head(n_features, n_classes, dropout=0.0))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ExportError(f"the weights in {where} do not fit {timm_name}: {' '.join(first)}. The weights file is from another model.") from None
    return model.eval()


def ort_session(model_bytes: bytes, *, threads: int | None, spin: bool) -> Any:
    """An ONNX Runtime CPU session for the ONNX file `model_bytes`, with all graph optimizations.

    `threads` is intra-op threads (None: ONNX Runtime's default, the physical cores). `spin=True` keeps
    worker threads spinning within a run but lets them stop after it, so the next image's preprocessing
    gets the core; `spin=False` lets idle threads sleep, better when other work shares the cores (serving).
    Which is faster on a machine is measured by benchmarks/predict_latency.py; figures are not kept here
    because they change with the machine and the libraries.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default (physical cores)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if spin:  # spin within a run (fast hand-offs between its many small ops), but not after it: the
        # preprocessing of the next image wants that core (benchmarks/predict_latency.py measures the gain)
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:  # idle threads sleep instead of spinning: better when other work shares the cores (serving)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------
# loading and predicting
# ---------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One image's prediction. `probs` is (n_classes,) float32 in `classes` order."""

    label: str  # the class, or NONE_OF_THESE when the top probability is under the threshold
    index: int  # class index of `label`; -1 for NONE_OF_THESE
    prob: float  # top probability
    best: str  # the most probable class, even when rejected
    rejected: bool
    probs: np.ndarray
    top: list[tuple[str, float]]  # the k most probable classes, best first
    ms: dict[str, float] = field(default_factory=dict)  # decode / preprocess / model / total milliseconds
    reason: str | None = None  # why rejected: UNFAMILIAR, or "unsure between A and B"; None when accepted
    unfamiliarity: float | None = None  # the open-set detector's score (above its threshold: unfamiliar); None without one

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the web API's answer)."""
        return {
            "label": self.label,
            "index": self.index,
            "prob": round(float(self.prob), 6),
            "best": self.best,
            "rejected": self.rejected,
            "reason": self.reason,
            "unfamiliarity": None if self.unfamiliarity is None else round(float(self.unfamiliarity), 6),
            "top": [{"label": c, "prob": round(float(p), 6)} for c, p in self.top],
            "ms": {k: round(v, 2) for k, v in self.ms.items()},
        }


class Predictor:
    """A loaded export folder: `predict(image) -> (label, index, probs)`.

    `backend` is "onnx" (ONNX Runtime, the default when installed), "torch" (the safetensors weights
    in PyTorch) or "auto". `precision` "fp32" (default) or "int8" (an export made with --int8) picks the
    ONNX file. `threads` sets ONNX Runtime's intra-op threads (None: its default);
    `spin=False` lets idle worker threads sleep (better when a server shares the cores).
    `open_set=False` never answers NONE_OF_THESE. A Predictor is safe to call from several threads.
    `temperature` is the calibration applied (1.0 when the export has none), `detector` the open-set
    detector (None when the export has none or `open_set=False`).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        backend: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        spin: bool = True,
        open_set: bool = True,
        max_pixels: int = MAX_PIXELS,
    ):
        if backend not in ("auto", "onnx", "torch"):
            raise ExportError(f"backend must be 'auto', 'onnx' or 'torch', not {backend!r}.")
        self.folder = Path(folder)
        meta, _ = read_export(self.folder, files=[])
        if backend == "auto":
            backend = "onnx" if _has_onnxruntime() else "torch"
        precision = precision or "fp32"
        if precision not in ("fp32", "int8"):
            raise ExportError(f"precision must be 'fp32' or 'int8', not {precision!r}.")
        if backend == "torch" and precision == "int8":
            raise ExportError("the int8 model runs in ONNX Runtime only. Use backend 'onnx', or precision 'fp32' with the torch backend.")
        onnx_file = INT8_FILE if precision == "int8" else ONNX_FILE
        if precision == "int8" and onnx_file not in meta.get("files", {}):
            raise ExportError(f"{self.folder} has no int8 model. Export with --int8, or use precision 'fp32'.")
        # Every listed file is checked, also the ones this backend does not use: a tampered folder is refused whole.
        meta, data = read_export(self.folder)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.data_config: dict[str, Any] = dict(meta["preprocess"])
        try:
            eval_crop_mode(self.data_config)
        except UrsaError as exc:
            raise ExportError(f"{self.folder / META_FILE}: {exc}") from None
        self.size = int(self.data_config["input_size"][-1])
        self._min_side = eval_min_side(self.data_config)  # JPEG draft never below the resize's short side
        self.threshold: float = float(meta.get("open_set", {}).get("threshold", 0.0)) if open_set else 0.0
        self.temperature: float = float((meta.get("calibration") or {}).get("temperature") or 1.0)
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ExportError(f"{self.folder / META_FILE} records the temperature {self.temperature!r}; it must be a positive number. Export the run again.")
        self.detector: OpenSetDetector | None = None
        if open_set and DETECTOR_FILE in data:
            try:
                self.detector = detector_from_bytes(data[DETECTOR_FILE], where=str(self.folder / DETECTOR_FILE))
            except UrsaError as exc:
                raise ExportError(f"{exc} Export the run again.") from None
        self._outputs: dict[str, Any] = dict(meta.get("outputs") or {"logits": "logits"})  # a version 2 export: logits only
        self._head: tuple[np.ndarray, np.ndarray] | None = None  # the head's effective weights, for explain (lazy)
        self._weights = data.get(WEIGHTS_FILE)
        if self.detector is not None and not self._outputs.get("embedding"):
            raise ExportError(f"{self.folder} holds an open-set detector but its model gives no embedding. Export the run again.")
        self.backend, self.precision, self.max_pixels = backend, precision, max_pixels
        # One helper thread lets preprocessing use a second core (see `preprocess`); with one thread, none.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ursa-preprocess") if (threads or os.cpu_count() or 1) >= 2 else None
        self._input = meta["input"]["name"]
        if backend == "onnx":
            if not _has_onnxruntime():
                raise ExportError("onnxruntime is not installed. Run: pip install onnxruntime, or use backend 'torch'.")
            try:
                self._session = ort_session(data[onnx_file], threads=threads, spin=spin)
            except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
                raise ExportError(f"ONNX Runtime cannot load {self.folder / onnx_file} ({type(exc).__name__}: {exc}). Export the run again with this version of Ursa.") from None
            shape = self._session.get_inputs()[0].shape
            if self._session.get_inputs()[0].name != self._input or list(shape[1:]) != [3, self.size, self.size]:
                raise ExportError(f"{onnx_file} takes {shape}, not the (n, 3, {self.size}, {self.size}) recorded in {META_FILE}. Export the run again.")
            have = {o.name for o in self._session.get_outputs()}
            missing = [v for v in self._outputs.values() if v and v not in have]
            if missing:
                raise ExportError(f"{onnx_file} has no output {missing[0]!r}, which {META_FILE} lists. Export the run again.")
            self._torch = None
        else:
            from safetensors.torch import load as load_safetensors

            try:
                state = load_safetensors(data[WEIGHTS_FILE])
            except Exception as exc:  # safetensors raises SafetensorError on any malformed header
                raise ExportError(f"{self.folder / WEIGHTS_FILE} is not a readable safetensors file ({exc}). Export the run again.") from None
            self._torch = build_torch(meta["timm_name"], state, where=str(self.folder / WEIGHTS_FILE))
            self._session = None
        out = self.logits(np.zeros((1, 3, self.size, self.size), np.float32))
        if out.shape != (1, len(self.classes)):
            raise ExportError(f"the model gives {out.shape[1]} outputs but {META_FILE} lists {len(self.classes)} classes. Export the run again.")

    def __repr__(self) -> str:
        return f"Predictor({str(self.folder)!r}, backend={self.backend!r}, precision={self.precision!r}, classes={len(self.classes)})"

    # -- the network --
    def run(self, x: np.ndarray, *, embedding: bool = False, feature_map: bool = False) -> list[np.ndarray]:
        """(n, 3, S, S) float32 preprocessed batch -> [logits (n, n_classes)], then the embedding (n, d)
        and the feature map (n, C, h, w) when asked for (ExportError when this export has no such output)."""
        want = ["logits"] + (["embedding"] if embedding else []) + (["feature_map"] if feature_map else [])
        for name in want[1:]:
            if not self._outputs.get(name):
                what = "heat maps (--explain)" if name == "feature_map" else "the open-set detector"
                raise ExportError(f"{self.folder} has no {name} output, which {what} needs: it was exported by an earlier Ursa or from a backbone without a spatial last stage. Export the run again with this Ursa: ursa export runs/NAME --out NEW_FOLDER")
        if self._session is not None:
            return list(self._session.run([self._outputs[n] for n in want], {self._input: x}))
        import torch

        with torch.inference_mode():
            body, head = self._torch[0], self._torch[1]
            xt = torch.from_numpy(x)
            fmap = body.forward_features(xt) if feature_map else None
            emb = body.forward_head(fmap) if fmap is not None else body(xt)
            out = [head(emb).numpy()] + ([emb.numpy()] if embedding else []) + ([fmap.numpy()] if fmap is not None else [])
        return out

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 preprocessed batch -> (n, n_classes) float32 logits (before the temperature)."""
        return self.run(x)[0]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 preprocessed batch -> (n, n_classes) float32 calibrated probabilities."""
        return scaled_softmax(self.logits(x), self.temperature)

    # -- images --
    def load(self, img: Any) -> np.ndarray:
        """Decode (path, bytes or PIL image) and preprocess: -> (1, 3, S, S) float32."""
        return preprocess(decode_image(_image_source(img), min_side=self._min_side, max_pixels=self.max_pixels), self.data_config, pool=self._pool)

    def predict_image(self, img: Any, *, top_k: int = 3) -> Prediction:
        """Decode, preprocess, run and interpret one image; times each step in milliseconds."""
        t0 = time.perf_counter()
        im = decode_image(_image_source(img), min_side=self._min_side, max_pixels=self.max_pixels)
        t1 = time.perf_counter()
        x = preprocess(im, self.data_config, pool=self._pool)
        t2 = time.perf_counter()
        out = self.run(x, embedding=self.detector is not None)
        p = scaled_softmax(out[0], self.temperature)[0]
        t3 = time.perf_counter()
        pred = self.interpret(p, top_k=top_k, embedding=out[1][0] if self.detector is not None else None)
        pred.ms = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "model": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return pred

    def interpret(self, probs: np.ndarray, *, top_k: int = 3, embedding: np.ndarray | None = None) -> Prediction:
        """A (n_classes,) probability vector (and the (d,) embedding, for the detector) -> Prediction,
        applying the open-set rules: the detector first ("unfamiliar"), then the softmax threshold
        ("unsure between A and B", the two most probable classes)."""
        order = np.argsort(-probs, kind="stable")
        k = int(order[0])
        score = float(self.detector.score(embedding[None])[0]) if self.detector is not None and embedding is not None else None
        reason = None
        if score is not None and score > self.detector.threshold:  # type: ignore[union-attr]
            reason = UNFAMILIAR
        elif probs[k] < self.threshold:
            second = self.classes[int(order[1])] if len(order) > 1 else self.classes[k]
            reason = f"unsure between {self.classes[k]} and {second}"
        rejected = reason is not None
        top = [(self.classes[int(i)], float(probs[i])) for i in order[: max(1, top_k)]]
        return Prediction(
            label=NONE_OF_THESE if rejected else self.classes[k],
            index=-1 if rejected else k,
            prob=float(probs[k]),
            best=self.classes[k],
            rejected=rejected,
            probs=probs,
            top=top,
            reason=reason,
            unfamiliarity=score,
        )

    # -- why --
    @property
    def can_explain(self) -> bool:
        """Whether this export gives heat maps (its model has the feature-map output)."""
        return bool(self._outputs.get("feature_map"))

    def head_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as one linear map of the embedding: (weight (n_classes, d), bias (n_classes,)), its
        BatchNorm (eval mode) folded into the linear layer. Read from model.safetensors with numpy."""
        if self._head is None:
            from safetensors.numpy import load

            sd = load(self._weights) if self._weights is not None else {}
            try:
                w, b = sd["1.fc.weight"].astype(np.float64), sd["1.fc.bias"].astype(np.float64)
                gamma, beta = sd["1.bn.weight"].astype(np.float64), sd["1.bn.bias"].astype(np.float64)
                mean, var = sd["1.bn.running_mean"].astype(np.float64), sd["1.bn.running_var"].astype(np.float64)
            except KeyError as exc:
                raise ExportError(f"{self.folder / WEIGHTS_FILE} has no head weight {exc}. Export the run again.") from None
            scale = gamma / np.sqrt(var + 1e-5)  # BatchNorm1d's default eps
            self._head = ((w * scale).astype(np.float32), (b + w @ (beta - mean * scale)).astype(np.float32))
        return self._head

    def explain(self, img: Any, *, target: str | None = None, top_k: int = 3) -> tuple[Prediction, np.ndarray, Image.Image]:
        """(prediction, heat map, overlay) for one image: Grad-CAM of the predicted class (or `target`)
        on the backbone's last stage. The heat map is (h, w) float32 in [0, 1] at the feature map's
        resolution; the overlay is the model's input crop (S x S pixels) with the map blended in.
        ExportError when the export has no feature-map output (an earlier format: export again)."""
        t0 = time.perf_counter()
        im = decode_image(_image_source(img), min_side=self._min_side, max_pixels=self.max_pixels)
        t1 = time.perf_counter()
        x = preprocess(im, self.data_config, pool=self._pool)
        t2 = time.perf_counter()
        outs = self.run(x, embedding=self.detector is not None, feature_map=True)
        logits, fmap = outs[0], outs[-1]
        pred = self.interpret(scaled_softmax(logits, self.temperature)[0], top_k=top_k, embedding=outs[1][0] if self.detector is not None else None)
        if target is not None and target not in self.classes:
            raise ExportError(f"{target!r} is not one of this model's classes ({', '.join(self.classes)}).")
        c = self.classes.index(target) if target is not None else self.classes.index(pred.best)
        cam = class_activation_map(fmap[0], self.head_weights()[0][c])
        t3 = time.perf_counter()
        pred.ms = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "model": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        mean, std = np.asarray(self.data_config["mean"], np.float32), np.asarray(self.data_config["std"], np.float32)
        crop = np.clip((x[0].transpose(1, 2, 0) * std + mean) * 255, 0, 255).astype(np.uint8)  # the pixels the model saw
        return pred, cam, overlay(Image.fromarray(crop, "RGB"), cam)

    def predict(self, img: Any) -> tuple[str, int, np.ndarray]:
        """(label, index, probs) for one image (a file path, the bytes of an image file or a PIL image), as
        the lesson's `learn.predict`: `probs` is (n_classes,) float32; label is NONE_OF_THESE and index -1
        when under the open-set threshold. A file that is not an image raises BadImageError."""
        pred = self.predict_image(img)
        return pred.label, pred.index, pred.probs


def _image_source(img: Any) -> Any:
    """`img` when it is something an image is decoded from (a path, the bytes of an image file, a PIL
    image); anything else raises BadImageError naming the three."""
    if isinstance(img, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return img
    raise BadImageError(f"predict takes an image: a file path, the bytes of an image file or a PIL image, not {type(img).__name__}. For an array, pass PIL.Image.fromarray(array).")


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def load_model(folder: str | os.PathLike[str], **options: Any) -> Predictor:
    """Load an export folder written by `ursa export` (see `Predictor` for the options).

    >>> model = load_model("models/bears")                 # doctest: +SKIP
    >>> label, idx, probs = model.predict("photo.jpg")     # doctest: +SKIP
    """
    return Predictor(folder, **options)


# ---------------------------------------------------------------------------------------------------
# batch prediction (the `ursa predict` command; its path expansion and CSV live in ursa.cli.predict)
# ---------------------------------------------------------------------------------------------------


def predict_paths(predictor: Predictor, paths: Sequence[str | os.PathLike[str]], *, top_k: int = 3, on_done: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One row per path: {path, status "ok" | "error", label, index, prob, best, reason, top, error, probs}.

    A file that cannot be read becomes a row with status "error" and the reason; nothing raises.
    `probs` is the (n_classes,) array, or None for an error row.
    """
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        try:
            pred = predictor.predict_image(path, top_k=top_k)
            rows.append({"path": str(path), "status": "ok", "label": pred.label, "index": pred.index, "prob": pred.prob, "best": pred.best, "reason": pred.reason, "top": pred.top, "error": "", "probs": pred.probs})
        except BadImageError as exc:
            rows.append({"path": str(path), "status": "error", "label": "", "index": None, "prob": None, "best": "", "reason": None, "top": [], "error": str(exc), "probs": None})
        if on_done:
            on_done(i + 1, len(paths))
    return rows
