"""`ursa download` and `ursa search`: fill class folders from URL lists or a web search, under a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ursa.cli._common import COLLECT, console, err_console
from ursa.config import CollectConfig, check_number

if TYPE_CHECKING:
    from ursa.collect.download import DownloadReport, Job
    from ursa.collect.download import Progress as DownloadProgress

__all__ = ["download_cmd", "search_cmd"]

_MAX_MB = COLLECT.max_bytes / 2**20  # --max-mb's default: CollectConfig.max_bytes in MiB


def _collect_config(*, max_images: int | None = COLLECT.max_images, concurrency: int = COLLECT.concurrency,
                    per_host: int = COLLECT.per_host, timeout: float = COLLECT.timeout, max_mb: float = _MAX_MB,
                    retry_failed: bool = COLLECT.retry_failed, processes: int | None = COLLECT.processes) -> CollectConfig:  # fmt: skip
    """A CollectConfig from the options; CollectConfig checks them, except --max-mb (in other units)."""
    from ursa.errors import CollectError

    check_number(max_mb, "--max-mb", CollectError, above=0.0, unit="MiB")
    return CollectConfig(max_images=max_images, concurrency=concurrency, per_host=per_host, timeout=timeout,
                         max_bytes=int(max_mb * 2**20), retry_failed=retry_failed, processes=processes)  # fmt: skip


def _shard_jobs(jobs: list, shard: str) -> list:  # noqa: ANN001
    """The jobs of `--shard i/N` (checked), with a line saying how many."""
    from ursa.collect.download import parse_shard, select_shard

    i, n = parse_shard(shard)
    mine = select_shard(jobs, i, n)
    err_console.print(f"shard {i}/{n}: {len(mine)} of {len(jobs)} URLs", highlight=False)
    return mine


def _run_download(jobs: list[Job], root: Path, cfg: CollectConfig) -> DownloadReport:
    """Run `ursa.collect.download.download` under a Rich progress bar; Ctrl-C saves and exits 130."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ursa.collect.download import download

    columns = (TextColumn("[bold]download"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[counts]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("download", total=None, counts="")

        def show(p: DownloadProgress) -> None:
            counts = f"[green]ok {p.ok}[/] [red]failed {p.failed}[/] skipped {p.skipped} duplicate {p.duplicate}"
            bar.update(task, total=p.total, completed=p.done, counts=counts)

        try:
            return download(jobs, root, config=cfg, on_progress=show)
        except KeyboardInterrupt:
            bar.stop()
            err_console.print("Interrupted. What was downloaded is saved; run the same command again to resume.")
            raise typer.Exit(130) from None


def _print_download_report(report: DownloadReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Downloaded into {report.root}", title_justify="left")
    for col in ("class", "ok", "duplicate", "failed", "skipped", "not tried"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for cls, c in report.per_class.items():
        table.add_row(cls, *(str(c[k]) for k in ("ok", "duplicate", "failed", "skipped", "not_tried")))
    console.print(table)
    if report.reasons:
        why = ", ".join(f"{kind} {n}" for kind, n in report.reasons.most_common())
        console.print(escape(f"failures: {why} (details in the manifest; retry with --retry-failed)"), highlight=False)
    for note in report.notes:
        console.print(escape(f"note: {note}"), style="yellow", highlight=False)
    how = f", {report.processes} fetch processes" if report.processes > 1 else ""
    console.print(f"manifest: {report.manifest}  ({report.progress.done} URLs, {report.seconds:.1f} s{how})", highlight=False)


def download_cmd(
    lists: Annotated[list[Path], typer.Argument(help="URL lists: .txt with one URL per line, or .csv with a 'url' column.", show_default=False)],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Class folder (data/bears/teddy); with --lists, the dataset root (data/bears).")],
    per_list: Annotated[bool, typer.Option("--lists", help="One class per list, named after the file: urls_teddys.txt -> teddys.")] = False,
    max_images: Annotated[Optional[int], typer.Option("--max", help="Most good images per class, earlier runs included.")] = COLLECT.max_images,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also try again the URLs that failed before.")] = COLLECT.retry_failed,
    concurrency: Annotated[int, typer.Option(help="Downloads in flight at once.")] = COLLECT.concurrency,
    per_host: Annotated[int, typer.Option(help="Downloads in flight to one host.")] = COLLECT.per_host,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection or for data.")] = COLLECT.timeout,
    max_mb: Annotated[float, typer.Option("--max-mb", help="Largest file kept, in MiB.")] = _MAX_MB,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/N: only the URLs of shard i of N (0-based, by a hash of the URL); each shard resumes on its own.")] = None,
    processes: Annotated[Optional[int], typer.Option(help="Processes doing the HTTP work; 1 keeps it in this one [default: up to 4 by CPU count, for 400+ URLs].")] = None,
) -> None:
    """Download the images of URL lists into class folders, with a manifest row for every URL.

    Re-running resumes: URLs already in <root>/.ursa/manifest.csv are not fetched again.
    """
    from ursa.collect.download import jobs_from_list, split_dest
    from ursa.collect.urls import class_name_for_list, expand_list_paths, read_url_list

    cfg = _collect_config(max_images=max_images, concurrency=concurrency, per_host=per_host, timeout=timeout,
                          max_mb=max_mb, retry_failed=retry_failed, processes=processes)  # fmt: skip
    paths = expand_list_paths(lists)
    if per_list:
        root, classes = dest, [class_name_for_list(p) for p in paths]
    else:
        root, cls = split_dest(dest)
        classes = [cls] * len(paths)
    jobs = []
    for path, cls in zip(paths, classes):
        url_list = read_url_list(path)
        err_console.print(f"{url_list.summary()} -> {cls}", highlight=False)
        jobs.extend(jobs_from_list(url_list, cls))
    if shard is not None:
        mine = _shard_jobs(jobs, shard)
        _print_download_report(_run_download(mine, root, cfg))
        return
    _print_download_report(_run_download(jobs, root, cfg))


def search_cmd(
    query: Annotated[str, typer.Argument(help="What to search for, e.g. \"grizzly bear\".", show_default=False)],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Class folder to fill, e.g. data/bears/grizzly.")],
    max_images: Annotated[int, typer.Option("--max", help="Most good images to keep in the class.")] = 100,
    provider: Annotated[str, typer.Option(help="Search provider.")] = "duckduckgo",
    refresh: Annotated[bool, typer.Option("--refresh", help="Search again instead of using the cached results.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also try again the URLs that failed before.")] = False,
) -> None:
    """Search the web for images and download them into a class folder (needs the ddgs package: pip install ddgs).

    Results are cached in <root>/.ursa/search/; each image's query and page are kept in the manifest.
    """
    from ursa.collect.download import jobs_from_search, split_dest
    from ursa.collect.manifest import META_DIR
    from ursa.collect.search import get_provider, search_images

    cfg = _collect_config(max_images=max_images, retry_failed=retry_failed)
    root, cls = split_dest(dest)
    # Ask for half as many again as wanted: some results always fail to download.
    results = search_images(query, provider=get_provider(provider), max_results=max_images + (max_images + 1) // 2,
                            cache_dir=root / META_DIR / "search", refresh=refresh)  # fmt: skip
    err_console.print(f"{len(results)} results for {query!r} -> {cls}", highlight=False)
    _print_download_report(_run_download(jobs_from_search(results, cls, query=query), root, cfg))
