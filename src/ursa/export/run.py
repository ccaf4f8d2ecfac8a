"""The export pipeline: turn a trained model into a checked export folder, from a run folder or a Learner.

Two front doors, one path: `export_run` reads a training run folder (config.json, the safetensors weights,
split.json), `export_learner` takes a Learner in memory and its DataBunch; both gather the same
`ExportSource` and hand it to `_export`, which does the rest. The steps, each in the module that owns it:
rebuild the network from the weights (`ursa.export.predictor.build_torch`), convert it
(`ursa.export.onnx`), compare the two on real validation images, calibrate the open-set threshold (on
probabilities at the temperature training fitted; the embedding detector training fitted travels as is),
quantize on request (`ursa.export.quantize`), and write the folder with its hashes
(`ursa.export.artifact`). torch, onnx and the quantizer are imported inside the functions only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ursa.errors import BadImageError, ExportError, UrsaError
from ursa.export.artifact import FORMAT, INT8_FILE, ONNX_FILE, WEIGHTS_FILE, check_out, content_sha256, metadata, sha256, write_folder
from ursa.export.onnx import ONNX_TOLERANCE, to_onnx
from ursa.export.predictor import build_torch, ort_session, preprocess, softmax
from ursa.export.quantize import quantize
from ursa.imageio import decode_image, eval_min_side
from ursa.trust import DETECTOR_FILE, detector_from_bytes, scaled_softmax

__all__ = ["ExportResult", "ExportSource", "export_learner", "export_run"]


@dataclass
class ExportResult:
    """What `export_run` wrote and measured."""

    out: Path
    meta: dict[str, Any]

    @property
    def max_abs_diff(self) -> float:
        """Largest |ONNX - PyTorch| logit difference on real validation images."""
        return float(self.meta["onnx"]["max_abs_diff_logits"])

    def __repr__(self) -> str:  # one line in a notebook, not the whole of model.json
        valid = self.meta.get("metrics", {}).get("export_valid", {})
        return f"ExportResult({str(self.out)!r}, classes={len(self.meta.get('classes', []))}, valid_accuracy={valid.get('accuracy')}, max_abs_diff={self.max_abs_diff:.1e})"


@dataclass
class ExportSource:
    """What an export is made from, however it was found: the weights of nn.Sequential(backbone, Head)
    with what they were trained on, and the split whose validation images check the converted model."""

    state: dict[str, Any]  # state dict of nn.Sequential(backbone, Head), on the CPU
    timm_name: str
    classes: list[str]
    data_config: dict[str, Any]  # the model's preprocessing at the trained input size
    split: Any  # ursa.data.split.Split: its root, train and valid items
    config: dict[str, Any]  # arch, num_features, torch (the version trained with), root: recorded in model.json
    metrics: dict[str, Any]  # training metrics recorded in model.json (error_rate, accuracy, valid_loss, ...)
    source: dict[str, Any]  # model.json's "source": where the weights and the dataset came from
    where: str  # names the weights in messages
    detector: bytes | None = None  # the open-set detector training fitted (ursa.trust.detector_to_bytes), if any


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


def _from_run(run: Path, data_root: str | os.PathLike[str] | None) -> ExportSource:
    """The ExportSource of a training run folder; `data_root` overrides the dataset location in split.json."""
    from ursa.data.split import load_split

    config, metrics, state = _read_run(run)
    split = load_split(run / "split.json", root=data_root)
    if not split.root.is_dir():
        raise ExportError(f"the dataset {split.root} this run was trained on is not there; the export checks the model on its validation images. Pass --data with the dataset folder's new location.")
    classes = list(config["classes"])
    if list(split.classes) != classes:
        raise ExportError(f"split.json lists classes {split.classes}, config.json {classes}: the run folder is inconsistent. Train the run again.")
    det_path = run / "models" / DETECTOR_FILE
    detector = det_path.read_bytes() if det_path.is_file() else None
    return ExportSource(state, config["timm_name"], classes, dict(config["data_config"]), split, config, metrics,
                        {"run": str(run.resolve()), "dataset": config.get("root")}, str(run / "models" / "model.safetensors"), detector)  # fmt: skip


def _from_learner(learn: Any) -> ExportSource:
    """The ExportSource of an image Learner (made by `vision_learner`) and its DataBunch, in memory."""
    import torch

    bb, dls = getattr(learn, "backbone", None), getattr(learn, "dls", None)
    if bb is None or dls is None or getattr(dls, "split", None) is None:
        raise ExportError("only an image learner made by vision_learner(dls, arch) can be exported: the export needs its backbone and its DataBunch (for the validation images that check the converted model).")
    classes, split = list(learn.classes), dls.split
    if list(split.classes) != classes:
        raise ExportError(f"the learner's classes {classes} are not its data's {split.classes}. Build the learner again from its DataBunch.")
    if not Path(split.root).is_dir():
        raise ExportError(f"the dataset {split.root} the learner was trained on is not there; the export checks the model on its validation images. Put the dataset back, or build the DataBunch from its new location.")
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in learn.model.state_dict().items()}
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(dls.data_config).items()}
    last = dict(getattr(learn, "last_metrics", {}) or {})
    metrics = {k: round(float(v), 6) for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)}  # after its last epoch
    metrics.update(n_train=len(split.train), n_valid=len(split.valid))
    config = {"arch": bb.arch, "timm_name": bb.timm_name, "num_features": int(bb.num_features), "torch": torch.__version__, "root": str(Path(split.root).resolve())}
    return ExportSource(state, bb.timm_name, classes, data_config, split, config, metrics,
                        {"run": None, "learner": str(Path(learn.path).resolve()), "dataset": config["root"]}, "the learner's model")  # fmt: skip


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
    out = Path(out)
    _check_request(out, open_set_quantile, retry="--out {}")
    return _export(_from_run(Path(run), data_root), out, retry="--out {}", int8=int8, open_set_quantile=open_set_quantile,
                   check_images=check_images, calibration_images=calibration_images, opset=opset, on_step=on_step)  # fmt: skip


def export_learner(
    learn: Any,
    out: str | os.PathLike[str],
    *,
    int8: bool = False,
    open_set_quantile: float = 0.05,
    check_images: int = 32,
    calibration_images: int = 64,
    opset: int = 17,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export an image Learner (made by `vision_learner`) to `out`: the folder `export_run` writes, with the
    same checks, from the Learner's weights and its DataBunch's split alone (no run folder).

    The weights are copied to the CPU and the network rebuilt from them, exactly as a run's weights are,
    so the learner itself is left as it was (its device, mode and frozen layers). The options are
    `export_run`'s.
    """
    out = Path(out)
    _check_request(out, open_set_quantile, retry="learn.export('{}')")
    return _export(_from_learner(learn), out, retry="learn.export('{}')", int8=int8, open_set_quantile=open_set_quantile,
                   check_images=check_images, calibration_images=calibration_images, opset=opset, on_step=on_step)  # fmt: skip


