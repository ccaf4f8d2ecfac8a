"""Write and load the export folder, and predict with it on a CPU.

`export_run` builds the folder from a training run, `export_learner` from a Learner in memory (the same
path); `load_model` / `Predictor` read it back, refusing a folder that is not exactly what the export
wrote. One idea per module, lower ones first:

- `artifact`: the folder's format (file names, model.json, hashes), `read_export` and the atomic write;
- `predictor`: `Predictor`, `load_model`, the preprocessing shared with training's evaluation transform,
  the ONNX Runtime session and the PyTorch fallback;
- `onnx`: the ONNX conversion and its graph surgery; `quantize`: the int8 model;
- `run`: `export_run` and `export_learner`, which check the ONNX graph against PyTorch and calibrate the
  open-set threshold.

Serving imports this package: every module here imports torch, onnx and the quantizer inside functions
only, so loading a model for ONNX Runtime needs neither torch nor onnx.
"""

from __future__ import annotations

from ursa.export.artifact import FORMAT, FORMAT_VERSION, read_export
from ursa.export.onnx import ONNX_TOLERANCE
from ursa.export.predictor import NONE_OF_THESE, Prediction, Predictor, load_model, predict_paths, preprocess, softmax
from ursa.export.run import ExportResult, ExportSource, export_learner, export_run
from ursa.imageio import MAX_PIXELS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_PIXELS",
    "NONE_OF_THESE",
    "ONNX_TOLERANCE",
    "ExportResult",
    "ExportSource",
    "Prediction",
    "Predictor",
    "export_learner",
    "export_run",
    "load_model",
    "predict_paths",
    "preprocess",
    "read_export",
    "softmax",
]
