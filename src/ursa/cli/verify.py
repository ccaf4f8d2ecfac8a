"""`ursa verify`: decode every image of a dataset, repair or quarantine, and print what was found."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import VERIFY, console, err_console

__all__ = ["verify_cmd"]


def verify_cmd(
    root: Annotated[Path, typer.Argument(help="Dataset folder (one sub-folder per class).", show_default=False)],
    max_size: Annotated[Optional[int], typer.Option("--max-size", help="Shrink images whose longest side is over this many pixels.")] = None,
    repair: Annotated[bool, typer.Option("--repair/--no-repair", help="Fix orientation, colour mode and truncation (originals kept).")] = VERIFY.repair,
) -> None:
    """Decode every image; repair, shrink, quarantine unreadable files (never delete) and report exact duplicates.
    Dangling and folder symlinks are skipped and reported; a download or another verify running on ROOT is refused."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ursa.config import VerifyConfig
    from ursa.verify import verify_folder

    cfg = VerifyConfig(max_size=max_size, repair=repair)
    with Progress(TextColumn("[bold]verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console) as bar:  # fmt: skip
        task = bar.add_task("verify", total=None)
        report = verify_folder(root, config=cfg, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"Verified {root}", title_justify="left")
    for col in ("class", "files", "ok", "repaired", "shrunk", "quarantined", "skipped", "duplicates"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for label, c in report.by_label().items():
        table.add_row(label or "(root)", *(str(c[k]) for k in ("files", "ok", "repaired", "shrunk", "quarantined", "skipped", "duplicates")))
    console.print(table)
    for r in report.results:
        if r.changes:  # with --no-repair, ok files can list the repairs they need
            what = r.status if r.status != "ok" else "needs repair"
            console.print(escape(f"{what}: {r.file}: {'; '.join(r.changes)}"), highlight=False)
    for group in report.duplicates:
        flag = " [bold red](across classes)[/]" if group.cross_class else ""
        console.print(f"same {group.kind}{flag}: {escape(', '.join(group.files))}", highlight=False)
    if report.count("quarantined") or report.count("repaired"):
        console.print(f"journal: {report.journal} (quarantined files and originals are in {root}/.ursa/quarantine/)", highlight=False)
