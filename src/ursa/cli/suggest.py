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
) -> None:
    """The pool photos whose labels would help the model most, with its guess: writes next.csv and next.png in the run folder."""
    from ursa.config import check_number
    from ursa.errors import InterpretError

    if pool is None:
        raise InterpretError(f"pass --pool DIR (a folder of unlabelled images): ursa next {run} --pool data/unsorted --n 30")
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
