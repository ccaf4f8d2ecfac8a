"""`ursa export`: write the model folder that predict and serve read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import console, err_console
from ursa.config import check_number

__all__ = ["export_cmd"]


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Training run folder written by `ursa train` (e.g. runs/bears).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Export folder to create; an existing non-empty folder is refused, never overwritten.")],
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx, quantized on training images, and report the accuracy change.")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder, if it moved since training (the export checks the model on the validation images).")] = None,
    open_set_quantile: Annotated[float, typer.Option("--open-set-quantile", help="Share of correct validation predictions the 'none of these' threshold may reject (0: none).")] = 0.05,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 17,
) -> None:
    """Write a safe, portable model folder: model.safetensors + model.json + model.onnx (+ model.int8.onnx), checked on real images."""
    from rich.table import Table

    from ursa.errors import ExportError
    from ursa.export import export_run

    check_number(opset, "--opset", ExportError, integer=True, at_least=7, hint="Try 17 (the default).")  # 7: the oldest PyTorch writes
    res = export_run(run, out, int8=int8, data_root=data, open_set_quantile=open_set_quantile, opset=opset,
                     on_step=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))  # fmt: skip
    m = res.meta
    t = Table(title=f"export {res.out}", show_header=False, title_justify="left")
    t.add_row("classes", f"{len(m['classes'])}: {', '.join(m['classes'][:12])}{' ...' if len(m['classes']) > 12 else ''}")
    t.add_row("ONNX vs PyTorch", f"max |logit difference| {m['onnx']['max_abs_diff_logits']:.2e} on {m['onnx']['checked_images']} validation images (limit {m['onnx']['tolerance']:g})")
    ev = m["metrics"]["export_valid"]
    t.add_row("validation accuracy", f"{ev['accuracy']:.4f} on {ev['n']} images (single view, as served)")
    os_ = m["open_set"]
    t.add_row("'none of these' under", f"{os_['threshold']:.3f} top probability ({os_['valid_accepted']:.1%} of validation images answered)")
    if m.get("int8"):
        q = m["int8"]
        t.add_row("int8", f"accuracy {q['valid_accuracy_int8']:.4f} ({q['accuracy_change']:+.4f} vs fp32), agrees with fp32 on {q['agreement_with_fp32']:.1%}")
    for name, rec in m["files"].items():
        t.add_row(name, f"{rec['bytes'] / 2**20:.1f} MiB  sha256 {rec['sha256'][:16]}...")
    console.print(t)
    console.print(f"next: ursa predict {res.out} photo.jpg   or   ursa serve {res.out}", highlight=False)
