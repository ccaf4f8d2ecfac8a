"""`ursa info` and `ursa show-batch`: look at a dataset before training on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import (
    DATA, TRAIN, AllowNewOpt, ArchOpt, DataArg, FlipOpt, LabelsOpt, SeedOpt, TrainOpt, ValidOpt, ValidPctOpt,
    AugOpt, FlipVertOpt, MaxLightingOpt, MaxRotateOpt, MaxWarpOpt, MaxZoomOpt, MinScaleOpt, PAffineOpt, PLightingOpt,
    augment, check_out_file, console, data_config,
)  # fmt: skip
from ursa.config import TrainConfig, check_number

__all__ = ["info", "show_batch"]


def info(
    data: DataArg,
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = DATA.valid_pct,
    seed: SeedOpt = DATA.seed,
    allow_new_labels: AllowNewOpt = DATA.allow_new_labels,
) -> None:
    """Classes, image counts per class and per split, and image sizes."""
    from rich.table import Table

    from ursa.data.split import build_split, dataset_sizes

    split = build_split(data, data_config(train, valid, labels, valid_pct, seed, True, allow_new_labels))
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


def show_batch(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("batch.png"),
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 9,
    train: TrainOpt = None,
    valid: ValidOpt = None,
    labels: LabelsOpt = None,
    valid_pct: ValidPctOpt = DATA.valid_pct,
    seed: SeedOpt = DATA.seed,
    flip: FlipOpt = DATA.flip,
    arch: ArchOpt = TRAIN.arch,
    size: Annotated[Optional[int], typer.Option("--size", help="Input side in pixels, as given to train (default: the backbone's own).")] = None,
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
    """A grid of augmented training images with their labels (the augmentation options are train's)."""
    from ursa.data.loaders import ImageDataLoaders, default_data_config
    from ursa.data.split import build_split
    from ursa.errors import DataError

    check_out_file(out)
    check_number(n, "-n", DataError, integer=True, at_least=1)
    size = TrainConfig(arch=arch, size=size).size  # the sizes train accepts, checked by TrainConfig
    augmentation = augment(aug, flip_vert=flip_vert, max_rotate=max_rotate, max_zoom=max_zoom, max_lighting=max_lighting, max_warp=max_warp, p_affine=p_affine, p_lighting=p_lighting, min_scale=min_scale)
    data_cfg = data_config(train, valid, labels, valid_pct, seed, flip, aug=augmentation)
    split = build_split(data, data_cfg)
    dls = ImageDataLoaders.from_split(split, default_data_config(arch), flip=data_cfg.flip, size=size, aug=data_cfg.aug)
    from ursa.interpret.plots import show_batch as draw_batch

    draw_batch(dls, n, out=out)
    console.print(f"wrote {out}  ({len(split.classes)} classes: {', '.join(split.classes)})")
