"""Convert the PyTorch network to an ONNX graph, and the graph surgery that makes it fast on a CPU.

`to_onnx` traces the network with PyTorch's TorchScript exporter at opset `opset` (dynamic batch axis),
after `static_same_padding` has replaced TF-style "same" padding by constant pads, then `fuse_pads`
moves those pads into the convolutions, and onnx's checker validates the result. The export then
compares the graph with PyTorch on real images (`ONNX_TOLERANCE`, see `ursa.export.run`).

torch and onnx are imported inside the functions only, so importing `ursa.export` (as serving does)
loads neither.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np

from ursa.errors import ExportError
from ursa.export.artifact import FORMAT

__all__ = ["ONNX_TOLERANCE", "fuse_pads", "static_same_padding", "to_onnx"]

ONNX_TOLERANCE = 1e-4  # largest |logit difference| allowed between ONNX Runtime and PyTorch at export


def static_same_padding(model: Any, size: int) -> Any:
    """A copy of `model` whose TF-style "same"-padded convolutions (timm's Conv2dSame, used by the
    tf_efficientnet family) pad by constants computed for a size x size input.

    Traced as is, each of them exports as ~30 shape-arithmetic nodes and a Pad that ONNX Runtime can
    neither fold into the convolution nor keep in its blocked (NCHWc) layout, a large share of the
    model's CPU time (benchmarks/predict_latency.py measures it; a figure here would go stale with the
    machine and the libraries). With constant pads, `fuse_pads` moves them into the Conv nodes. Same
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


def fuse_pads(proto: Any) -> int:
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


class _Outputs:
    """Builds the torch module traced for ONNX: nn.Sequential(backbone, Head) -> (logits, embedding[,
    feature_map]): the embedding is the pooled features the head reads (the open-set detector's input),
    the feature map the backbone's last stage before pooling (Grad-CAM's input), when it is one (n, C, h, w)."""

    @staticmethod
    def wrap(model: Any, size: int) -> tuple[Any, list[str]]:
        import torch
        from torch import nn

        body, head = model[0], model[1]
        names = ["logits", "embedding"]
        spatial = False
        if hasattr(body, "forward_features") and hasattr(body, "forward_head"):
            with torch.no_grad():
                x = torch.zeros(1, 3, size, size)
                fmap = body.forward_features(x)
                spatial = fmap.ndim == 4 and torch.allclose(body.forward_head(fmap), body(x), atol=1e-5)
        if spatial:
            names.append("feature_map")

        class WithOutputs(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body, self.head = body, head

            def forward(self, x: Any) -> Any:
                if spatial:
                    fmap = self.body.forward_features(x)
                    emb = self.body.forward_head(fmap)
                    return self.head(emb), emb, fmap
                emb = self.body(x)
                return self.head(emb), emb

        return WithOutputs().eval(), names


def to_onnx(model: Any, size: int, classes: list[str], *, opset: int) -> bytes:
    """The ONNX file (bytes) of `model` (nn.Sequential(backbone, Head)) for (batch, 3, size, size)
    float32 input named "input", with the outputs "logits" (batch, n_classes), "embedding" (batch, d: the
    pooled features the head reads) and, for a backbone whose last stage is a spatial feature map,
    "feature_map" (batch, C, h, w: Grad-CAM's input). Ursa's format and `classes` are in its metadata."""
    import onnx
    import torch

    model = static_same_padding(model, size)
    wrapped, names = _Outputs.wrap(model, size)
    buf = io.BytesIO()
    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        try:
            torch.onnx.export(
                wrapped, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"], output_names=names,
                dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}}, do_constant_folding=True,
            )  # fmt: skip
        except Exception as exc:  # the exporter raises many kinds for unsupported operators
            raise ExportError(f"PyTorch could not convert this model to ONNX opset {opset} ({type(exc).__name__}: {exc}). Try another --opset.") from None
    proto = onnx.load_from_string(buf.getvalue())
    fuse_pads(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the ONNX graph PyTorch wrote does not pass onnx's checker ({exc}). Try another --opset.") from None
    proto.doc_string = "Ursa image classifier; preprocessing and classes are in model.json"
    for k, v in (("ursa_format", FORMAT), ("classes", json.dumps(classes))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()
