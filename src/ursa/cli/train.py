"""`ursa lr-find`, `ursa train` and `ursa demo`: fit a classifier and print where its results are."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import (
    ARGV, DATA, TRAIN, AllowNewOpt, ArchOpt, DataArg, FlipOpt, LabelsOpt, SeedOpt, TrainOpt, ValidOpt, ValidPctOpt, WeightsOpt,
    AugOpt, FlipVertOpt, MaxLightingOpt, MaxRotateOpt, MaxWarpOpt, MaxZoomOpt, MinScaleOpt, PAffineOpt, PLightingOpt,
    augment, check_out_file, console, data_config,
)  # fmt: skip
from ursa.config import DataConfig, TrainConfig, check_number

__all__ = ["lr_find", "train_cmd", "demo"]


def lr_find(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("lr.png"),
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = DATA.valid_pct,
    seed: SeedOpt = DATA.seed,
    flip: FlipOpt = DATA.flip,
    arch: ArchOpt = TRAIN.arch,
    weights: WeightsOpt = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels (default: the backbone's own).")] = None,
    aug: AugOpt = "default",
    max_rotate: MaxRotateOpt = None,
    max_zoom: MaxZoomOpt = None,
    max_lighting: MaxLightingOpt = None,
    max_warp: MaxWarpOpt = None,
    p_affine: PAffineOpt = None,
    p_lighting: PLightingOpt = None,
    min_scale: MinScaleOpt = None,
    flip_vert: FlipVertOpt = False,
) -> None:
    """Sweep the learning rate of the head stage (on cached features) and suggest one."""
    from ursa.train.recipe import head_learner

    check_out_file(out)
    augmentation = augment(aug, flip_vert=flip_vert, max_rotate=max_rotate, max_zoom=max_zoom, max_lighting=max_lighting, max_warp=max_warp, p_affine=p_affine, p_lighting=p_lighting, min_scale=min_scale)
    learn = head_learner(data, data_config(train, valid, labels, valid_pct, seed, flip, aug=augmentation), TrainConfig(arch=arch, weights=str(weights) if weights else None, size=size))
    s = learn.lr_find()
    learn.recorder.plot_lr_find(out)
    console.print(f"suggested learning rate: [bold]{s.valley:.2e}[/] (valley); steep {s.steep:.2e}, minimum/10 {s.minimum:.2e}")
    console.print(f"wrote {out}.  Use it with: ursa train {data} --lr {s.valley:.1e}")


def train_cmd(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Run folder (a new one, runs/NAME-2, if it already has a run).")] = Path("runs/run"),
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = DATA.valid_pct,
    seed: SeedOpt = DATA.seed,
    flip: FlipOpt = DATA.flip,
    allow_new_labels: AllowNewOpt = DATA.allow_new_labels,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Backbone: efficientnet_lite0/1/2 (packaged weights), any timm name with --weights, or auto: the most accurate packaged one --budget allows. Default: efficientnet_lite0, or auto with --budget.", show_default=False)] = None,
    weights: WeightsOpt = None,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Seconds the run may take: picks the most accurate packaged backbone (and views) whose features fit, measured by a quick probe. Implies --arch auto.")] = None,
    head: Annotated[str, typer.Option("--head", help="Head solver: lbfgs (fitted to convergence, no lr to pick) or one_cycle (SGD epochs, uses --epochs/--lr).")] = TRAIN.head,
    c: Annotated[float, typer.Option("--c", help="Inverse L2 strength of the lbfgs head (larger fits the training set harder).")] = TRAIN.c,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of the one_cycle head on cached features.")] = TRAIN.epochs,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the one_cycle head (default 3e-3); implies --head one_cycle.")] = None,
    views: Annotated[int, typer.Option("--views", help="Most augmented views per training image in the feature cache.")] = TRAIN.views,
    fine_tune: Annotated[int, typer.Option("--fine-tune", help="Epochs of full fine-tuning after the head stage (0: none).")] = TRAIN.fine_tune,
    fine_tune_lr: Annotated[float, typer.Option("--fine-tune-lr", help="Peak learning rate of the head when fine-tuning (the body gets 1/10 and 1/100 of it).")] = TRAIN.fine_tune_lr,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels (default: the backbone's own, 224 for lite0).")] = None,
    batch_size: Annotated[int, typer.Option("--bs", help="Images per batch, for feature extraction and fine-tuning.")] = TRAIN.batch_size,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes: N > 1 starts torchrun with N ranks (DDP; gloo on CPU, NCCL on GPU).")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")] = TRAIN.device,
    precision: Annotated[str, typer.Option("--precision", help="Fine-tuning precision: auto, fp32, bf16 or fp16 (GPU); auto is bf16/fp16 on a GPU by its capability, fp32 on every CPU.")] = TRAIN.precision,
    aug: AugOpt = "default",
    max_rotate: MaxRotateOpt = None,
    max_zoom: MaxZoomOpt = None,
    max_lighting: MaxLightingOpt = None,
    max_warp: MaxWarpOpt = None,
    p_affine: PAffineOpt = None,
    p_lighting: PLightingOpt = None,
    min_scale: MinScaleOpt = None,
    flip_vert: FlipVertOpt = False,
) -> None:
    """Train a classifier with the CPU-fast default recipe and write the run folder."""
    from ursa.train.recipe import train_run

    head = "one_cycle" if head == "one-cycle" or (lr is not None and head == "lbfgs") else head  # --lr implies one_cycle
    augmentation = augment(aug, flip_vert=flip_vert, max_rotate=max_rotate, max_zoom=max_zoom, max_lighting=max_lighting, max_warp=max_warp, p_affine=p_affine, p_lighting=p_lighting, min_scale=min_scale)
    data_cfg = data_config(train, valid, labels, valid_pct, seed, flip, allow_new_labels, aug=augmentation)  # checked before torchrun starts
    arch = arch or ("auto" if budget is not None else TRAIN.arch)
    cfg = TrainConfig(arch=arch, weights=str(weights) if weights else None, budget=budget, head=head, c=c, epochs=epochs, lr=lr, views=views, fine_tune=fine_tune, fine_tune_lr=fine_tune_lr, batch_size=batch_size, threads=threads, size=size)
    cfg = _scale_out(cfg, nproc=nproc, device=device, precision=precision)
    if cfg is None:
        return  # the ranks torchrun started did the training and printed the result
    res = train_run(data, out, data=data_cfg, train=cfg, console=console)
    _print_result(res)


def _scale_out(cfg, *, nproc: int, device: str, precision: str):  # noqa: ANN001, ANN202
    """The TrainConfig with --device/--precision recorded, or None once `--nproc N` has run torchrun.

    Under torchrun (WORLD_SIZE set) --nproc is ignored and ranks other than 0 print nothing.
    """
    import dataclasses

    from ursa.train import distributed as dist
    from ursa.train.launch import scale_out

    def starting(command: list[str]) -> None:
        console.print(f"starting {nproc} processes: {' '.join(command)}", highlight=False)

    if scale_out(nproc, device=device, precision=precision, argv=ARGV or sys.argv[1:], threads=cfg.threads, on_start=starting):
        return None
    if dist.env().rank != 0:
        console.quiet = True
    return dataclasses.replace(cfg, device=device, precision=precision)


def _print_result(res) -> None:  # noqa: ANN001
    from rich.table import Table

    m = res.metrics
    t = Table(title=f"run {res.out}", show_header=False)
    t.add_row("error_rate", f"{m['error_rate']:.4f}  ({round(m['error_rate'] * m['n_valid'])} of {m['n_valid']} validation images wrong)")
    t.add_row("accuracy", f"{m['accuracy']:.4f}")
    t.add_row("train / valid images", f"{m['n_train']} / {m['n_valid']}" + (f"  ({m['n_skipped']} skipped, see skipped.csv)" if m["n_skipped"] else ""))
    t.add_row("wall time", f"{m['wall_s']:.1f} s  (features {m['feature_s']:.1f} s)")
    if m.get("budget"):
        t.add_row("backbone", f"{m['budget'].get('arch')}: {m['budget'].get('why')}")
    if "ece" in m:
        t.add_row("calibration", f"temperature {m['temperature']:.3g}, ECE {m['ece']['before']:.4f} -> {m['ece']['after']:.4f}")
    console.print(t)
    console.print(f"results: {res.out}/metrics.json, history.csv, losses.png, models/model.safetensors")


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
    console.print(f"      or the whole flow in a web page:  ursa studio {root}", soft_wrap=True)  # a path a terminal can copy whole
