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

from ursa.config import CollectConfig, DataConfig, TrainConfig, VerifyConfig, check_number
from ursa.errors import UrsaError

__all__ = ["app", "main"]

# The options' defaults are the config dataclasses' own (one place to change them); options that no
# config carries are checked with the same `check_number` before anything is printed or started.
_DATA, _TRAIN, _COLLECT, _VERIFY = DataConfig(), TrainConfig(), CollectConfig(), VerifyConfig()

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


# Commands that run PyTorch over batches, where tune_allocator pays. Not serve or review: a server must give
# the memory of large uploads back to the system, which the tuning (no mmap, 1 GiB trim threshold) prevents.
_TUNED_COMMANDS = frozenset({"train", "lr-find", "show-batch", "demo", "issues", "interpret", "lesson"})


def _command(argv: list[str]) -> str | None:
    """The sub-command named in `argv` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; `argv` (without the program name) is for tests."""
    if _command(list(sys.argv[1:] if argv is None else argv)) in _TUNED_COMMANDS:
        tune_allocator()
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc N` passes on to torchrun
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
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="CSV with columns name,label (names inside DATA, relative to it), e.g. cleaned.csv; train/valid sides kept from a split or is_valid column, or from train/ and valid/ folders.")]
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
    valid_pct: ValidPctOpt = _DATA.valid_pct,
    seed: SeedOpt = _DATA.seed,
    allow_new_labels: AllowNewOpt = _DATA.allow_new_labels,
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
        console.print(f"[yellow]{len(split.skipped)} file(s) skipped[/] (not readable images, or symlinks not followed):")
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
    valid_pct: ValidPctOpt = _DATA.valid_pct,
    seed: SeedOpt = _DATA.seed,
    flip: FlipOpt = _DATA.flip,
    arch: ArchOpt = _TRAIN.arch,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels, as given to train (default: the backbone's own).")] = None,
) -> None:
    """A grid of augmented training images with their labels."""
    from ursa.data.loaders import ImageDataLoaders, default_data_config
    from ursa.data.split import build_split
    from ursa.errors import DataError

    _check_out_file(out)
    check_number(n, "-n", DataError, integer=True, at_least=1)
    size = TrainConfig(arch=arch, size=size).size  # the sizes train accepts, checked by TrainConfig
    split = build_split(data, _data_config(train, valid, labels, valid_pct, seed, flip))
    dls = ImageDataLoaders.from_split(split, default_data_config(arch), flip=flip, size=size)
    from ursa.interpret.plots import show_batch as draw_batch

    draw_batch(dls, n, out=out)
    console.print(f"wrote {out}  ({len(split.classes)} classes: {', '.join(split.classes)})")


@app.command("lr-find")
def lr_find(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("lr.png"),
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = _DATA.valid_pct,
    seed: SeedOpt = _DATA.seed,
    flip: FlipOpt = _DATA.flip,
    arch: ArchOpt = _TRAIN.arch,
    weights: WeightsOpt = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels (default: the backbone's own).")] = None,
) -> None:
    """Sweep the learning rate of the head stage (on cached features) and suggest one."""
    from ursa.train.recipe import head_learner

    _check_out_file(out)
    learn = head_learner(data, _data_config(train, valid, labels, valid_pct, seed, flip), TrainConfig(arch=arch, weights=str(weights) if weights else None, size=size))
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
    valid_pct: ValidPctOpt = _DATA.valid_pct,
    seed: SeedOpt = _DATA.seed,
    flip: FlipOpt = _DATA.flip,
    allow_new_labels: AllowNewOpt = _DATA.allow_new_labels,
    arch: ArchOpt = _TRAIN.arch,
    weights: WeightsOpt = None,
    head: Annotated[str, typer.Option("--head", help="Head solver: lbfgs (fitted to convergence, no lr to pick) or one_cycle (SGD epochs, uses --epochs/--lr).")] = _TRAIN.head,
    c: Annotated[float, typer.Option("--c", help="Inverse L2 strength of the lbfgs head (larger fits the training set harder).")] = _TRAIN.c,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of the one_cycle head on cached features.")] = _TRAIN.epochs,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the one_cycle head (default 3e-3); implies --head one_cycle.")] = None,
    views: Annotated[int, typer.Option("--views", help="Most augmented views per training image in the feature cache.")] = _TRAIN.views,
    fine_tune: Annotated[int, typer.Option("--fine-tune", help="Epochs of full fine-tuning after the head stage (0: none).")] = _TRAIN.fine_tune,
    fine_tune_lr: Annotated[float, typer.Option("--fine-tune-lr", help="Peak learning rate of the head when fine-tuning (the body gets 1/10 and 1/100 of it).")] = _TRAIN.fine_tune_lr,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels (default: the backbone's own, 224 for lite0).")] = None,
    batch_size: Annotated[int, typer.Option("--bs", help="Images per batch, for feature extraction and fine-tuning.")] = _TRAIN.batch_size,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes: N > 1 starts torchrun with N ranks (DDP; gloo on CPU, NCCL on GPU).")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="Fine-tuning precision: auto, fp32, bf16 or fp16 (GPU); auto is bf16/fp16 on a GPU by its capability, fp32 on every CPU.")] = "auto",
) -> None:
    """Train a classifier with the CPU-fast default recipe and write the run folder."""
    from ursa.train.recipe import train_run

    head = "one_cycle" if head == "one-cycle" or (lr is not None and head == "lbfgs") else head  # --lr implies one_cycle
    data_cfg = _data_config(train, valid, labels, valid_pct, seed, flip, allow_new_labels)  # checked before torchrun starts
    cfg = TrainConfig(arch=arch, weights=str(weights) if weights else None, head=head, c=c, epochs=epochs, lr=lr, views=views, fine_tune=fine_tune, fine_tune_lr=fine_tune_lr, batch_size=batch_size, threads=threads, size=size)
    cfg = _scale_out(cfg, nproc=nproc, device=device, precision=precision)
    if cfg is None:
        return  # the ranks torchrun started did the training and printed the result
    res = train_run(data, out, data=data_cfg, train=cfg, console=console)
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
    per_class: Annotated[Optional[int], typer.Option("--per-class", help="Use only the first N images of each digit (a quicker demo).")] = None,
    size: Annotated[int, typer.Option("--size", help="Input side in pixels (the digits are 8x8 scans).")] = 96,
    fine_tune: Annotated[int, typer.Option("--fine-tune", help="Epochs of full fine-tuning after the head stage.")] = 0,
) -> None:
    """Train on the embedded default (scikit-learn's handwritten digits) with no network; print where results are."""
    from ursa.data.embedded import write_digits
    from ursa.errors import DataError
    from ursa.train.recipe import train_run

    check_number(per_class, "--per-class", DataError, integer=True, at_least=2, optional=True,
                 hint="Each digit needs a training and a validation image.")  # fmt: skip
    data_cfg, train_cfg = DataConfig(flip=False), TrainConfig(size=size, fine_tune=fine_tune)  # checked before writing the dataset
    root = write_digits(out / "digits", per_class=per_class)
    console.print(f"dataset: {root} (scikit-learn's bundled handwritten digits, 10 classes, as PNG class folders)")
    res = train_run(root, out / "runs" / "digits", data=data_cfg, train=train_cfg, console=console)
    _print_result(res)
    console.print(f"next: open {res.out}/losses.png, or try  ursa info {root}  and  ursa show-batch {root} --no-flip")


# ---- collect / verify (issue 3) ----
from typing import TYPE_CHECKING  # noqa: E402 - kept with the block that uses it

if TYPE_CHECKING:
    from ursa.collect.download import DownloadReport, Job
    from ursa.collect.download import Progress as DownloadProgress

_MAX_MB = _COLLECT.max_bytes / 2**20  # --max-mb's default: CollectConfig.max_bytes in MiB


def _collect_config(*, max_images: int | None = _COLLECT.max_images, concurrency: int = _COLLECT.concurrency,
                    per_host: int = _COLLECT.per_host, timeout: float = _COLLECT.timeout, max_mb: float = _MAX_MB,
                    retry_failed: bool = _COLLECT.retry_failed, processes: int | None = _COLLECT.processes) -> CollectConfig:  # fmt: skip
    """A CollectConfig from the options; CollectConfig checks them, except --max-mb (in other units)."""
    from ursa.errors import CollectError

    check_number(max_mb, "--max-mb", CollectError, above=0.0, unit="MiB")
    return CollectConfig(max_images=max_images, concurrency=concurrency, per_host=per_host, timeout=timeout,
                         max_bytes=int(max_mb * 2**20), retry_failed=retry_failed, processes=processes)  # fmt: skip


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


@app.command("download")
def download_cmd(
    lists: Annotated[list[Path], typer.Argument(help="URL lists: .txt with one URL per line, or .csv with a 'url' column.", show_default=False)],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Class folder (data/bears/teddy); with --lists, the dataset root (data/bears).")],
    per_list: Annotated[bool, typer.Option("--lists", help="One class per list, named after the file: urls_teddys.txt -> teddys.")] = False,
    max_images: Annotated[Optional[int], typer.Option("--max", help="Most good images per class, earlier runs included.")] = _COLLECT.max_images,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also try again the URLs that failed before.")] = _COLLECT.retry_failed,
    concurrency: Annotated[int, typer.Option(help="Downloads in flight at once.")] = _COLLECT.concurrency,
    per_host: Annotated[int, typer.Option(help="Downloads in flight to one host.")] = _COLLECT.per_host,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection or for data.")] = _COLLECT.timeout,
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

    cfg = _collect_config(max_images=max_images, retry_failed=retry_failed)
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
    repair: Annotated[bool, typer.Option("--repair/--no-repair", help="Fix orientation, colour mode and truncation (originals kept).")] = _VERIFY.repair,
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


# ---- lessons (issue 6) ----
lesson_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Runnable lessons on what happens inside: SGD from scratch, mini-batches, learning rate, epochs, "
    "under- and overfitting, predict. Each prints its numbers and writes a picture.",
)
app.add_typer(lesson_app, name="lesson")

LessonDataArg = Annotated[
    Optional[Path],
    typer.Argument(help="Dataset folder (one sub-folder of images per class); omitted: the embedded digits.", show_default=False),
]


def _lesson_seed(seed: int) -> int:
    """--seed of the lessons, checked as DataConfig checks a seed (the lessons import nothing from ursa)."""
    from ursa.config import MAX_SEED
    from ursa.errors import LessonError

    check_number(seed, "--seed", LessonError, integer=True, at_least=0, at_most=MAX_SEED)
    return seed


LessonSeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the data, the split and the training.", callback=_lesson_seed)]
LessonSizeOpt = Annotated[int, typer.Option("--size", help="With DATA: images are read as size x size grayscale pixels.")]


def _lesson_out(out: Path, suffixes: tuple[str, ...]) -> Path:
    """Check that `out` is a file name we can write, with one of `suffixes`; create its folder if missing."""
    from ursa.errors import LessonError

    if out.suffix.lower() not in suffixes:
        raise LessonError(f"--out {out} should end in {' or '.join(suffixes)}. Pass a file name such as lesson{suffixes[0]}.")
    if out.is_dir():
        raise LessonError(f"--out {out} is a folder. Pass a file name such as {out / ('lesson' + suffixes[0])}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LessonError(f"cannot create the folder for --out {out} ({exc.strerror}). Choose another --out.") from None
    if not os.access(out.parent, os.W_OK):
        raise LessonError(f"cannot write to {out.parent}. Choose another --out in a folder you can write to.")
    return out


def _run_lesson(lesson, *args, outs: dict[str, Path], **options):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Call `lesson` writing each of `outs` (keyword -> final path) to a temporary name, then rename.

    An interrupted lesson leaves no half-written picture, and the lessons' ValueErrors (bad numbers,
    bad arrays) become LessonErrors with the same message.
    """
    from ursa.errors import LessonError

    # The temporary name keeps the suffix, because matplotlib picks the file format from it.
    staged = {k: p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}") for k, p in outs.items()}
    try:
        result = lesson(*args, **options, **staged)
        for key, tmp in staged.items():
            os.replace(tmp, outs[key])
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    except OSError as exc:
        raise LessonError(f"could not write {', '.join(map(str, outs.values()))} ({exc}). Choose another --out.") from exc
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return result


def _print_lesson(result, title: str, written: list[Path]) -> None:  # noqa: ANN001
    """The lesson's table, the one line to notice, and the files written."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(result.columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in result.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"[bold]notice:[/] {result.notice}", highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


def _lesson_arrays(data: Path | None, *, seed: int, size: int):  # noqa: ANN202
    """(x_train, y_train, x_valid, y_valid, classes, image_shape, description) for the classification lessons.

    x are float32 (n, pixels) in [0, 1]. Without DATA: the embedded 8x8 digits; with DATA: its images as
    size x size grayscale, split by `build_split` (seeded, stratified) exactly as training would.
    """
    import numpy as np

    from ursa.config import DataConfig
    from ursa.data.items import Item
    from ursa.data.split import build_split, split_items
    from ursa.errors import DataError, LessonError

    if size < 2:
        raise LessonError(f"--size must be at least 2 pixels, got {size}. Try 16.")
    if data is None:
        from ursa.data.embedded import digits_arrays

        images, labels, names = digits_arrays()
        # The library's own split (seeded, stratified by class), over item names standing in for files.
        items = [Item(f"{i:04d}", names[int(y)]) for i, y in enumerate(labels)]
        train, valid = split_items(items, valid_pct=0.2, seed=seed)
        ti = np.array([int(it.name) for it in train])
        vi = np.array([int(it.name) for it in valid])
        flat = images.reshape(len(images), -1)
        return flat[ti], labels[ti], flat[vi], labels[vi], names, images.shape[1:], "embedded digits (8x8)"
    if not data.is_dir():
        raise LessonError(
            f"dataset folder {data} does not exist. Pass a folder with one sub-folder of images per class, "
            "or leave DATA out to use the embedded digits."
        )
    try:
        split = build_split(data, DataConfig(seed=seed))
    except DataError as exc:
        raise LessonError(str(exc)) from exc
    from PIL import Image

    def load(items) -> np.ndarray:  # noqa: ANN001
        rows = []
        for it in items:
            with Image.open(split.root / it.name) as im:
                small = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
                rows.append(np.asarray(small, dtype=np.float32).reshape(-1) / 255.0)
        return np.stack(rows)

    try:
        xt, xv = load(split.train), load(split.valid)
    except OSError as exc:
        raise LessonError(f"could not read an image under {data} ({exc}). Run `ursa verify {data}` first.") from exc
    desc = f"{data} ({size}x{size} grayscale)"
    return xt, split.label_ids(split.train), xv, split.label_ids(split.valid), split.classes, (size, size), desc


@lesson_app.command("sgd")
def lesson_sgd(
    out: Annotated[Path, typer.Option("--out", help="Animation file (.gif).")] = Path("sgd.gif"),
    html: Annotated[bool, typer.Option("--html/--no-html", help="Also write the animation as HTML (same name, .html) for notebooks.")] = True,
    n: Annotated[int, typer.Option("--n", help="Number of noisy points.")] = 100,
    noise: Annotated[float, typer.Option("--noise", help="Standard deviation of the noise added to y.")] = 0.5,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", help="Gradient-descent steps (each on all points).")] = 100,
    seed: LessonSeedOpt = 42,
) -> None:
    """Fit y = x@a to noisy points by gradient descent, written out by hand; animate the line and the loss."""
    from ursa.errors import LessonError
    from ursa.lessons.sgd import make_line, sgd_lesson

    check_number(noise, "--noise", LessonError, at_least=0.0)  # the lesson checks the rest
    outs = {"out": _lesson_out(out, (".gif",))}
    if html:
        outs["html"] = out.with_suffix(".html")
    try:
        x, y, a_true = make_line(n, noise=noise, seed=seed)
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    result = _run_lesson(sgd_lesson, x, y, a_true=a_true.tolist(), lr=lr, epochs=epochs, outs=outs)
    _print_lesson(result, f"gradient descent on y = x@a, {n} points", list(outs.values()))


@lesson_app.command("minibatch")
def lesson_minibatch(
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("minibatch.png"),
    n: Annotated[int, typer.Option("--n", help="Number of examples.")] = 100_000,
    features: Annotated[int, typer.Option("--features", help="Number of features per example.")] = 50,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per mini-batch.")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Updates per method.")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (both methods).")] = 0.05,
    seed: LessonSeedOpt = 42,
) -> None:
    """Full-batch gradient descent vs mini-batch SGD: loss against steps and against seconds."""
    from ursa.errors import LessonError
    from ursa.lessons.minibatch import make_regression, minibatch_lesson

    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    try:
        x, y = make_regression(n, d=features, seed=seed)
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    result = _run_lesson(minibatch_lesson, x, y, batch_size=batch_size, lr=lr, steps=steps, seed=seed, outs=outs)
    _print_lesson(result, f"full batch vs mini-batch, linear regression on {n:,} examples x {features} features", [out])


@lesson_app.command("lr")
def lesson_lr(
    data: LessonDataArg = None,
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("lr.png"),
    high: Annotated[float, typer.Option("--high", help="The too-high learning rate.")] = 3.0,
    good: Annotated[float, typer.Option("--good", help="A good learning rate.")] = 0.3,
    low: Annotated[float, typer.Option("--low", help="The too-low learning rate.")] = 0.003,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per run.")] = 10,
    size: LessonSizeOpt = 16,
    seed: LessonSeedOpt = 42,
) -> None:
    """Train the same small network three times, with a too-high, a good and a too-low learning rate."""
    from ursa.lessons.lr import lr_lesson

    xt, yt, xv, yv, _, _, desc = _lesson_arrays(data, seed=seed, size=size)
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    result = _run_lesson(lr_lesson, xt, yt, xv, yv, lrs=(high, good, low), epochs=epochs, seed=seed, outs=outs)
    _print_lesson(result, f"learning rates on {desc}: {len(xt)} train / {len(xv)} valid images", [out])


@lesson_app.command("epochs")
def lesson_epochs(
    data: LessonDataArg = None,
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("epochs.png"),
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs to train.")] = 100,
    n_train: Annotated[int, typer.Option("--n-train", help="Training images used (few, so overfitting shows).")] = 300,
    noise: Annotated[float, typer.Option("--noise", help="Share of training labels swapped for a wrong class, in [0, 1).")] = 0.3,
    hidden: Annotated[int, typer.Option("--hidden", help="Units in each of the two hidden layers.")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (SGD with momentum 0.9).")] = 0.02,
    size: LessonSizeOpt = 16,
    seed: LessonSeedOpt = 42,
) -> None:
    """Train for many epochs on few, noisy labels: watch validation loss turn up while training loss falls."""
    from ursa.lessons.epochs import epochs_lesson

    xt, yt, xv, yv, _, _, desc = _lesson_arrays(data, seed=seed, size=size)
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    result = _run_lesson(
        epochs_lesson, xt, yt, xv, yv, epochs=epochs, n_train=n_train, noise=noise, hidden=hidden, lr=lr, seed=seed, outs=outs
    )
    _print_lesson(result, f"epochs on {desc}: {result.n_train} train images ({result.flipped} mislabelled), {len(xv)} valid", [out])


@lesson_app.command("fit")
def lesson_fit(
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("fit.png"),
    n_train: Annotated[int, typer.Option("--n-train", help="Training points.")] = 18,
    n_valid: Annotated[int, typer.Option("--n-valid", help="Validation points.")] = 40,
    noise: Annotated[float, typer.Option("--noise", help="Standard deviation of the noise on y.")] = 0.25,
    degrees: Annotated[tuple[int, int, int], typer.Option("--degrees", help="Polynomial degrees: underfit, good, overfit.")] = (1, 4, 15),
    seed: LessonSeedOpt = 42,
) -> None:
    """Under-, well- and over-fitted curves on the same noisy points, with training and validation points."""
    from ursa.errors import LessonError
    from ursa.lessons.fit import fit_lesson, make_curve

    check_number(noise, "--noise", LessonError, at_least=0.0)  # the lesson checks the rest
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    try:
        arrays = make_curve(n_train, n_valid, noise=noise, seed=seed)
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    result = _run_lesson(fit_lesson, *arrays, degrees=degrees, outs=outs)
    _print_lesson(result, f"polynomials fitted to {n_train} noisy points of sin(pi x), scored on {n_valid} more", [out])


@lesson_app.command("predict")
def lesson_predict(
    data: LessonDataArg = None,
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("predict.png"),
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of training for the linear classifier.")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Validation batch predicted by hand.")] = 64,
    show: Annotated[int, typer.Option("--show", help="Images of the batch drawn and listed.")] = 6,
    size: LessonSizeOpt = 16,
    seed: LessonSeedOpt = 42,
) -> None:
    """Probabilities, argmax and error rate by hand on one validation batch, checked against the library metric."""
    import math

    from rich.table import Table

    from ursa.errors import LessonError
    from ursa.lessons.predict import predict_lesson
    from ursa.train.metrics import error_rate

    xt, yt, xv, yv, classes, shape, desc = _lesson_arrays(data, seed=seed, size=size)
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    result = _run_lesson(
        predict_lesson, xt, yt, xv, yv, classes=classes, image_shape=shape, epochs=epochs, batch_size=batch_size,
        show=show, seed=seed, outs=outs,
    )  # fmt: skip
    _print_lesson(result, f"predict on {desc}: one validation batch of {len(result.targets)}", [out])
    library = error_rate(result.probs, result.targets)
    check = Table(title="error rate on the batch", title_justify="left")
    for col in ("by hand: (preds != targets).mean()", "ursa.train.metrics.error_rate", "equal"):
        check.add_column(col, justify="right")
    # Equal up to float rounding: the metric computes 1 - accuracy, the lesson counts the mistakes.
    same = math.isclose(result.error_rate, library, abs_tol=1e-6)
    check.add_row(f"{result.error_rate:.4f}", f"{library:.4f}", "yes" if same else "[bold red]NO[/]")
    console.print(check)
    if not same:
        raise LessonError("the hand-computed error rate differs from the library's; please report this as a bug.")


# ---- export / serve (issue 5) ----
ModelArg = Annotated[Path, typer.Argument(help="Export folder written by `ursa export` (e.g. models/bears).", show_default=False)]
Int8Opt = Annotated[bool, typer.Option("--int8", help="Use model.int8.onnx (an export made with --int8).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="onnx (ONNX Runtime), torch (PyTorch on the safetensors weights) or auto.")]


def _check_server(*, port: int, concurrency: int | None = None, threads: int | None = None, max_upload_mb: float | None = None) -> None:
    """The web servers' options, checked before anything is printed or loaded.

    Port 0 (any free port) is refused: the address printed must be the one a person can open.
    """
    from ursa.errors import ServeError

    check_number(port, "--port", ServeError, integer=True, at_least=1, at_most=65535)
    check_number(concurrency, "--concurrency", ServeError, integer=True, at_least=1, optional=True, hint="Leave it out for one per core, at most 4.")
    check_number(threads, "--threads", ServeError, integer=True, at_least=1, optional=True, hint="Leave it out for cores / concurrency.")
    check_number(max_upload_mb, "--max-upload-mb", ServeError, above=0.0, optional=True, unit="MiB")


@app.command("export")
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


@app.command("predict")
def predict_cmd(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(help="Image files, folders of images, or glob patterns.", show_default=False)],
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write one row per image (with p_<class> columns) to this CSV file.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes listed per image.")] = 3,
    int8: Int8Opt = False,
    backend: BackendOpt = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="ONNX Runtime threads (default: its own choice).")] = None,
    open_set: Annotated[bool, typer.Option("--open-set/--no-open-set", help="Answer 'none of these' under the calibrated threshold.")] = True,
) -> None:
    """Classify images with an exported model: label, probability and top classes per image. Unreadable files become error rows."""
    from rich.table import Table

    from ursa.errors import ExportError
    from ursa.export import expand_image_paths, load_model, predict_paths, write_predictions_csv

    check_number(top_k, "--top-k", ExportError, integer=True, at_least=1)
    check_number(threads, "--threads", ExportError, integer=True, at_least=1, optional=True, hint="Leave it out for ONNX Runtime's own choice.")
    if csv_out is not None and csv_out.is_dir():
        raise ExportError(f"--csv {csv_out} is a folder. Pass a file name such as {csv_out / 'preds.csv'}.")
    predictor = load_model(model, backend=backend, precision="int8" if int8 else "fp32", threads=threads, open_set=open_set)
    paths = expand_image_paths(images)
    rows = predict_paths(predictor, paths, top_k=top_k)
    t = Table(title=f"{model} ({predictor.backend}, {predictor.precision})", title_justify="left")
    for col in ("image", "label", "prob", "top"):
        t.add_column(col, justify="right" if col == "prob" else "left")
    shown = 200
    for r in rows[:shown]:
        if r["status"] == "ok":
            t.add_row(r["path"], r["label"], f"{r['prob']:.3f}", ", ".join(f"{c} {p:.2f}" for c, p in r["top"]))
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


@app.command("serve")
def serve_cmd(
    model: ModelArg,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network.")] = "127.0.0.1",
    int8: Int8Opt = False,
    backend: BackendOpt = "auto",
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", help="Predictions running at once (default: cores, at most 4).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="ONNX Runtime threads per prediction (default: cores / concurrency).")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest upload accepted, in MiB.")] = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No access log.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", envvar="URSA_TOKEN", show_envvar=True, help="Token clients must send (Authorization: Bearer, or ?token= in the page's address); generated when --host is not loopback.")] = None,
) -> None:
    """Serve a web page and a JSON API (POST /predict, GET /health, GET /model, /docs) for an exported model."""
    from ursa.web.predict_app import serve
    from ursa.web.security import is_loopback, resolve_token

    _check_server(port=port, concurrency=concurrency, threads=threads, max_upload_mb=max_upload_mb)
    token = resolve_token(host, token)
    if not is_loopback(host):
        err_console.print(f"[yellow]note:[/] binding {host}: other machines can reach this server; they need the token in the address below "
                          "(or the header 'Authorization: Bearer TOKEN').", highlight=False)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving {model} at http://{shown}:{port}/{'?token=' + token if token else ''}  (API docs at /docs; Ctrl-C stops)", highlight=False, soft_wrap=True)
    serve(model, host=host, port=port, concurrency=concurrency, threads=threads, max_upload_bytes=int(max_upload_mb * 2**20),
          backend=backend, precision="int8" if int8 else "fp32", access_log=not quiet, token=token)  # fmt: skip


# ---- interpret / issues / review (issue 4) ----
RunArg = Annotated[Path, typer.Argument(help="Run folder written by `ursa train` (e.g. runs/bears).", show_default=False)]


@app.command("interpret")
def interpret_cmd(
    run: RunArg,
    top: Annotated[int, typer.Option("--top", help="Images in top_losses.png.")] = 9,
    min_val: Annotated[int, typer.Option("--min-val", help="Smallest count shown in the most-confused table.")] = 1,
    normalize: Annotated[bool, typer.Option("--normalize", help="Confusion matrix as shares of each actual class.")] = False,
) -> None:
    """What the model gets wrong on the validation set: confusion.png, top_losses.png, most confused pairs, per-class metrics."""
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


@app.command("issues")
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


@app.command("review")
def review_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset folder the run was trained on.", show_default=False)],
    run: Annotated[Optional[Path], typer.Option("--run", help="Run folder whose issues.csv to review (searched first if missing).")] = None,
    port: Annotated[int, typer.Option("--port", help="TCP port of the review page.")] = 8765,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser window.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Apply the saved decisions: write cleaned.csv, quarantine deleted images.")] = False,
    undo: Annotated[bool, typer.Option("--undo", help="Undo the last apply: restore the dataset byte for byte.")] = False,
) -> None:
    """Review flagged images in a local web page (keep / relabel / delete, saved as you go), then apply or undo."""
    from ursa.errors import ReviewError
    from ursa.review import Review

    _check_server(port=port)
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
    if not (run / "issues.csv").is_file():
        from ursa.interpret.issues import find_issues

        console.print(f"{run / 'issues.csv'} is missing; searching first...", highlight=False)
        find_issues(run)
    from ursa.web.review_app import create_review_app
    from ursa.web.server import run as run_server

    review_app = create_review_app(data, run)  # loopback only, behind the Host/Origin/JSON checks
    url = f"http://127.0.0.1:{port}/"
    console.print(f"review page at {url}  (decisions are saved as you make them; Ctrl-C stops)", highlight=False)
    if not no_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    run_server(review_app, host="127.0.0.1", port=port, log_level="warning", limit_concurrency=64)


# ---- scale out (issue 7) ----
_ARGV: list[str] = []  # the arguments main() was given


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _scale_out(cfg, *, nproc: int, device: str, precision: str):  # noqa: ANN001, ANN202
    """The TrainConfig with --device/--precision recorded, or None once `--nproc N` has run torchrun.

    Under torchrun (WORLD_SIZE set) --nproc is ignored and ranks other than 0 print nothing.
    """
    import dataclasses

    from ursa.errors import TrainError
    from ursa.train import distributed as dist

    check_number(nproc, "--nproc", TrainError, integer=True, at_least=1, hint="Use --nproc 2 for two processes.")
    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"--device {device} is not a device; use auto, cpu or cuda.")
    if precision not in dist.PRECISIONS:
        raise TrainError(f"--precision {precision} is not a precision; use one of {', '.join(dist.PRECISIONS)}.")
    picked = dist.pick_device(device)  # --device cuda without a GPU fails here, before anything starts
    if nproc > 1 and picked.type == "cuda" and nproc > _cuda_count():
        raise TrainError(f"--nproc {nproc} needs {nproc} GPUs but {_cuda_count()} are visible; use --nproc {_cuda_count()} or --device cpu.")
    under_torchrun = "WORLD_SIZE" in os.environ
    if nproc > 1 and not under_torchrun:
        argv = _without_nproc(_ARGV or sys.argv[1:])
        console.print(f"starting {nproc} processes: {' '.join(dist.torchrun_command(nproc, argv))}", highlight=False)
        dist.launch(nproc, argv, threads=cfg.threads)
        return None
    if dist.env().rank != 0:
        console.quiet = True
    given = {k: v for k, v in (("device", device), ("precision", precision)) if v != "auto"}
    return dataclasses.replace(cfg, extra={**cfg.extra, **given}) if given else cfg


def _cuda_count() -> int:
    """GPUs visible to PyTorch."""
    import torch

    return torch.cuda.device_count()


def _shard_jobs(jobs: list, shard: str) -> list:  # noqa: ANN001
    """The jobs of `--shard i/N` (checked), with a line saying how many."""
    from ursa.collect.download import parse_shard, select_shard

    i, n = parse_shard(shard)
    mine = select_shard(jobs, i, n)
    err_console.print(f"shard {i}/{n}: {len(mine)} of {len(jobs)} URLs", highlight=False)
    return mine
