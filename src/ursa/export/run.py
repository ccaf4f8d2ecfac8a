"""`export_run`: turn a training run folder into a checked export folder.

The steps, each in the module that owns it: rebuild the network (`ursa.export.predictor.build_torch`),
convert it (`ursa.export.onnx`), compare the two on real validation images, calibrate the open-set
threshold, quantize on request (`ursa.export.quantize`), and write the folder with its hashes
(`ursa.export.artifact`). torch, onnx and the quantizer are imported inside the functions only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ursa.errors import BadImageError, ExportError
from ursa.export.artifact import FORMAT, INT8_FILE, ONNX_FILE, WEIGHTS_FILE, check_out, content_sha256, metadata, sha256, write_folder
from ursa.export.onnx import ONNX_TOLERANCE, to_onnx
from ursa.export.predictor import build_torch, ort_session, preprocess, softmax
from ursa.export.quantize import quantize
from ursa.imageio import decode_image, eval_min_side

__all__ = ["ExportResult", "export_run"]


@dataclass
class ExportResult:
    """What `export_run` wrote and measured."""

    out: Path
    meta: dict[str, Any]

    @property
    def max_abs_diff(self) -> float:
        """Largest |ONNX - PyTorch| logit difference on real validation images."""
        return float(self.meta["onnx"]["max_abs_diff_logits"])


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
    check_out(out)
    if not 0.0 <= open_set_quantile < 0.5:
        raise ExportError(f"the open-set quantile must be in [0, 0.5), got {open_set_quantile}. Use 0.05 to let about 95% of correct predictions through, 0 to keep every one.")
    config, metrics, state = _read_run(run)
    classes = list(config["classes"])
    data_config = dict(config["data_config"])
    size = int(data_config["input_size"][-1])
    model = build_torch(config["timm_name"], state, where=str(run / "models" / "model.safetensors"))
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
    onnx_bytes = to_onnx(model, size, classes, opset=opset)
    session = ort_session(onnx_bytes, threads=None, spin=True)
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
        int8_bytes, n_cal, kept = quantize(onnx_bytes, train_paths, data_config, n=calibration_images)
        s8 = ort_session(int8_bytes, threads=None, spin=True)
        p8 = np.concatenate([softmax(s8.run(None, {"input": b})[0]) for b in _batches(xs, 32)])
        acc8 = float((p8.argmax(1) == y).mean())
        int8_info = {
            "file": INT8_FILE,
            "calibration_images": n_cal,
            "float32_nodes": kept,  # the stem, the first blocks and the classifier (see ursa.export.quantize)
            "valid_accuracy_fp32": round(acc, 4),
            "valid_accuracy_int8": round(acc8, 4),
            "accuracy_change": round(acc8 - acc, 4),
            "max_abs_diff_probs": round(float(np.abs(p8 - probs).max()), 6),
            "agreement_with_fp32": round(float((p8.argmax(1) == pred).mean()), 4),
        }
        say(f"int8 validation accuracy {acc8:.4f} vs fp32 {acc:.4f} (change {acc8 - acc:+.4f})")

    meta = metadata(run, out, config, metrics, classes, data_config, size, opset, open_set, int8_info, tolerance=ONNX_TOLERANCE)
    meta["onnx"].update({"max_abs_diff_logits": diff_logits, "max_abs_diff_probs": diff_probs, "checked_images": int(len(x_check))})
    meta["metrics"]["export_valid"] = {"accuracy": round(acc, 4), "error_rate": round(1 - acc, 4), "n": int(len(y)), "n_unreadable": len(skipped), "views": "single (no test-time augmentation)"}
    from safetensors.torch import save

    files = {
        WEIGHTS_FILE: save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata={"format": FORMAT, "classes": json.dumps(classes), "timm_name": config["timm_name"]}),
        ONNX_FILE: onnx_bytes,
    }
    if int8_bytes is not None:
        files[INT8_FILE] = int8_bytes
    meta["files"] = {name: {"sha256": sha256(b), "bytes": len(b)} for name, b in files.items()}
    meta["content_sha256"] = content_sha256(meta)  # last: it covers everything above, the file hashes included
    write_folder(out, files, meta)
    say(f"wrote {out} (content_sha256 {meta['content_sha256']}: it covers model.json and every file)")
    return ExportResult(out, meta)
