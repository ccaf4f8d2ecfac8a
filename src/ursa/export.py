"""Write and load the export folder, and predict with it on a CPU.

An export folder holds plain data only, so loading it never runs code from the files:

```
models/bears/
  model.json          metadata: classes, architecture, preprocessing, open-set threshold, metrics,
                      library versions, the sha256 of every other file, and `content_sha256`: the
                      sha256 of model.json's own content (canonical JSON without that key)
  model.safetensors   weights of nn.Sequential(backbone, head) (tensors only)
  model.onnx          the same network as an ONNX graph (float32), checked against PyTorch
  model.int8.onnx     optional: statically quantized (QDQ, per-channel int8) copy
```

`export_run` builds the folder from a training run; `load_model` / `Predictor` read it back, refusing a
folder whose files do not match the hashes in model.json (tampered, truncated or swapped), whose
model.json was edited (a lowered open-set threshold, a renamed class), that holds any file model.json
does not list, or whose model.json is not Ursa's. `content_sha256` covers model.json and, through the
hashes it lists, every file: one value names the whole folder. It detects edits and stray files; it is
not a signature (whoever can write the folder can rewrite it), so load models from sources you trust. Prediction runs ONNX Runtime by default and PyTorch as the fallback; both use
the one preprocessing function here, which reproduces training's evaluation transform
(`ursa.data.transforms.open_image` + `eval_transform`) with Pillow and numpy only, so serving needs
neither torch nor torchvision.

Open set: a photo of none of the classes still gets a softmax over the classes. The export records a
threshold on the top probability, calibrated on the validation set (by default the 5th percentile of
the top probability of correctly classified validation images, so about 95% of good predictions pass);
below it the prediction is `NONE_OF_THESE`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ursa.data.images import MAX_PIXELS, draft_jpeg, eval_crop_mode, eval_geometry, eval_input, eval_min_side, to_rgb, upright_rgb
from ursa.errors import ExportError, UrsaError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "NONE_OF_THESE",
    "ONNX_TOLERANCE",
    "BadImageError",
    "NotAnImageError",
    "ImageTooLargeError",
    "ExportResult",
    "Prediction",
    "Predictor",
    "export_run",
    "load_model",
    "expand_image_paths",
    "predict_paths",
    "write_predictions_csv",
    "read_export",
    "decode_image",
    "preprocess",
    "softmax",
]

FORMAT = "ursa.export"
FORMAT_VERSION = 2  # 2: model.json carries content_sha256, and the folder holds only the files it lists
NONE_OF_THESE = "none of these"  # the label of a prediction under the open-set threshold
ONNX_TOLERANCE = 1e-4  # largest |logit difference| allowed between ONNX Runtime and PyTorch at export
_ONNX_FILE, _INT8_FILE, _WEIGHTS_FILE, _META_FILE = "model.onnx", "model.int8.onnx", "model.safetensors", "model.json"
_HEAD_KEYS = ("1.bn.weight", "1.bn.bias", "1.bn.running_mean", "1.bn.running_var", "1.fc.weight", "1.fc.bias")

class BadImageError(ExportError):
    """The input is not an image Pillow can decode (or it is truncated)."""


class NotAnImageError(BadImageError):
    """The input is not in any image format Pillow knows."""


class ImageTooLargeError(BadImageError):
    """The image has more pixels than the decoder is allowed to expand (a decompression-bomb guard)."""


# ---------------------------------------------------------------------------------------------------
# decoding and preprocessing (shared by export, both predictor backends, the CLI and the web app)
# ---------------------------------------------------------------------------------------------------


def decode_image(src: Any, *, min_side: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `src` (a path, the bytes of an image file, or a PIL image) as an upright RGB PIL image.

    Same rules as training's `open_image`: EXIF orientation applied, transparency composited on white,
    and JPEGs at least twice as large as `min_side` (px, short side) decoded at 1/2, 1/4 or 1/8 scale
    by the JPEG decoder itself (draft mode). An image over `max_pixels` (width x height, read from the
    header before decoding) raises ImageTooLargeError; anything Pillow cannot decode raises BadImageError.
    """
    if isinstance(src, Image.Image):
        return to_rgb(src)
    is_bytes = isinstance(src, (bytes, bytearray, memoryview))
    name = "the upload" if is_bytes else str(src)
    try:
        # Decoding from memory leaves no file handle open, so the decoded image itself can be returned
        # (no copy: a fresh 0.5 MB buffer costs ~1 ms of page faults).
        data = bytes(src) if is_bytes else Path(src).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below, with our limit
            im = Image.open(io.BytesIO(data))
    except FileNotFoundError:
        raise BadImageError(f"{name} does not exist. Check the path.") from None
    except IsADirectoryError:
        raise BadImageError(f"{name} is a folder, not an image file.") from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name} is not an image Pillow can read. Send a JPEG, PNG, WebP, GIF or BMP file.") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name} is too large to decode safely ({exc}). Send a smaller image.") from None
    except PermissionError:
        raise BadImageError(f"cannot read {name}: permission denied.") from None
    except OSError as exc:
        raise BadImageError(f"{name} is a damaged or truncated image ({exc}).") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:.0f}. Send a smaller image.")
    try:
        draft_jpeg(im, min_side)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return upright_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name} is too large to decode safely ({exc}). Send a smaller image.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what Pillow raises on broken or truncated data
        raise BadImageError(f"{name} is a damaged or truncated image ({type(exc).__name__}: {exc}).") from None


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
# network construction (no ursa.train import: serving must not need the training code)
# ---------------------------------------------------------------------------------------------------


