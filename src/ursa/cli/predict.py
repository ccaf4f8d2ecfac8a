"""`ursa predict`: classify image files with an exported model, as a table and optionally a CSV.

Expanding folders and glob patterns into image paths, and the CSV, belong to this command, not to
the library: `ursa.export.predict_paths` takes paths and returns rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer

from ursa.cli._common import BackendOpt, Int8Opt, ModelArg, console, err_console
from ursa.config import check_number

__all__ = ["predict_cmd", "expand_image_paths", "write_predictions_csv"]


def predict_cmd(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(help="Image files, folders of images, or glob patterns.", show_default=False)],
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write one row per image (with p_<class> columns) to this CSV file.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes listed per image.")] = 3,
    int8: Int8Opt = False,
    backend: BackendOpt = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="ONNX Runtime threads (default: its own choice).")] = None,
    open_set: Annotated[bool, typer.Option("--open-set/--no-open-set", help="Answer 'none of these' for unfamiliar photos and under the calibrated threshold.")] = True,
    explain: Annotated[Optional[Path], typer.Option("--explain", help="Write a Grad-CAM heat map of the predicted class over the photo to this PNG (one image only).")] = None,
) -> None:
    """Classify images with an exported model: label, probability and top classes per image. Unreadable files become error rows."""
    from rich.table import Table

    from ursa.errors import ExportError
    from ursa.export import load_model, predict_paths

    check_number(top_k, "--top-k", ExportError, integer=True, at_least=1)
    check_number(threads, "--threads", ExportError, integer=True, at_least=1, optional=True, hint="Leave it out for ONNX Runtime's own choice.")
    if csv_out is not None and csv_out.is_dir():
        raise ExportError(f"--csv {csv_out} is a folder. Pass a file name such as {csv_out / 'preds.csv'}.")
    if explain is not None and (explain.is_dir() or explain.suffix.lower() != ".png"):
        raise ExportError(f"--explain {explain} must be a .png file name, e.g. --explain heatmap.png.")
    predictor = load_model(model, backend=backend, precision="int8" if int8 else "fp32", threads=threads, open_set=open_set)
    paths = expand_image_paths(images)
    if explain is not None:
        _explain(predictor, paths, explain, top_k=top_k)
        return
    rows = predict_paths(predictor, paths, top_k=top_k)
    t = Table(title=f"{model} ({predictor.backend}, {predictor.precision})", title_justify="left")
    for col in ("image", "label", "prob", "top"):
        t.add_column(col, justify="right" if col == "prob" else "left")
    shown = 200
    for r in rows[:shown]:
        if r["status"] == "ok":
            label = f"{r['label']} ({r['reason']})" if r.get("reason") else r["label"]
            t.add_row(r["path"], label, f"{r['prob']:.3f}", ", ".join(f"{c} {p:.2f}" for c, p in r["top"]))
        else:
            t.add_row(r["path"], "[red]error[/]", "", r["error"])
    console.print(t)
    if len(rows) > shown:
        console.print(f"... {len(rows) - shown} more rows{' in ' + str(csv_out) if csv_out else ' (pass --csv to keep them all)'}")
    failed = sum(r["status"] != "ok" for r in rows)
    if csv_out is not None:
        write_predictions_csv(rows, csv_out, predictor.classes)
        console.print(f"wrote {csv_out} ({len(rows)} rows)", highlight=False)
    if failed:
        err_console.print(f"[yellow]{failed} of {len(rows)} image(s) could not be read[/] (listed as errors).")



def _explain(predictor: Any, paths: Sequence[Path], out: Path, *, top_k: int) -> None:
    """`ursa predict MODEL photo.jpg --explain out.png`: the prediction and its heat map over the photo."""
    import io

    from ursa._io import atomic_write_bytes
    from ursa.errors import ExportError

    if len(paths) != 1:
        raise ExportError(f"--explain takes exactly one image, got {len(paths)}. Pass one photo, e.g. ursa predict MODEL photo.jpg --explain heatmap.png.")
    pred, _, picture = predictor.explain(paths[0], top_k=top_k)
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    atomic_write_bytes(out, buf.getvalue())
    label = f"{pred.label} ({pred.reason})" if pred.reason else pred.label
    console.print(f"{paths[0]}: {label} {pred.prob:.3f} (top: {', '.join(f'{c} {p:.2f}' for c, p in pred.top)})", highlight=False)
    console.print(f"wrote {out}: where the model looked for {pred.best} (Grad-CAM on the backbone's last stage)", highlight=False)


def expand_image_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Paths as given, with folders replaced by their image files (sorted, not recursive) and glob
    patterns the shell did not expand (quoted, or on Windows) expanded; a pattern matching nothing is
    kept so that it becomes an error row."""
    import glob

    from ursa.imageio import IMAGE_SUFFIXES

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


def write_predictions_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], classes: Sequence[str]) -> Path:
    """Write `predict_paths` rows as CSV (atomically): path,status,label,prob,best,reason,top,error,p_<class>...

    `reason` is empty for an accepted answer, else why it is "none of these" ("unfamiliar" or
    "unsure between A and B").

    `top` is "class:prob" pairs joined by "; "; probabilities have 6 decimals; error rows leave them empty.
    """
    import csv
    import io

    from ursa._io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "status", "label", "prob", "best", "reason", "top", "error", *[f"p_{c}" for c in classes]])
    for r in rows:
        probs = [f"{float(v):.6f}" for v in r["probs"]] if r["probs"] is not None else [""] * len(classes)
        top = "; ".join(f"{c}:{p:.4f}" for c, p in r["top"])
        w.writerow([r["path"], r["status"], r["label"], "" if r["prob"] is None else f"{r['prob']:.6f}", r["best"], r.get("reason") or "", top, r["error"], *probs])
    return atomic_write_text(path, buf.getvalue())
