"""`ursa next`: which unlabelled photos to label next (`--pool`), and how many more images to collect (`--plan`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import RunArg, console, err_console

__all__ = ["next_cmd"]


def next_cmd(
    run: RunArg,
    pool: Annotated[Optional[Path], typer.Option("--pool", help="Folder of unlabelled images (read recursively; never changed).")] = None,
    n: Annotated[int, typer.Option("--n", help="How many pool images to pick.")] = 30,
    uncertainty: Annotated[str, typer.Option("--uncertainty", help="margin (of the two most likely classes) or entropy.")] = "margin",
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the clustering (default: the run's data seed).")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Instead: how many more images per class (learning curve), and search queries for the confused pairs; writes plan.json.")] = False,
    target: Annotated[Optional[float], typer.Option("--target", help="With --plan: the validation error to reach (default: half the current one).")] = None,
    download: Annotated[bool, typer.Option("--download", help="With --plan: run the queries through the search provider into the class folders (needs: pip install ddgs).")] = False,
    provider: Annotated[str, typer.Option("--provider", help="With --download: the search provider.")] = "duckduckgo",
) -> None:
    """The pool photos whose labels would help the model most, with its guess (next.csv, next.png); or, with --plan, what to collect."""
    from ursa.config import check_number
    from ursa.errors import InterpretError

    if download and not plan:
        raise InterpretError(f"--download goes with --plan: ursa next {run} --plan --download")
    if plan:
        if pool is not None:
            raise InterpretError("pass --pool (what to label) or --plan (what to collect), not both.")
        check_number(target, "--target", InterpretError, at_least=0.0, below=1.0, optional=True, hint="An error rate, e.g. 0.05.")
        _plan(run, target=target, download=download, provider=provider)
        return
    if pool is None:
        raise InterpretError(f"pass --pool DIR (a folder of unlabelled images): ursa next {run} --pool data/unsorted --n 30 (or --plan for what to collect)")
    check_number(n, "--n", InterpretError, integer=True, at_least=1)
    if uncertainty not in ("margin", "entropy"):
        raise InterpretError(f"--uncertainty must be margin or entropy, got {uncertainty!r}.")
    from ursa.interpret.suggest import suggest_next
    from ursa.train.callbacks import FeatureProgress

    bar = FeatureProgress(enabled=True, console=err_console)
    try:
        rep = suggest_next(run, pool, n=n, kind=uncertainty, seed=seed, progress=bar.update)
    finally:
        bar.close()
    from rich.table import Table

    t = Table(title=f"label these next: {len(rep.rows)} of {rep.n_images} pool images", title_justify="left")
    for col in ("#", "image", "guess", "confidence", "why"):
        t.add_column(col, justify="right" if col in ("#", "confidence") else "left")
    for i, r in enumerate(rep.rows, 1):
        t.add_row(str(i), str(Path(r["name"]).relative_to(rep.pool)), r["guess"], f"{float(r['confidence']):.0%}", r["reason"])
    console.print(t)
    notes = []
    if rep.skipped:
        notes.append(f"{len(rep.skipped)} files skipped (not images or unreadable; first: {rep.skipped[0].name}: {rep.skipped[0].reason})")
    if rep.n_train_duplicates:
        notes.append(f"{rep.n_train_duplicates} pool images skipped as copies of images already in the dataset")
    if rep.n_pool_duplicates:
        notes.append(f"{rep.n_pool_duplicates} near copies within the pool counted once")
    for line in notes:
        console.print(line, highlight=False)
    if len(rep.rows) < n:
        console.print(f"only {len(rep.rows)} distinct images were left to pick (of --n {n})", highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in rep.written)}", highlight=False)
    console.print(f"next: label them on the review page: ursa review {rep.root} --run {run} --pool {pool}", highlight=False)


def _plan(run: Path, *, target: float | None, download: bool, provider: str) -> None:
    from rich.table import Table

    from ursa.interpret.plan import plan_for_run
    from ursa.train.callbacks import FeatureProgress

    search = None
    if download:  # the provider is checked (installed?) before the learning curve is measured
        from ursa.collect.search import get_provider

        search = get_provider(provider)
        check = getattr(search, "_client", None)
        if callable(check):
            check()
    bar = FeatureProgress(enabled=True, console=err_console)
    try:
        with console.status("measuring the learning curve..."):
            p = plan_for_run(run, target=target, progress=bar.update)
    finally:
        bar.close()
    t = Table(title=f"learning curve ({p.seconds:.1f} s): validation error by training images", title_justify="left")
    for col in ("share", "images", "error"):
        t.add_column(col, justify="right")
    for pt in p.curve:
        t.add_row(f"{pt.fraction:.0%}", str(pt.n_train), f"{pt.error:.4f}")
    console.print(t)
    console.print(f"fit: error = {p.a:.3g} x images^-{p.b:.2f}; target error {p.target_error:.4f} (" + ("given" if target is not None else "half the current error") + ")", highlight=False)
    if p.needed_train is not None and not p.note:
        console.print(f"about {p.needed_train} training images in all for that target (now {p.curve[-1].n_train})", highlight=False)
    if p.note:
        console.print(p.note, highlight=False)
    t = Table(title="what to collect per class", title_justify="left")
    for col in ("class", "have", "need", "add", "taken for", "search queries (images)"):
        t.add_column(col, justify="right" if col in ("have", "need", "add") else "left")
    for cp in p.classes:
        t.add_row(cp.label, str(cp.have), "?" if cp.need is None else str(cp.need), str(cp.add), ", ".join(f"{o} ({k})" for o, k in cp.confused_with), "; ".join(f"{q['query']!r} ({q['count']})" for q in cp.queries))
    console.print(t)
    console.print(f"wrote {run / 'plan.json'}", highlight=False)
    if search is None:
        if any(cp.queries for cp in p.classes):
            console.print(f"next: ursa next {run} --plan --download   (or ursa search QUERY --dest DATA/CLASS for each)", highlight=False)
        return
    import json

    from ursa.interpret.plan import download_plan

    root = Path(json.loads((run / "config.json").read_text(encoding="utf-8"))["root"])
    report = download_plan(p, root, provider=search)
    if report is None:
        console.print("nothing to download: the plan asks for no images", highlight=False)
        return
    from ursa.cli.collect import _print_download_report

    _print_download_report(report)