def _build_torch(timm_name: str, state: dict[str, Any], *, where: str) -> Any:
    """nn.Sequential(timm backbone without classifier, head bn -> dropout -> fc) with `state` loaded strictly.

    The head mirrors `ursa.train.learner.Head` key for key (`1.bn.*`, `1.fc.*`), so a run's state dict
    loads with no renaming and gives the same function in eval mode.
    """
    from collections import OrderedDict

    import timm
    from torch import nn

    missing = [k for k in _HEAD_KEYS if k not in state]
    if missing:
        raise ExportError(f"{where} has no classifier head of the expected form (missing {missing[:3]}). Export a run written by `ursa train`.")
    n_classes, n_features = (int(s) for s in state["1.fc.weight"].shape)
    try:
        backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
    except Exception as exc:  # timm raises RuntimeError / KeyError / ValueError for unknown names
        raise ExportError(f"cannot build the architecture {timm_name!r} recorded for {where} ({type(exc).__name__}: {exc}). Install the timm version it was trained with.") from None
    head = nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(n_features), drop=nn.Dropout(0.0), fc=nn.Linear(n_features, n_classes)))
    model = nn.Sequential(backbone, head)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ExportError(f"the weights in {where} do not fit {timm_name}: {' '.join(first)}. The weights file is from another model.") from None
    return model.eval()


