"""The `ursa` command: one sub-command per stage, plus `demo`.

Each command fills a config dataclass and calls one library function; heavy imports happen inside the
command so `ursa --help` is instant. Any `UrsaError` becomes its message and exit code 2.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ursa.errors import UrsaError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Make your own image classifier on a CPU: collect, verify, train, interpret, clean, export, serve.",
)
console = Console()
err_console = Console(stderr=True)


def tune_allocator() -> bool:
    """Stop glibc from mmap'ing and unmapping PyTorch's large activation buffers on every batch.

    With glibc's defaults each large buffer is an mmap that is returned to the OS when freed, so every
    batch pays page faults on fresh memory (measured about 3x slower CPU training here; see
    benchmarks/allocator.py). Keeping them on the heap removes that. Returns True when applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
    return ok


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; `argv` (without the program name) is for tests."""
    tune_allocator()
    try:
        app(args=argv, prog_name="ursa")
    except UrsaError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(exc.exit_code) from None


# ---- commands are defined below, one block per stage ----

# ---- data / train (issue 2) ----
DataArg = Annotated[Path, typer.Argument(help="Dataset folder: one sub-folder per class (or train/ and valid/ folders).", show_default=False)]
TrainOpt = Annotated[Optional[str], typer.Option("--train", help="Sub-folder with the training class folders (with --valid).")]
ValidOpt = Annotated[Optional[str], typer.Option("--valid", help="Sub-folder with the validation class folders (with --train).")]
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="CSV with columns name,label (names relative to DATA), e.g. cleaned.csv.")]
ValidPctOpt = Annotated[float, typer.Option("--valid-pct", help="Share of each class held out for validation, in (0, 1).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the split, augmentation and training.")]
FlipOpt = Annotated[bool, typer.Option("--flip/--no-flip", help="Mirror images in augmentation (turn off for text, digits, left/right classes).")]
ArchOpt = Annotated[str, typer.Option("--arch", help="Backbone: efficientnet_lite0/1/2 (packaged weights) or any timm name with --weights.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Weights file (.safetensors or .pth state dict) for --arch.")]
AllowNewOpt = Annotated[bool, typer.Option("--allow-new-labels", help="Accept CSV labels that are not class folders.")]


def _data_config(train: str | None, valid: str | None, labels: str | None, valid_pct: float, seed: int, flip: bool, allow_new_labels: bool = False):  # noqa: ANN202
    from ursa.config import DataConfig

    return DataConfig(train=train, valid=valid, labels=labels, valid_pct=valid_pct, seed=seed, flip=flip, allow_new_labels=allow_new_labels)


def _check_out_file(out: Path, suffix: str = ".png") -> Path:
    from ursa.errors import DataError

    if out.suffix.lower() != suffix:
        raise DataError(f"--out {out} should end in {suffix}. Pass a file name such as batch{suffix}.")
    if out.exists() and out.is_dir():
        raise DataError(f"--out {out} is a folder. Pass a file name such as {out / ('batch' + suffix)}.")
    return out


@app.command()
def info(
    data: DataArg,
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = 0.2,
    seed: SeedOpt = 42,
    allow_new_labels: AllowNewOpt = False,
) -> None:
    """Classes, image counts per class and per split, and image sizes."""
    from rich.table import Table

    from ursa.data.split import build_split, dataset_sizes

    split = build_split(data, _data_config(train, valid, labels, valid_pct, seed, True, allow_new_labels))
    table = Table(title=f"{data}  ({split.how} split{'' if split.how != 'random' else f', seed {seed}, {valid_pct:.0%} valid'})")
    for col in ("class", "train", "valid", "total"):
        table.add_column(col, justify="left" if col == "class" else "right")
    counts = split.counts()
    for c, (a, b) in counts.items():
        table.add_row(c, str(a), str(b), str(a + b))
    table.add_row("[bold]all[/]", str(len(split.train)), str(len(split.valid)), str(len(split.train) + len(split.valid)))
    console.print(table)
    s = dataset_sizes(split)
    console.print(f"image sizes (w x h px): min {s['min']}, median {s['median']}, max {s['max']}; {s['n_modes']}")
    if split.skipped:
        console.print(f"[yellow]{len(split.skipped)} file(s) skipped[/] (not readable images):")
        for sk in split.skipped[:10]:
            console.print(f"  {sk.name}: {sk.reason}", highlight=False)


@app.command("show-batch")
def show_batch(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("batch.png"),
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 9,
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = 0.2,
    seed: SeedOpt = 42,
    flip: FlipOpt = True,
    arch: ArchOpt = "efficientnet_lite0",
) -> None:
    """A grid of augmented training images with their labels."""
    from ursa.data.loaders import ImageDataLoaders, default_data_config
    from ursa.data.split import build_split

    _check_out_file(out)
    split = build_split(data, _data_config(train, valid, labels, valid_pct, seed, flip))
    dls = ImageDataLoaders.from_split(split, default_data_config(arch), flip=flip)
    dls.show_batch(n, out=out)
    console.print(f"wrote {out}  ({len(split.classes)} classes: {', '.join(split.classes)})")


@app.command("lr-find")
def lr_find(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("lr.png"),
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = 0.2,
    seed: SeedOpt = 42,
    flip: FlipOpt = True,
    arch: ArchOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
) -> None:
    """Sweep the learning rate of the head stage (on cached features) and suggest one."""
    from ursa.config import TrainConfig
    from ursa.train.recipe import head_learner

    _check_out_file(out)
    learn = head_learner(data, _data_config(train, valid, labels, valid_pct, seed, flip), TrainConfig(arch=arch, weights=str(weights) if weights else None))
    res = learn.lr_find()
    res.plot(out)
    s = res.suggestion
    console.print(f"suggested learning rate: [bold]{s.valley:.2e}[/] (valley); steep {s.steep:.2e}, minimum/10 {s.minimum:.2e}")
    console.print(f"wrote {out}.  Use it with: ursa train {data} --lr {s.valley:.1e}")


@app.command("train")
def train_cmd(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Run folder (a new one, runs/NAME-2, if it already has a run).")] = Path("runs/run"),
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = 0.2,
    seed: SeedOpt = 42,
    flip: FlipOpt = True,
    allow_new_labels: AllowNewOpt = False,
    arch: ArchOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of head training on cached features.")] = 12,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the head stage (default 3e-3).")] = None,
    views: Annotated[int, typer.Option("--views", help="Most augmented views per training image in the feature cache.")] = 8,
    fine_tune: Annotated[int, typer.Option("--fine-tune", help="Epochs of full fine-tuning after the head stage (0: none).")] = 0,
    fine_tune_lr: Annotated[float, typer.Option("--fine-tune-lr", help="Peak learning rate of the last layers when fine-tuning.")] = 1e-3,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels (default: the backbone's own, 224 for lite0).")] = None,
    batch_size: Annotated[int, typer.Option("--bs", help="Images per batch.")] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
) -> None:
    """Train a classifier with the CPU-fast default recipe and write the run folder."""
    from ursa.config import TrainConfig
    from ursa.errors import TrainError
    from ursa.train.recipe import train_run

    if epochs < 1 or fine_tune < 0 or views < 0:
        raise TrainError("--epochs must be at least 1, --fine-tune and --views at least 0.")
    cfg = TrainConfig(arch=arch, weights=str(weights) if weights else None, epochs=epochs, lr=lr, views=views, fine_tune=fine_tune, fine_tune_lr=fine_tune_lr, batch_size=batch_size, threads=threads, size=size)
    res = train_run(data, out, data=_data_config(train, valid, labels, valid_pct, seed, flip, allow_new_labels), train=cfg, console=console)
    _print_result(res)


def _print_result(res) -> None:  # noqa: ANN001
    from rich.table import Table

    m = res.metrics
    t = Table(title=f"run {res.out}", show_header=False)
    t.add_row("error_rate", f"{m['error_rate']:.4f}  ({round(m['error_rate'] * m['n_valid'])} of {m['n_valid']} validation images wrong)")
    t.add_row("accuracy", f"{m['accuracy']:.4f}")
    t.add_row("train / valid images", f"{m['n_train']} / {m['n_valid']}" + (f"  ({m['n_skipped']} skipped, see skipped.csv)" if m["n_skipped"] else ""))
    t.add_row("wall time", f"{m['wall_s']:.1f} s  (features {m['feature_s']:.1f} s)")
    console.print(t)
    console.print(f"results: {res.out}/metrics.json, history.csv, losses.png, models/model.safetensors")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo dataset and run.")] = Path("ursa_demo"),
) -> None:
    """Train on the embedded default (scikit-learn's handwritten digits) with no network; print where results are."""
    from ursa.config import DataConfig, TrainConfig
    from ursa.data.embedded import write_digits
    from ursa.train.recipe import train_run

    root = write_digits(out / "digits")
    console.print(f"dataset: {root} (scikit-learn's bundled handwritten digits, 10 classes, as PNG class folders)")
    res = train_run(root, out / "runs" / "digits", data=DataConfig(flip=False), train=TrainConfig(size=96, fine_tune=2, fine_tune_lr=2e-3), console=console)
    _print_result(res)
    console.print(f"next: open {res.out}/losses.png, or try  ursa info {root}  and  ursa show-batch {root} --no-flip")


# ---- collect / verify (issue 3) ----


def _collect_config(**options: object) -> object:
    """A CollectConfig from the options the user gave (None: keep the default), checked for sense."""
    from ursa.config import CollectConfig
    from ursa.errors import CollectError

    given = {k: v for k, v in options.items() if v is not None}
    for name in ("max_images", "concurrency", "per_host"):
        if name in given and int(given[name]) < 1:  # type: ignore[call-overload]
            flag = {"max_images": "--max"}.get(name, "--" + name.replace("_", "-"))
            raise CollectError(f"{flag} must be at least 1 (got {given[name]}).")
    if "timeout" in given and float(given["timeout"]) <= 0:  # type: ignore[arg-type]
        raise CollectError(f"--timeout must be a positive number of seconds (got {given['timeout']}).")
    if "max_bytes" in given:
        given["max_bytes"] = int(float(given["max_bytes"]) * 2**20)  # type: ignore[arg-type]  # from MiB
    return CollectConfig(**given)  # type: ignore[arg-type]


def _run_download(jobs: list, root: Path, cfg: object) -> object:
    """Run `ursa.collect.download.download` under a Rich progress bar; Ctrl-C saves and exits 130."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ursa.collect.download import download

    columns = (TextColumn("[bold]download"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[counts]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("download", total=None, counts="")

        def show(p: object) -> None:
            counts = (f"[green]ok {p.ok}[/] [red]failed {p.failed}[/] skipped {p.skipped}"  # type: ignore[attr-defined]
                      f" duplicate {p.duplicate}")  # type: ignore[attr-defined]  # fmt: skip
            bar.update(task, total=p.total, completed=p.done, counts=counts)  # type: ignore[attr-defined]

        try:
            return download(jobs, root, config=cfg, on_progress=show)  # type: ignore[arg-type]
        except KeyboardInterrupt:
            bar.stop()
            err_console.print("Interrupted. What was downloaded is saved; run the same command again to resume.")
            raise typer.Exit(130) from None


def _print_download_report(report: object) -> None:
    from rich.table import Table

    table = Table(title=f"Downloaded into {report.root}", title_justify="left")  # type: ignore[attr-defined]
    for col in ("class", "ok", "duplicate", "failed", "skipped", "not tried"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for cls, c in report.per_class.items():  # type: ignore[attr-defined]
        table.add_row(cls, *(str(c[k]) for k in ("ok", "duplicate", "failed", "skipped", "not_tried")))
    console.print(table)
    if report.reasons:  # type: ignore[attr-defined]
        why = ", ".join(f"{kind} {n}" for kind, n in report.reasons.most_common())  # type: ignore[attr-defined]
        console.print(f"failures: {why} (details in the manifest; retry with --retry-failed)", highlight=False)
    p = report.progress  # type: ignore[attr-defined]
    console.print(f"manifest: {report.manifest}  ({p.done} URLs, {report.seconds:.1f} s)", highlight=False)  # type: ignore[attr-defined]


@app.command("download")
def download_cmd(
    lists: Annotated[list[Path], typer.Argument(help="URL lists: .txt with one URL per line, or .csv with a 'url' column.", show_default=False)],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Class folder (data/bears/teddy); with --lists, the dataset root (data/bears).")],
    per_list: Annotated[bool, typer.Option("--lists", help="One class per list, named after the file: urls_teddys.txt -> teddys.")] = False,
    max_images: Annotated[Optional[int], typer.Option("--max", help="Most good images per class, earlier runs included.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also try again the URLs that failed before.")] = False,
    concurrency: Annotated[Optional[int], typer.Option(help="Downloads in flight at once [default: 64].")] = None,
    per_host: Annotated[Optional[int], typer.Option(help="Downloads in flight to one host [default: 8].")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Seconds to wait for a connection or for data [default: 10].")] = None,
    max_mb: Annotated[Optional[float], typer.Option("--max-mb", help="Largest file kept, in MiB [default: 20].")] = None,
) -> None:
    """Download the images of URL lists into class folders, with a manifest row for every URL.

    Re-running resumes: URLs already in <root>/.ursa/manifest.csv are not fetched again.
    """
    from ursa.collect.download import jobs_from_list, split_dest
    from ursa.collect.urls import class_name_for_list, expand_list_paths, read_url_list

    cfg = _collect_config(max_images=max_images, concurrency=concurrency, per_host=per_host, timeout=timeout,
                          max_bytes=max_mb, retry_failed=retry_failed or None)  # fmt: skip
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
    _print_download_report(_run_download(jobs, root, cfg))


@app.command("search")
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

    cfg = _collect_config(max_images=max_images, retry_failed=retry_failed or None)
    root, cls = split_dest(dest)
    # Ask for half as many again as wanted: some results always fail to download.
    results = search_images(query, provider=get_provider(provider), max_results=max_images + (max_images + 1) // 2,
                            cache_dir=root / META_DIR / "search", refresh=refresh)  # fmt: skip
    err_console.print(f"{len(results)} results for {query!r} -> {cls}", highlight=False)
    _print_download_report(_run_download(jobs_from_search(results, cls, query=query), root, cfg))


@app.command("verify")
def verify_cmd(
    root: Annotated[Path, typer.Argument(help="Dataset folder (one sub-folder per class).", show_default=False)],
    max_size: Annotated[Optional[int], typer.Option("--max-size", help="Shrink images whose longest side is over this many pixels.")] = None,
    repair: Annotated[bool, typer.Option("--repair/--no-repair", help="Fix orientation, colour mode and truncation (originals kept).")] = True,
) -> None:
    """Decode every image; repair, shrink, quarantine unreadable files (never delete) and report exact duplicates."""
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
    for col in ("class", "files", "ok", "repaired", "shrunk", "quarantined", "duplicates"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for label, c in report.by_label().items():
        table.add_row(label or "(root)", *(str(c[k]) for k in ("files", "ok", "repaired", "shrunk", "quarantined", "duplicates")))
    console.print(table)
    for r in report.results:
        if r.status != "ok":
            console.print(f"{r.status}: {r.file}: {'; '.join(r.changes)}", highlight=False)
    for group in report.duplicates:
        flag = " [bold red](across classes)[/]" if group.cross_class else ""
        console.print(f"same {group.kind}{flag}: {', '.join(group.files)}", highlight=False)
    if report.count("quarantined") or report.count("repaired"):
        console.print(f"journal: {report.journal} (quarantined files and originals are in {root}/.ursa/quarantine/)", highlight=False)
