"""A self-contained HTML report of a run: metrics, plots and the issue summary in one file.

`write_report("runs/bears")` writes `runs/bears/report.html`. Every image (the run's PNG plots and
thumbnails of the top findings) is inlined as base64, so the file can be mailed or opened anywhere
with no other file beside it. Plots the run lacks (confusion matrix, top losses) are drawn first.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from ursa._io import atomic_write_text
from ursa.errors import BadImageError, InterpretError
from ursa.imageio import decode_image

__all__ = ["write_report", "render_report"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#1d2330}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #dde1e7;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f6f8}img.plot{max-width:100%;border:1px solid #dde1e7}.muted{color:#5b6475}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumbs figure{margin:0;width:150px;font-size:12px}
.thumbs img{width:150px;height:150px;object-fit:contain;background:#eef0f3}code{background:#f5f6f8;padding:0 3px}
"""


def _b64(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _thumb(path: Path, side: int = 150) -> str | None:
    try:
        im = decode_image(path, min_side=side)  # upright, within the pixel limit, JPEGs drafted
    except BadImageError:
        return None
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def render_report(run_dir: str | Path, *, draw: bool = True, top: int = 12) -> str:
    """The report of `run_dir` as one HTML string; `draw` makes the confusion and top-loss plots if missing."""
    run = Path(run_dir)
    mpath = run / "metrics.json"
    if not mpath.is_file():
        raise InterpretError(f"{run} has no metrics.json. Pass a run folder written by `ursa train DATA --out {run}`.")
    metrics = json.loads(mpath.read_text(encoding="utf-8"))
    cfg = json.loads((run / "config.json").read_text(encoding="utf-8")) if (run / "config.json").is_file() else {}
    root = Path(cfg["root"]) if cfg.get("root") else None
    parts = [f"<h1>Ursa run <code>{html.escape(run.name)}</code></h1>"]
    parts.append(f"<p class='muted'>dataset {html.escape(str(root))} · backbone {html.escape(str(cfg.get('arch', '?')))} · classes {html.escape(', '.join(metrics.get('classes', [])))}</p>")
    keys = ["error_rate", "accuracy", "valid_loss", "n_train", "n_valid", "n_skipped", "final_stage", "wall_s"]
    parts.append("<h2>Metrics (validation set)</h2>" + _table([(k, _fmt(metrics[k])) for k in keys if k in metrics]))

    interp = None
    if draw and (run / "predictions.csv").is_file():
        from ursa.interpret.analysis import ClassificationInterpretation

        interp = ClassificationInterpretation.from_run(run)
        if not (run / "confusion.png").is_file():
            interp.plot_confusion_matrix(out=run / "confusion.png")
        if not (run / "top_losses.png").is_file():
            interp.plot_top_losses(9, out=run / "top_losses.png")
    if interp is not None:
        rows = "".join(f"<tr><td>{html.escape(m.label)}</td><td>{m.precision:.3f}</td><td>{m.recall:.3f}</td><td>{m.f1:.3f}</td><td>{m.support}</td></tr>" for m in interp.per_class())
        parts.append("<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>" + rows + "</table>")
        mc = interp.most_confused(1)[:10]
        if mc:
            parts.append("<h2>Most confused</h2><table><tr><th>actual</th><th>predicted</th><th>images</th></tr>" + "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(p)}</td><td>{n}</td></tr>" for a, p, n in mc) + "</table>")
    if "ece" in metrics:
        e, det = metrics["ece"], metrics.get("open_set") or {}
        rows = [("temperature", _fmt(metrics.get("temperature", 1.0))), ("ECE before / after scaling (15 bins)", f"{e.get('before', float('nan')):.4f} / {e.get('after', float('nan')):.4f}")]
        if det:
            rows.append(("open-set detector", f"{det.get('method')} (threshold {det.get('threshold', float('nan')):.4f}); validation photos accepted {det.get('valid_accepted', float('nan')):.1%}"))
        parts.append("<h2>Calibration and open set</h2><p class='muted'>" + html.escape(str(metrics.get("calibration") or metrics.get("calibration_note") or "")) + "</p>" + _table(rows))
    for fname, title in (("losses.png", "Training"), ("confusion.png", "Confusion matrix"), ("top_losses.png", "Top losses (validation)"), ("heatmaps.png", "Top losses: where the model looked (Grad-CAM)")):
        if (run / fname).is_file():
            parts.append(f"<h2>{title}</h2><img class='plot' alt='{fname}' src='{_b64(run / fname)}'>")

    ipath = run / "issues.json"
    if ipath.is_file():
        s = json.loads(ipath.read_text(encoding="utf-8"))
        rows = [(k, str(v)) for k, v in s.get("counts", {}).items()]
        parts.append("<h2>Issues found</h2><p class='muted'>Out-of-sample probabilities from a 5-fold search on the cached features; details in issues.csv; review them with <code>ursa review DATA --run RUN</code>.</p>" + _table(rows))
        if "error_rate_without_leaks" in s:
            parts.append(_table([
                ("validation error rate", f"{s['error_rate']:.4f} ({s['n_valid']} images)"),
                ("without leaked images", f"{s['error_rate_without_leaks']:.4f} ({s['n_valid_without_leaks']} images; {s['n_leaked_valid']} validation images have a copy in train)"),
            ]))
        if (run / "issues.csv").is_file() and root is not None:
            with open(run / "issues.csv", newline="", encoding="utf-8") as fh:
                label_rows = [r for r in csv.DictReader(fh) if r["kind"] == "label"][:top]
            figs = []
            for r in label_rows:
                src = _thumb(root / r["name"])
                if src:
                    figs.append(f"<figure><img alt='{html.escape(r['name'])}' src='{src}'><figcaption>{html.escape(r['name'])}<br>label <b>{html.escape(r['label'])}</b> → <b>{html.escape(r['suggested'])}</b> ({float(r['confidence'] or 0):.0%})</figcaption></figure>")
            if figs:
                parts.append(f"<h2>Likely label errors (top {len(figs)})</h2><div class='thumbs'>" + "".join(figs) + "</div>")
    else:
        parts.append(f"<h2>Issues</h2><p class='muted'>Not searched yet: run <code>ursa issues {html.escape(str(run))}</code>.</p>")
    return f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Ursa run {html.escape(run.name)}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"


def write_report(run_dir: str | Path, *, draw: bool = True) -> Path:
    """Write `run_dir/report.html` (atomic) and return its path."""
    run = Path(run_dir)
    return atomic_write_text(run / "report.html", render_report(run, draw=draw))