def _check_request(out: Path, open_set_quantile: float, *, retry: str) -> None:
    """The checks that need no model, made before any work: `out` is free, the quantile is in range."""
    check_out(out, retry=retry)
    if not 0.0 <= open_set_quantile < 0.5:
        raise ExportError(f"the open-set quantile must be in [0, 0.5), got {open_set_quantile}. Use 0.05 to let about 95% of correct predictions through, 0 to keep every one.")


def _export(src: ExportSource, out: Path, *, retry: str, int8: bool, open_set_quantile: float, check_images: int, calibration_images: int, opset: int, on_step: Callable[[str], None] | None) -> ExportResult:
    """The one export path, for an ExportSource however it was found (see `export_run` for the steps)."""
    import torch

    say = on_step or (lambda msg: None)
    classes, data_config = src.classes, src.data_config
    size = int(data_config["input_size"][-1])
    model = build_torch(src.timm_name, src.state, where=src.where)
    if model[1].fc.out_features != len(classes):
        raise ExportError(f"the weights have {model[1].fc.out_features} outputs but {len(classes)} classes are listed. Train the model again.")

    root = Path(src.split.root)
    index = {c: i for i, c in enumerate(classes)}
    valid_paths, valid_y = [root / it.name for it in src.split.valid], [index[it.label] for it in src.split.valid]
    train_paths = [root / it.name for it in src.split.train]
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
        raise ExportError(f"none of the {len(valid_paths)} validation images under {root} could be read; the export needs them to check the model. Put the dataset back (for a run folder, pass --data with its new location).")

    say("converting to ONNX")
    onnx_bytes = to_onnx(model, size, classes, opset=opset)
    session = ort_session(onnx_bytes, threads=None, spin=True)
    x_check = np.concatenate(xs[:: max(1, len(xs) // max(1, check_images))][:check_images])  # spread over the classes
    with torch.inference_mode():
        ref = model(torch.from_numpy(x_check)).numpy()
    got = session.run(["logits"], {"input": x_check})[0]
    diff_logits = float(np.abs(got - ref).max())
    diff_probs = float(np.abs(softmax(got) - softmax(ref)).max())
    say(f"ONNX vs PyTorch on {len(x_check)} validation images: max |logit difference| {diff_logits:.2e}")
    if not diff_logits <= ONNX_TOLERANCE:  # also catches NaN
        raise ExportError(f"the ONNX model differs from PyTorch by up to {diff_logits:.3g} in the logits on real images (limit {ONNX_TOLERANCE:g}). Try another --opset or onnxruntime version; do not serve this model.")

    temperature = float(src.metrics.get("temperature") or 1.0)  # fitted out of fold by training (ursa.train.trust)
    outs = [session.run(["logits", "embedding"], {"input": b}) for b in _batches(xs, 32)]
    probs = np.concatenate([scaled_softmax(o[0], temperature) for o in outs])
    embeddings = np.concatenate([o[1] for o in outs])
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
        "detector": None,
    }
    files_extra: dict[str, bytes] = {}
    if src.detector is not None:
        try:
            det = detector_from_bytes(src.detector, where=f"the open-set detector of {src.where}")
        except UrsaError as exc:
            raise ExportError(f"{exc} Train the run again.") from None
        unfamiliar = det.unfamiliar(embeddings)
        open_set["detector"] = {**det.describe(), "file": DETECTOR_FILE, "input": "embedding", "fitted": "training embeddings; threshold accepts 95% of correctly classified out-of-fold training images",
                                "valid_accepted": round(float((~unfamiliar).mean()), 4), "valid_accepted_both_rules": round(float((accepted & ~unfamiliar).mean()), 4)}  # fmt: skip
        files_extra[DETECTOR_FILE] = src.detector
        say(f"open-set detector ({det.method}): {float((~unfamiliar).mean()):.1%} of validation images accepted")

    int8_info = None
    int8_bytes = None
    if int8:
        say(f"quantizing to int8 on up to {calibration_images} training images")
        int8_bytes, n_cal, kept = quantize(onnx_bytes, train_paths, data_config, n=calibration_images)
        s8 = ort_session(int8_bytes, threads=None, spin=True)
        p8 = np.concatenate([scaled_softmax(s8.run(["logits"], {"input": b})[0], temperature) for b in _batches(xs, 32)])
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

    meta = metadata(src.source, out, src.config, src.metrics, classes, data_config, size, opset, open_set, int8_info, tolerance=ONNX_TOLERANCE)
    meta["onnx"].update({"max_abs_diff_logits": diff_logits, "max_abs_diff_probs": diff_probs, "checked_images": int(len(x_check))})
    outputs = [o.name for o in session.get_outputs()]
    meta["outputs"] = {"logits": "logits", "embedding": "embedding", "feature_map": "feature_map" if "feature_map" in outputs else None}
    meta["calibration"] = {"temperature": round(temperature, 6), "ece": src.metrics.get("ece"), "applied": "probabilities = softmax(logits / temperature)"}
    meta["metrics"]["export_valid"] = {"accuracy": round(acc, 4), "error_rate": round(1 - acc, 4), "n": int(len(y)), "n_unreadable": len(skipped), "views": "single (no test-time augmentation)"}
    from safetensors.torch import save

    files = {
        WEIGHTS_FILE: save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata={"format": FORMAT, "classes": json.dumps(classes), "timm_name": src.timm_name}),
        ONNX_FILE: onnx_bytes,
    }
    if int8_bytes is not None:
        files[INT8_FILE] = int8_bytes
    files.update(files_extra)
    meta["files"] = {name: {"sha256": sha256(b), "bytes": len(b)} for name, b in files.items()}
    meta["content_sha256"] = content_sha256(meta)  # last: it covers everything above, the file hashes included
    write_folder(out, files, meta, retry=retry)
    say(f"wrote {out} (content_sha256 {meta['content_sha256']}: it covers model.json and every file)")
    return ExportResult(out, meta)
