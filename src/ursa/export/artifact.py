"""The export folder's format: what it holds, how it is hashed, read back and written.

An export folder holds plain data only, so loading it never runs code from the files:

```
models/bears/
  model.json          metadata: classes, architecture, preprocessing, open-set threshold, metrics,
                      library versions, the sha256 of every other file, and `content_sha256`: the
                      sha256 of model.json's own content (canonical JSON without that key)
  model.safetensors   weights of nn.Sequential(backbone, head) (tensors only)
  model.onnx          the same network as an ONNX graph (float32), checked against PyTorch
  model.int8.onnx     optional: statically quantized (QDQ, per-channel int8) copy
  open_set.safetensors  optional: the open-set detector on the embedding output (see `ursa.trust`)
```

The ONNX model's outputs are "logits", "embedding" (the pooled features the head reads) and, for a
backbone with a spatial last stage, "feature_map" (Grad-CAM's input); model.json's "calibration" holds
the temperature that divides the logits before the softmax.

`read_export` refuses a folder whose files do not match the hashes in model.json (tampered, truncated or
swapped), whose model.json was edited (a lowered open-set threshold, a renamed class), that holds any file
model.json does not list, or whose model.json is not Ursa's. `content_sha256` covers model.json and,
through the hashes it lists, every file: one value names the whole folder. It detects edits and stray
files; it is not a signature (whoever can write the folder can rewrite it), so load models from sources
you trust.

This module is the bottom of `ursa.export`: it imports no other module of the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ursa.errors import ExportError
from ursa.imageio import eval_crop_mode, eval_min_side

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INT8_FILE",
    "META_FILE",
    "ONNX_FILE",
    "WEIGHTS_FILE",
    "check_out",
    "content_sha256",
    "metadata",
    "read_export",
    "sha256",
    "write_folder",
]

FORMAT = "ursa.export"
FORMAT_VERSION = 3  # 2: model.json carries content_sha256, and the folder holds only the files it lists;
# 3: the ONNX model also gives the embedding (and the feature map), model.json the temperature, and the
# folder may hold the open-set detector. Version 2 still loads: temperature 1, the softmax threshold only,
# no heat maps (`Predictor.explain` says to export again).
READABLE_VERSIONS = (2, 3)
ONNX_FILE, INT8_FILE, WEIGHTS_FILE, META_FILE = "model.onnx", "model.int8.onnx", "model.safetensors", "model.json"


# ---------------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`, as model.json records each file."""
    return hashlib.sha256(data).hexdigest()


def content_sha256(meta: dict[str, Any]) -> str:
    """sha256 of model.json's content: its canonical JSON (sorted keys, no spaces, UTF-8) without the
    `content_sha256` key itself. Canonical, so it is the content that is hashed, not the file's layout."""
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------


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
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist. Create it with: ursa export runs/NAME --out {folder} (or learn.export({str(folder)!r}) in Python)")
    if not meta_path.is_file():
        raise ExportError(f"{folder} has no {META_FILE}, so it is not an Ursa export folder. Pass the folder an export wrote, or create one with: ursa export runs/NAME --out {folder} (or learn.export({str(folder)!r}) in Python)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{meta_path} is not valid JSON ({exc}). The folder is damaged: export the run again.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{meta_path} is not an Ursa model description (no \"format\": \"{FORMAT}\"). Export the model with `ursa export`.")
    if meta.get("format_version") == 1:
        # Not read with the old rules: anyone could then skip the checks below by writing version 1.
        raise ExportError(f"{folder} was exported by an earlier Ursa (format version 1), whose model.json carries no hash of its own content, so edits to it cannot be detected. Export the run again with this Ursa: ursa export runs/NAME --out NEW_FOLDER")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ExportError(f"{meta_path} has format version {meta.get('format_version')!r}; this Ursa reads versions {', '.join(map(str, READABLE_VERSIONS))}. Export the run again with this Ursa.")
    if meta.get("content_sha256") != content_sha256(meta):
        raise ExportError(f"{meta_path} was edited after export: its content does not match its content_sha256 (a changed class name, threshold or hash is refused). Export the run again; do not load models from an untrusted source.")
    listed = meta.get("files")
    if not isinstance(listed, dict) or WEIGHTS_FILE not in listed:
        raise ExportError(f"{meta_path} lists no file hashes. Export the run again.")
    for entry in sorted(folder.iterdir()):
        if entry.name != META_FILE and entry.name not in listed:
            raise ExportError(f"{entry} is not part of this export: {META_FILE} does not list it, and an export folder holds only the files it lists. Remove it from the folder (or export the run again into a new folder).")
    for name in listed:
        if not isinstance(name, str) or Path(name).name != name or name in (META_FILE, ".", ".."):
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
        if len(data) != rec.get("bytes") or sha256(data) != rec.get("sha256"):
            raise ExportError(f"{path} does not match the sha256 recorded in {META_FILE}: it was altered, truncated or replaced. Export the run again; do not load files from an untrusted source.")
        out[name] = data
    return meta, out


# ---------------------------------------------------------------------------------------------------
# model.json
# ---------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Python's and the installed libraries' versions, recorded so a model can be matched to its tools."""
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


def metadata(source: dict[str, Any], out: Path, config: dict[str, Any], metrics: dict[str, Any], classes: list[str], data_config: dict[str, Any], size: int, opset: int, open_set: dict[str, Any], int8_info: dict[str, Any] | None, *, tolerance: float) -> dict[str, Any]:
    """model.json's content for a model exported to `out`, without the file hashes and `content_sha256`
    (added last, once the files exist). `source` says where it came from (the run folder, or the learner's
    folder, and the dataset); `tolerance` is the ONNX parity limit checked."""
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
        "onnx": {"file": ONNX_FILE, "opset": opset, "tolerance": tolerance},
        "int8": int8_info,
        "metrics": {"training": {k: metrics[k] for k in keep if k in metrics}},
        "versions": {**versions(), "trained_with_torch": config.get("torch")},
        "source": source,
    }


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------


def check_out(out: Path, *, retry: str = "--out {}") -> None:
    """Refuse an `out` that exists and is not an empty folder: an export never overwrites files.

    `retry` is how the message suggests a free folder: "--out {}" for the CLI, "learn.export('{}')" in Python."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        free = out.with_name(out.name + "-2")
        i = 2
        while free.exists():
            i += 1
            free = out.with_name(f"{out.name}-{i}")
        raise ExportError(f"{out} already exists and is not empty; an export never overwrites files. Pass a new folder, e.g. {retry.format(free)}, or remove {out} first.")


def write_folder(out: Path, files: dict[str, bytes], meta: dict[str, Any], *, retry: str = "--out {}") -> None:
    """Write `files` and model.json under a temporary name beside `out`, then rename it to `out`:
    an interrupted export leaves nothing behind, and a finished one appears whole. (`retry`: see `check_out`.)"""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an export folder is meant to be shared
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        check_out(out, retry=retry)  # again: someone may have written there while we worked
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
