"""Static int8 quantization of the ONNX model (`ursa export --int8`), and the nodes kept in float32.

ONNX Runtime's quantizer writes a QDQ graph (per-channel int8 weights, uint8 activations) calibrated on
training images preprocessed exactly as the Predictor will; `_float_nodes` picks the nodes int8 would
hurt most and keeps them in float32. onnx and onnxruntime's quantization tools are imported inside the
functions only, so importing `ursa.export` (as serving does) loads neither.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ursa.errors import BadImageError, ExportError
from ursa.export.predictor import preprocess
from ursa.imageio import decode_image, eval_min_side

__all__ = ["quantize"]


def quantize(onnx_bytes: bytes, train_paths: list[Path], data_config: dict[str, Any], *, n: int) -> tuple[bytes, int, list[str]]:
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
