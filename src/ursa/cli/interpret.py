"""`ursa interpret` and `ursa issues`: what a trained model gets wrong, and which images look mislabelled or bad."""

from __future__ import annotations

from typing import Annotated

import typer

from ursa.cli._common import RunArg, console
from ursa.config import check_number

__all__ = ["interpret_cmd", "issues_cmd"]


def interpret_cmd(
    run: RunArg,
    top: Annotated[int, typer.Option("--top", help="Images in top_losses.png.")] = 9,
    min_val: Annotated[int, typer.Option("--min-val", help="Smallest count shown in the most-confused table.")] = 1,
    normalize: Annotated[bool, typer.Option("--normalize", help="Confusion matrix as shares of each actual class.")] = False,
    heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Also draw the top losses with Grad-CAM heat maps (heatmaps.png; also in report.html).")] = False,
) -> None:
    """What the model gets wrong on the validation set: confusion.png, top_losses.png (heatmaps.png with --heatmaps), most confused pairs, per-class metrics."""
    from rich.table import Table

    from ursa.errors import InterpretError
    from ursa.interpret.analysis import ClassificationInterpretation

    check_number(top, "--top", InterpretError, integer=True, at_least=1)
    check_number(min_val, "--min-val", InterpretError, integer=True, at_least=1)
    interp = ClassificationInterpretation.from_run(run)
    interp.plot_confusion_matrix(normalize=normalize, out=run / "confusion.png")
    interp.plot_top_losses(top, out=run / "top_losses.png")
    t = Table(title=f"per class ({len(interp.targets)} validation images, error rate {interp.error_rate:.4f})", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "images"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for m in interp.per_class():
        t.add_row(m.label, f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.f1:.3f}", str(m.support))
    console.print(t)
    mc = interp.most_confused(min_val)
    t = Table(title=f"most confused (at least {min_val})", title_justify="left")
    for col in ("actual", "predicted", "images"):
        t.add_column(col, justify="right" if col == "images" else "left")
    for a, p, n in mc[:20]:
        t.add_row(a, p, str(n))
    console.print(t if mc else f"no pair of classes confused {min_val} or more times")
    console.print(f"wrote {run / 'confusion.png'} and {run / 'top_losses.png'}", highlight=False)
    if heatmaps:
        from ursa.interpret.gradcam import load_run_model

        model, data_config = load_run_model(run)
        interp.plot_top_loss_heatmaps(top, model=model, data_config=data_config, out=run / "heatmaps.png")
        console.print(f"wrote {run / 'heatmaps.png'}: where the model looked for each answer (Grad-CAM)", highlight=False)


def issues_cmd(
    run: RunArg,
    folds: Annotated[int, typer.Option("--folds", help="Folds for the out-of-sample probabilities.")] = 5,
    near: Annotated[float, typer.Option("--near", help="Cosine similarity (0-1) from which two images count as near duplicates.")] = 0.95,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="Also flag dark, bright, blurry and tiny images.")] = True,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Also write report.html.")] = True,
) -> None:
    """Find likely label errors, duplicates, train/valid leaks, outliers and bad images; write issues.csv (and report.html)."""
    from rich.table import Table

    from ursa.errors import InterpretError
    from ursa.interpret.issues import KINDS, find_issues

    check_number(folds, "--folds", InterpretError, integer=True, at_least=2)
    check_number(near, "--near", InterpretError, above=0.0, at_most=1.0, hint="Try 0.95 (the default).")
    with console.status("searching...") as status:
        rep = find_issues(run, folds=folds, near_threshold=near, quality=quality, progress=lambda msg: status.update(f"searching: {msg}"))
    s = rep.summary
    t = Table(title=f"issues in {s['n_images']} images ({s['n_train']} train, {s['n_valid']} valid), {s['search_s']:.1f} s", title_justify="left")
    t.add_column("kind")
    t.add_column("images", justify="right")
    t.add_column("first")
    for k in KINDS:
        rows = rep.of_kind(k)
        first = f"{rows[0].name}" + (f" ({rows[0].label} -> {rows[0].suggested})" if rows and rows[0].suggested else "") if rows else ""
        t.add_row(k, str(len(rows)), first)
    console.print(t)
    if "error_rate_without_leaks" in s and s["n_leaked_valid"]:
        console.print(f"validation error rate {s['error_rate']:.4f}; without the {s['n_leaked_valid']} leaked images {s['error_rate_without_leaks']:.4f}")
    console.print(f"wrote {run / 'issues.csv'}", highlight=False)
    if report:
        from ursa.report import write_report

        console.print(f"wrote {write_report(run)}", highlight=False)
    console.print(f"next: ursa review {s.get('root', 'DATA')} --run {run}", highlight=False)