def _ort_session(model_bytes: bytes, *, threads: int | None, spin: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default (physical cores)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if spin:  # spin within a run (fast hand-offs between its many small ops), but not after it: the
        # preprocessing of the next image wants that core (measured ~1.4 ms less per photo)
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:  # idle threads sleep instead of spinning: better when other work shares the cores (serving)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _content_sha256(meta: dict[str, Any]) -> str:
    """sha256 of model.json's content: its canonical JSON (sorted keys, no spaces, UTF-8) without the
    `content_sha256` key itself. Canonical, so it is the content that is hashed, not the file's layout."""
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def read_export(folder: str | os.PathLike[str], *, files: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read model.json and the bytes of the listed `files` (default: all it lists), each checked
    against its recorded size and sha256. Returns (metadata, {file name: bytes}).

    The bytes returned are the bytes hashed, so nothing can change between check and use. Raises
    ExportError for a missing folder or file, a model.json that is not an Ursa export of a supported
    version or whose content does not match its `content_sha256` (edited), a file in the folder that
    model.json does not list (foreign), or a file whose hash differs (tampered, truncated or swapped).
    An export of format version 1 (before model.json was hashed) is refused with the fix: export again.
    """
    folder = Path(folder)
    meta_path = folder / _META_FILE
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist. Create it with: ursa export runs/NAME --out {folder}")
    if not meta_path.is_file():
        raise ExportError(f"{folder} has no {_META_FILE}, so it is not an Ursa export folder. Create one with: ursa export runs/NAME --out {folder}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{meta_path} is not valid JSON ({exc}). The folder is damaged: export the run again.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{meta_path} is not an Ursa model description (no \"format\": \"{FORMAT}\"). Export the model with `ursa export`.")
    if meta.get("format_version") == 1:
        # Not read with the old rules: anyone could then skip the checks below by writing version 1.
        raise ExportError(f"{folder} was exported by an earlier Ursa (format version 1), whose model.json carries no hash of its own content, so edits to it cannot be detected. Export the run again with this Ursa: ursa export runs/NAME --out NEW_FOLDER")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{meta_path} has format version {meta.get('format_version')!r}; this Ursa reads version {FORMAT_VERSION}. Export the run again with this Ursa.")
    if meta.get("content_sha256") != _content_sha256(meta):
        raise ExportError(f"{meta_path} was edited after export: its content does not match its content_sha256 (a changed class name, threshold or hash is refused). Export the run again; do not load models from an untrusted source.")
    listed = meta.get("files")
    if not isinstance(listed, dict) or _WEIGHTS_FILE not in listed:
        raise ExportError(f"{meta_path} lists no file hashes. Export the run again.")
    for entry in sorted(folder.iterdir()):
        if entry.name != _META_FILE and entry.name not in listed:
            raise ExportError(f"{entry} is not part of this export: {_META_FILE} does not list it, and an export folder holds only the files it lists. Remove it from the folder (or export the run again into a new folder).")
    for name in listed:
        if not isinstance(name, str) or Path(name).name != name or name in (_META_FILE, ".", ".."):
            raise ExportError(f"{meta_path} lists {name!r}, which is not a file name of an export folder. Export the run again.")
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name} is missing. The export folder is incomplete: export the run again.")
    out: dict[str, bytes] = {}
    for name in files if files is not None else list(listed):
        rec = listed.get(name)
        if not isinstance(rec, dict) or Path(name).name != name:
            raise ExportError(f"{meta_path} does not list {name}. Export the run again (with --int8 for the quantized model).")
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path} is missing. The export folder is incomplete: export the run again.")
        data = path.read_bytes()
        if len(data) != rec.get("bytes") or _sha256(data) != rec.get("sha256"):
            raise ExportError(f"{path} does not match the sha256 recorded in {_META_FILE}: it was altered, truncated or replaced. Export the run again; do not load files from an untrusted source.")
        out[name] = data
    return meta, out


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the web API's answer)."""
        return {
            "label": self.label,
            "index": self.index,
            "prob": round(float(self.prob), 6),
            "best": self.best,
            "rejected": self.rejected,
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
        onnx_file = _INT8_FILE if precision == "int8" else _ONNX_FILE
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
            raise ExportError(f"{self.folder / _META_FILE}: {exc}") from None
        self.size = int(self.data_config["input_size"][-1])
        self._min_side = eval_min_side(self.data_config)  # JPEG draft never below the resize's short side
        self.threshold: float = float(meta.get("open_set", {}).get("threshold", 0.0)) if open_set else 0.0
        self.backend, self.precision, self.max_pixels = backend, precision, max_pixels
        # One helper thread lets preprocessing use a second core (see `preprocess`); with one thread, none.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ursa-preprocess") if (threads or os.cpu_count() or 1) >= 2 else None
        self._input = meta["input"]["name"]
        if backend == "onnx":
            if not _has_onnxruntime():
                raise ExportError("onnxruntime is not installed. Run: pip install onnxruntime, or use backend 'torch'.")
            try:
                self._session = _ort_session(data[onnx_file], threads=threads, spin=spin)
            except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
                raise ExportError(f"ONNX Runtime cannot load {self.folder / onnx_file} ({type(exc).__name__}: {exc}). Export the run again with this version of Ursa.") from None
            shape = self._session.get_inputs()[0].shape
            if self._session.get_inputs()[0].name != self._input or list(shape[1:]) != [3, self.size, self.size]:
                raise ExportError(f"{onnx_file} takes {shape}, not the (n, 3, {self.size}, {self.size}) recorded in {_META_FILE}. Export the run again.")
            self._torch = None
        else:
            from safetensors.torch import load as load_safetensors

            try:
                state = load_safetensors(data[_WEIGHTS_FILE])
            except Exception as exc:  # safetensors raises SafetensorError on any malformed header
                raise ExportError(f"{self.folder / _WEIGHTS_FILE} is not a readable safetensors file ({exc}). Export the run again.") from None
            self._torch = _build_torch(meta["timm_name"], state, where=str(self.folder / _WEIGHTS_FILE))
            self._session = None
        out = self.logits(np.zeros((1, 3, self.size, self.size), np.float32))
        if out.shape != (1, len(self.classes)):
            raise ExportError(f"the model gives {out.shape[1]} outputs but {_META_FILE} lists {len(self.classes)} classes. Export the run again.")

    def __repr__(self) -> str:
        return f"Predictor({str(self.folder)!r}, backend={self.backend!r}, precision={self.precision!r}, classes={len(self.classes)})"

    # -- the network --
    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 preprocessed batch -> (n, n_classes) float32 logits."""
        if self._session is not None:
            return self._session.run(None, {self._input: x})[0]
        import torch

        with torch.inference_mode():
            return self._torch(torch.from_numpy(x)).numpy()

    def probs(self, x: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 preprocessed batch -> (n, n_classes) float32 probabilities."""
        return softmax(self.logits(x))

    # -- images --
    def load(self, img: Any) -> np.ndarray:
        """Decode (path, bytes or PIL image) and preprocess: -> (1, 3, S, S) float32."""
        return preprocess(decode_image(img, min_side=self._min_side, max_pixels=self.max_pixels), self.data_config, pool=self._pool)

    def predict_image(self, img: Any, *, top_k: int = 3) -> Prediction:
        """Decode, preprocess, run and interpret one image; times each step in milliseconds."""
        t0 = time.perf_counter()
        im = decode_image(img, min_side=self._min_side, max_pixels=self.max_pixels)
        t1 = time.perf_counter()
        x = preprocess(im, self.data_config, pool=self._pool)
        t2 = time.perf_counter()
        p = self.probs(x)[0]
        t3 = time.perf_counter()
        pred = self.interpret(p, top_k=top_k)
        pred.ms = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "model": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return pred

    def interpret(self, probs: np.ndarray, *, top_k: int = 3) -> Prediction:
        """A (n_classes,) probability vector -> Prediction, applying the open-set threshold."""
        order = np.argsort(-probs, kind="stable")
        k = int(order[0])
        rejected = bool(probs[k] < self.threshold)
        top = [(self.classes[int(i)], float(probs[i])) for i in order[: max(1, top_k)]]
        return Prediction(
            label=NONE_OF_THESE if rejected else self.classes[k],
            index=-1 if rejected else k,
            prob=float(probs[k]),
            best=self.classes[k],
            rejected=rejected,
            probs=probs,
            top=top,
        )

    def predict(self, img: Any) -> tuple[str, int, np.ndarray]:
        """(label, index, probs) for one image, as the lesson's `learn.predict`: `probs` is (n_classes,)
        float32; label is NONE_OF_THESE and index -1 when under the open-set threshold."""
        pred = self.predict_image(img)
        return pred.label, pred.index, pred.probs


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
# writing
# ---------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What `export_run` wrote and measured."""

    out: Path
    meta: dict[str, Any]

    @property
    def max_abs_diff(self) -> float:
        """Largest |ONNX - PyTorch| logit difference on real validation images."""
        return float(self.meta["onnx"]["max_abs_diff_logits"])


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        free = out.with_name(out.name + "-2")
        i = 2
        while free.exists():
            i += 1
            free = out.with_name(f"{out.name}-{i}")
        raise ExportError(f"{out} already exists and is not empty; an export never overwrites files. Pass a new folder, e.g. --out {free}, or remove {out} first.")


def _read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    config_path, weights = run / "config.json", run / "models" / "model.safetensors"
    if not run.is_dir():
        raise ExportError(f"run folder {run} does not exist. Pass the folder `ursa train --out` wrote, e.g. runs/bears.")
    if not config_path.is_file() or not weights.is_file():
        raise ExportError(f"{run} is not a finished training run (needs config.json and models/model.safetensors). Pass the folder `ursa train --out` wrote.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError and OSError
        raise ExportError(f"{weights} is not a readable safetensors file ({exc}). Train the run again.") from None
    return config, metrics, state


def _valid_images(run: Path, data_root: str | os.PathLike[str] | None, classes: list[str]) -> tuple[list[Path], list[int], list[Path], Path]:
    from ursa.data.split import load_split

    split = load_split(run / "split.json", root=data_root)
    if not split.root.is_dir():
        raise ExportError(f"the dataset {split.root} this run was trained on is not there; the export checks the model on its validation images. Pass --data with the dataset folder's new location.")
    if list(split.classes) != list(classes):
        raise ExportError(f"split.json lists classes {split.classes}, config.json {classes}: the run folder is inconsistent. Train the run again.")
    index = {c: i for i, c in enumerate(classes)}
    valid = [split.root / it.name for it in split.valid]
    return valid, [index[it.label] for it in split.valid], [split.root / it.name for it in split.train], split.root


def _batches(xs: list[np.ndarray], n: int) -> Iterable[np.ndarray]:
    for i in range(0, len(xs), n):
        yield np.concatenate(xs[i : i + n])


def export_run(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    int8: bool = False,
    data_root: str | os.PathLike[str] | None = None,
    open_set_quantile: float = 0.05,
    check_images: int = 32,
    calibration_images: int = 64,
    opset: int = 17,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a training run folder to `out` (which must not exist or be empty) and check it.

    Steps: rebuild the network from the run's safetensors weights; convert it to ONNX (dynamic batch
    axis, opset `opset`); run the first `check_images` validation images through both and fail when the
    largest |logit difference| exceeds ONNX_TOLERANCE (images spread over the validation set); score every validation image with the ONNX
    model (single view, exactly as the Predictor will) for the accuracy and the open-set threshold
    (`open_set_quantile` of the top probability among correctly classified images); with `int8`, also
    quantize statically on up to `calibration_images` training images and report the accuracy change.
    The folder is written under a temporary name and renamed at the end: an interrupted export leaves
    nothing behind. `data_root` overrides the dataset location recorded in split.json.
    """
    import torch

    run, out = Path(run), Path(out)
    say = on_step or (lambda msg: None)
    _check_out(out)
    if not 0.0 <= open_set_quantile < 0.5:
        raise ExportError(f"the open-set quantile must be in [0, 0.5), got {open_set_quantile}. Use 0.05 to let about 95% of correct predictions through, 0 to keep every one.")
    config, metrics, state = _read_run(run)
    classes = list(config["classes"])
    data_config = dict(config["data_config"])
    size = int(data_config["input_size"][-1])
    model = _build_torch(config["timm_name"], state, where=str(run / "models" / "model.safetensors"))
    if model[1].fc.out_features != len(classes):
        raise ExportError(f"the weights have {model[1].fc.out_features} outputs but config.json lists {len(classes)} classes. Train the run again.")

    valid_paths, valid_y, train_paths, root = _valid_images(run, data_root, classes)
    say(f"reading {len(valid_paths)} validation images from {root}")
    xs, ys, skipped = [], [], []
    min_side = eval_min_side(data_config, size=size)
    for p, y in zip(valid_paths, valid_y):
        try:
            xs.append(preprocess(decode_image(p, min_side=min_side), data_config))
            ys.append(y)
        except BadImageError as exc:
            skipped.append(f"{p.name}: {exc}")
    if not xs:
        raise ExportError(f"none of the {len(valid_paths)} validation images under {root} could be read; the export needs them to check the model. Pass --data with the dataset folder.")

    say("converting to ONNX")
    onnx_bytes = _to_onnx(model, size, classes, opset=opset)
    session = _ort_session(onnx_bytes, threads=None, spin=True)
    x_check = np.concatenate(xs[:: max(1, len(xs) // max(1, check_images))][:check_images])  # spread over the classes
    with torch.inference_mode():
        ref = model(torch.from_numpy(x_check)).numpy()
    got = session.run(None, {"input": x_check})[0]
    diff_logits = float(np.abs(got - ref).max())
    diff_probs = float(np.abs(softmax(got) - softmax(ref)).max())
    say(f"ONNX vs PyTorch on {len(x_check)} validation images: max |logit difference| {diff_logits:.2e}")
    if not diff_logits <= ONNX_TOLERANCE:  # also catches NaN
        raise ExportError(f"the ONNX model differs from PyTorch by up to {diff_logits:.3g} in the logits on real images (limit {ONNX_TOLERANCE:g}). Try another --opset or onnxruntime version; do not serve this model.")

    probs = np.concatenate([softmax(session.run(None, {"input": b})[0]) for b in _batches(xs, 32)])
    y = np.asarray(ys)
    pred = probs.argmax(1)
    acc = float((pred == y).mean())
    top = probs.max(1)
    correct_top = top[pred == y]
    # The quantile of the correctly classified images' confidence: the share of good predictions the
    # threshold gives up. With no correct prediction there is nothing to calibrate on: no rejection.
    threshold = float(np.quantile(correct_top, open_set_quantile, method="lower")) if len(correct_top) else 0.0
    accepted = top >= threshold
    open_set = {
        "threshold": round(threshold, 6),
        "quantile": open_set_quantile,
        "method": "quantile of the top probability of correctly classified validation images",
        "n_valid": int(len(y)),
        "valid_accepted": round(float(accepted.mean()), 4),
        "valid_accuracy_accepted": round(float((pred[accepted] == y[accepted]).mean()) if accepted.any() else 0.0, 4),
    }

    int8_info = None
    int8_bytes = None
    if int8:
        say(f"quantizing to int8 on up to {calibration_images} training images")
        int8_bytes, n_cal, kept = _quantize(onnx_bytes, train_paths, data_config, n=calibration_images)
        s8 = _ort_session(int8_bytes, threads=None, spin=True)
        p8 = np.concatenate([softmax(s8.run(None, {"input": b})[0]) for b in _batches(xs, 32)])
        acc8 = float((p8.argmax(1) == y).mean())
        int8_info = {
            "file": _INT8_FILE,
            "calibration_images": n_cal,
            "float32_nodes": kept,  # the stem, the first blocks and the classifier (see _float_nodes)
            "valid_accuracy_fp32": round(acc, 4),
            "valid_accuracy_int8": round(acc8, 4),
            "accuracy_change": round(acc8 - acc, 4),
            "max_abs_diff_probs": round(float(np.abs(p8 - probs).max()), 6),
            "agreement_with_fp32": round(float((p8.argmax(1) == pred).mean()), 4),
        }
        say(f"int8 validation accuracy {acc8:.4f} vs fp32 {acc:.4f} (change {acc8 - acc:+.4f})")

    meta = _metadata(run, out, config, metrics, classes, data_config, size, opset, open_set, int8_info)
    meta["onnx"].update({"max_abs_diff_logits": diff_logits, "max_abs_diff_probs": diff_probs, "checked_images": int(len(x_check))})
    meta["metrics"]["export_valid"] = {"accuracy": round(acc, 4), "error_rate": round(1 - acc, 4), "n": int(len(y)), "n_unreadable": len(skipped), "views": "single (no test-time augmentation)"}
    from safetensors.torch import save

    files = {
        _WEIGHTS_FILE: save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata={"format": FORMAT, "classes": json.dumps(classes), "timm_name": config["timm_name"]}),
        _ONNX_FILE: onnx_bytes,
    }
    if int8_bytes is not None:
        files[_INT8_FILE] = int8_bytes
    meta["files"] = {name: {"sha256": _sha256(b), "bytes": len(b)} for name, b in files.items()}
    meta["content_sha256"] = _content_sha256(meta)  # last: it covers everything above, the file hashes included
    _write_folder(out, files, meta)
    say(f"wrote {out} (content_sha256 {meta['content_sha256']}: it covers model.json and every file)")
    return ExportResult(out, meta)


def _static_same_padding(model: Any, size: int) -> Any:
    """A copy of `model` whose TF-style "same"-padded convolutions (timm's Conv2dSame, used by the
    tf_efficientnet family) pad by constants computed for a size x size input.

    Traced as is, each of them exports as ~30 shape-arithmetic nodes and a Pad that ONNX Runtime can
    neither fold into the convolution nor keep in its blocked (NCHWc) layout: about a quarter of the
    model's CPU time here. With constant pads, `_fuse_pads` moves them into the Conv nodes. Same
    function for this input size (the export's parity check compares against the original model).
    """
    import copy

    import torch
    import torch.nn.functional as F

    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import get_same_padding
    except ImportError:  # a timm without them has nothing to rewrite
        return model
    out = copy.deepcopy(model).eval()
    seen: dict[Any, tuple[int, int]] = {}

    def record(mod: Any, args: tuple[Any, ...]) -> None:
        seen[mod] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(record) for m in out.modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        out(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for mod, (ih, iw) in seen.items():
        kh, kw = mod.weight.shape[-2:]
        ph = get_same_padding(ih, int(kh), mod.stride[0], mod.dilation[0])
        pw = get_same_padding(iw, int(kw), mod.stride[1], mod.dilation[1])
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

        def forward(x: Any, mod: Any = mod, pads: tuple[int, int, int, int] = pads) -> Any:
            return F.conv2d(F.pad(x, pads), mod.weight, mod.bias, mod.stride, 0, mod.dilation, mod.groups)

        mod.forward = forward
    return out


def _constant(g: Any, name: str, producer: dict[str, Any], inits: dict[str, Any]) -> np.ndarray | None:
    """The value of tensor `name` when it depends on constants only (evaluated with onnx's reference
    runtime), else None."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if name in inits:
        return numpy_helper.to_array(inits[name])
    chain: list[Any] = []
    todo, done = [name], set()
    while todo:
        t = todo.pop()
        if t in done or t in inits or not t:
            continue
        node = producer.get(t)
        if node is None:  # a graph input: not constant
            return None
        done.add(t)
        chain.append(node)
        todo.extend(node.input)
    order = {id(n): i for i, n in enumerate(g.node)}
    nodes = sorted({id(n): n for n in chain}.values(), key=lambda n: order[id(n)])
    used = {i for n in nodes for i in n.input}
    sub = helper.make_graph(nodes, "c", [], [helper.make_tensor_value_info(name, 0, None)], [inits[i] for i in used if i in inits])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 17)])
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def _fuse_pads(proto: Any) -> int:
    """Move each zero-valued constant Pad of the spatial axes that feeds only a Conv into that Conv's
    `pads`, then drop the nodes nothing uses any more. Returns how many were fused; the rest is untouched."""
    from onnx import helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    users: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    fused = 0
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        after = users.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if len(after) != 1 or after[0].op_type != "Conv" or pad.output[0] in outputs or mode != b"constant":
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = _constant(g, pad.input[2], producer, inits)
            if value is None or np.any(value != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes: keep it simple, leave such a Pad alone
            continue
        pads = _constant(g, pad.input[1], producer, inits)
        if pads is None or pads.shape != (8,) or np.any(pads[[0, 1, 4, 5]] != 0) or np.any(pads < 0):
            continue
        conv = after[0]
        attrs = {a.name: a for a in conv.attribute}
        if ("auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET")) or ("pads" in attrs and any(attrs["pads"].ints)):
            continue
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        top, left, bottom, right = (int(v) for v in pads[[2, 3, 6, 7]])
        conv.attribute.append(helper.make_attribute("pads", [top, left, bottom, right]))
        conv.input[0] = pad.input[0]
        g.node.remove(pad)
        fused += 1
    needed = set(outputs)
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(reversed(keep))
    return fused


def _to_onnx(model: Any, size: int, classes: list[str], *, opset: int) -> bytes:
    import onnx
    import torch

    model = _static_same_padding(model, size)
    buf = io.BytesIO()
    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        try:
            torch.onnx.export(
                model, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
            )  # fmt: skip
        except Exception as exc:  # the exporter raises many kinds for unsupported operators
            raise ExportError(f"PyTorch could not convert this model to ONNX opset {opset} ({type(exc).__name__}: {exc}). Try another --opset.") from None
    proto = onnx.load_from_string(buf.getvalue())
    _fuse_pads(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the ONNX graph PyTorch wrote does not pass onnx's checker ({exc}). Try another --opset.") from None
    proto.doc_string = "Ursa image classifier; preprocessing and classes are in model.json"
    for k, v in (("ursa_format", FORMAT), ("classes", json.dumps(classes))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()


def _quantize(onnx_bytes: bytes, train_paths: list[Path], data_config: dict[str, Any], *, n: int) -> tuple[bytes, int, list[str]]:
    """Static int8 quantization (QDQ, per-channel weights, uint8 activations) calibrated on training images;
    -> (model, calibration images used, nodes kept in float32)."""
    from onnxruntime.quantization import CalibrationDataReader

    size = int(data_config["input_size"][-1])
    step = max(1, len(train_paths) // max(1, n))
    batches = []
    min_side = eval_min_side(data_config, size=size)
    for p in train_paths[::step][:n]:
        try:
            batches.append(preprocess(decode_image(p, min_side=min_side), data_config))
        except BadImageError:
            continue
    if not batches:
        raise ExportError("no training image could be read to calibrate the int8 model. Pass --data with the dataset folder, or export without --int8.")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"input": x}

    with tempfile.TemporaryDirectory(prefix="ursa-int8-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # the quantizer logs per-tensor notes on the root logger
            try:
                kept = _quantize_files(src, pre, dst, _Reader())
            finally:
                logging.disable(logging.NOTSET)
        return dst.read_bytes(), len(batches), kept


def _quantize_files(src: Path, pre: Path, dst: Path, reader: Any) -> list[str]:
    """ONNX Runtime's recommended pre-processing (shape inference, fusions), then static QDQ quantization.
    Returns the nodes kept in float32 (see `_float_nodes`)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    keep = _float_nodes(onnx.load(str(pre)))
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_exclude=keep)  # fmt: skip
    return keep


def _float_nodes(proto: Any) -> list[str]:
    """The nodes int8 would hurt most, kept in float32: the convolutions whose output has at least a
    quarter of the input's height (the stem and the first blocks, whose few channels carry all of the
    image) and the classifier. Quantizing everything changed the validation accuracy by -1.5% on monkey10
    (272 photos) and by -11.4% on the demo's digits; with these kept, by 0.0% on both (99.3% and 97.5%
    of answers the same as float32's), and the network ran no slower than fully quantized: quantizing
    and dequantizing the large early activations costs about what int8 saves there."""
    g = proto.graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.value_info, *g.output]}
    shape = dims.get(g.input[0].name, []) if g.input else []
    in_h = shape[2] if len(shape) == 4 else 0  # 0: unknown, then only the classifier is kept
    keep = []
    for node in g.node:
        out = dims.get(node.output[0], [])
        if node.op_type in ("Gemm", "MatMul") or (node.op_type == "Conv" and in_h > 0 and len(out) == 4 and out[2] * 4 >= in_h):
            keep.append(node.name)
    return keep


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ursa", "torch", "timm", "onnx", "onnxruntime", "safetensors", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


_RESIZE_STEPS = {
    "center": "resize short side, center crop",
    "squash": "resize both sides (aspect not kept), center crop",
    "border": "resize long side, pad with the mean colour, center crop",
}


def _metadata(run: Path, out: Path, config: dict[str, Any], metrics: dict[str, Any], classes: list[str], data_config: dict[str, Any], size: int, opset: int, open_set: dict[str, Any], int8_info: dict[str, Any] | None) -> dict[str, Any]:
    keep = ("error_rate", "accuracy", "valid_loss", "n_train", "n_valid", "tta", "final_stage")
    mode = eval_crop_mode(data_config)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": out.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": classes,
        "arch": config.get("arch"),
        "timm_name": config["timm_name"],
        "num_features": config.get("num_features"),
        "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": ["batch", len(classes)], "then": "softmax"},
        "preprocess": {
            **{k: data_config[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in data_config},
            "crop_mode": mode,
            "resize_short_side": eval_min_side(data_config, size=size),  # the resize's short side, also the JPEG draft limit
            "steps": "decode (EXIF upright, RGB on white; JPEG draft to >= resize_short_side), " + _RESIZE_STEPS[mode] + ", /255, (x - mean) / std",
        },
        "open_set": open_set,
        "onnx": {"file": _ONNX_FILE, "opset": opset, "tolerance": ONNX_TOLERANCE},
        "int8": int8_info,
        "metrics": {"training": {k: metrics[k] for k in keep if k in metrics}},
        "versions": {**_versions(), "trained_with_torch": config.get("torch")},
        "source": {"run": str(run.resolve()), "dataset": config.get("root")},
    }


def _write_folder(out: Path, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an export folder is meant to be shared
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _check_out(out)  # again: someone may have written there while we worked
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------
# batch prediction (the `ursa predict` command)
# ---------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def expand_image_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Paths as given, with folders replaced by their image files (sorted, not recursive) and glob
    patterns the shell did not expand (quoted, or on Windows) expanded; a pattern matching nothing is
    kept so that it becomes an error row."""
    import glob

    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        elif not p.exists() and any(ch in str(raw) for ch in "*?["):
            out.extend(Path(m) for m in sorted(glob.glob(str(raw))) or [str(raw)])
        else:
            out.append(p)
    return out


def predict_paths(predictor: Predictor, paths: Sequence[str | os.PathLike[str]], *, top_k: int = 3, on_done: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One row per path: {path, status "ok" | "error", label, index, prob, best, top, error, probs}.

    A file that cannot be read becomes a row with status "error" and the reason; nothing raises.
    `probs` is the (n_classes,) array, or None for an error row.
    """
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        try:
            pred = predictor.predict_image(path, top_k=top_k)
            rows.append({"path": str(path), "status": "ok", "label": pred.label, "index": pred.index, "prob": pred.prob, "best": pred.best, "top": pred.top, "error": "", "probs": pred.probs})
        except BadImageError as exc:
            rows.append({"path": str(path), "status": "error", "label": "", "index": None, "prob": None, "best": "", "top": [], "error": str(exc), "probs": None})
        if on_done:
            on_done(i + 1, len(paths))
    return rows


def write_predictions_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], classes: Sequence[str]) -> Path:
    """Write `predict_paths` rows as CSV (atomically): path,status,label,prob,best,top,error,p_<class>...

    `top` is "class:prob" pairs joined by "; "; probabilities have 6 decimals; error rows leave them empty.
    """
    import csv

    from ursa._io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "status", "label", "prob", "best", "top", "error", *[f"p_{c}" for c in classes]])
    for r in rows:
        probs = [f"{float(v):.6f}" for v in r["probs"]] if r["probs"] is not None else [""] * len(classes)
        top = "; ".join(f"{c}:{p:.4f}" for c, p in r["top"])
        w.writerow([r["path"], r["status"], r["label"], "" if r["prob"] is None else f"{r['prob']:.6f}", r["best"], top, r["error"], *probs])
    return atomic_write_text(path, buf.getvalue())
