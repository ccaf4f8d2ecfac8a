"""`ursa review`: the local review page, and applying or undoing its decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import check_server, console

__all__ = ["review_cmd"]


def review_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset folder the run was trained on.", show_default=False)],
    run: Annotated[Optional[Path], typer.Option("--run", help="Run folder whose issues.csv to review (searched first if missing).")] = None,
    port: Annotated[int, typer.Option("--port", help="TCP port of the review page.")] = 8765,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser window.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Apply the saved decisions: write cleaned.csv, quarantine deleted images.")] = False,
    undo: Annotated[bool, typer.Option("--undo", help="Undo the last apply: restore the dataset byte for byte.")] = False,
    pool: Annotated[Optional[Path], typer.Option("--pool", help="Also label the picks `ursa next RUN --pool DIR` made from this folder (copied into the class folders).")] = None,
) -> None:
    """Review flagged images in a local web page (keep / relabel / delete, saved as you go), then apply or undo."""
    from ursa.errors import ReviewError
    from ursa.review import Review

    check_server(port=port)
    if apply and undo:
        raise ReviewError("pass --apply or --undo, not both.")
    if apply or undo:
        rv = Review(data)
        if apply:
            line = rv.apply()
            if line.get("resumed") or line.get("finished"):
                console.print(f"finished the interrupted apply {line['id'] if line.get('resumed') else line['finished']}", highlight=False)
            c = line["counts"]
            console.print(f"applied: {c['relabel']} relabelled, {c['delete']} moved to {data / '.ursa' / 'quarantine'}, {c['keep']} kept", highlight=False)
            console.print(f"wrote {data / line['csv']['path']} ({line['n_images']} images)" + (f"; the previous version is in {data / line['csv']['backup']}" if line["csv"]["backup"] else ""), highlight=False)
            console.print(f"next: ursa train {data} --labels {data / 'cleaned.csv'}   (undo with: ursa review {data} --undo)", highlight=False)
        else:
            line = rv.undo_apply()
            console.print(f"undone: {len(line['moves'])} images restored, cleaned.csv as before the apply of {line['id']}", highlight=False)
        return
    if run is None:
        raise ReviewError(f"pass the run to review: ursa review {data} --run runs/NAME (or --apply / --undo).")
    if pool is not None and not (run / "next.csv").is_file():
        raise ReviewError(f"{run / 'next.csv'} is missing: pick the images to label first, with `ursa next {run} --pool {pool}`.")
    if pool is None and not (run / "issues.csv").is_file():
        from ursa.interpret.issues import find_issues

        console.print(f"{run / 'issues.csv'} is missing; searching first...", highlight=False)
        find_issues(run)
    from ursa.web.review_app import create_review_app
    from ursa.web.server import run as run_server

    review_app = create_review_app(data, run, pool=pool)  # loopback only, behind the Host/Origin/JSON checks
    url = f"http://127.0.0.1:{port}/"
    console.print(f"review page at {url}  (decisions are saved as you make them; Ctrl-C stops)", highlight=False)
    if not no_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    run_server(review_app, host="127.0.0.1", port=port, log_level="warning", limit_concurrency=64)
