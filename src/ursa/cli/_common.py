"""What the stage modules of the CLI share: the consoles, the config defaults, options used by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ursa.config import AUG_PRESETS, Augment, CollectConfig, DataConfig, TrainConfig, VerifyConfig, check_number

__all__ = [
    "console", "err_console", "ARGV", "DATA", "TRAIN", "COLLECT", "VERIFY",
    "DataArg", "TrainOpt", "ValidOpt", "LabelsOpt", "ValidPctOpt", "SeedOpt", "FlipOpt", "ArchOpt", "WeightsOpt", "AllowNewOpt",
    "RunArg", "ModelArg", "Int8Opt", "BackendOpt", "data_config", "check_out_file", "check_server",
    "AugOpt", "MaxRotateOpt", "MaxZoomOpt", "MaxLightingOpt", "MaxWarpOpt", "PAffineOpt", "PLightingOpt", "MinScaleOpt", "FlipVertOpt", "augment",
]  # fmt: skip

console = Console()
err_console = Console(stderr=True)

ARGV: list[str] = []  # the arguments main() was given: what `train --nproc N` passes on to torchrun

# The options' defaults are the config dataclasses' own (one place to change them); options that no
# config carries are checked with the same `check_number` before anything is printed or started.
DATA, TRAIN, COLLECT, VERIFY = DataConfig(), TrainConfig(), CollectConfig(), VerifyConfig()

# ---- data / train ----
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

# ---- augmentation (train, lr-find, show-batch): a preset, and fastai's aug_transforms settings changing it ----
_PRESET = "the --aug preset's"
AugOpt = Annotated[str, typer.Option("--aug", help="Augmentation preset: default (random crops of 35-100% of the area, flips, colour jitter), lesson (fastai's aug_transforms(): flips, rotate 10, zoom 1.1, warp 0.2, lighting 0.2) or none. The options below change one setting of it.")]
MaxRotateOpt = Annotated[Optional[float], typer.Option("--max-rotate", help="Largest rotation in degrees (0: none).", show_default=_PRESET)]
MaxZoomOpt = Annotated[Optional[float], typer.Option("--max-zoom", help="Largest zoom-in factor (1: none).", show_default=_PRESET)]
MaxLightingOpt = Annotated[Optional[float], typer.Option("--max-lighting", help="Largest brightness and contrast change, a share (0: none).", show_default=_PRESET)]
MaxWarpOpt = Annotated[Optional[float], typer.Option("--max-warp", help="Largest perspective warp, a share of half the side (0: none).", show_default=_PRESET)]
PAffineOpt = Annotated[Optional[float], typer.Option("--p-affine", help="Probability of each of rotate, zoom and warp.", show_default=_PRESET)]
PLightingOpt = Annotated[Optional[float], typer.Option("--p-lighting", help="Probability of the lighting change.", show_default=_PRESET)]
MinScaleOpt = Annotated[Optional[float], typer.Option("--min-scale", help="Smallest share of the image's area a random crop keeps (1: the whole image).", show_default=_PRESET)]
FlipVertOpt = Annotated[bool, typer.Option("--flip-vert", help="With flips: also vertical flips and quarter turns (for pictures with no up, such as satellite images).")]

# ---- interpret / issues ----
RunArg = Annotated[Path, typer.Argument(help="Run folder written by `ursa train` (e.g. runs/bears).", show_default=False)]

# ---- predict / serve ----
ModelArg = Annotated[Path, typer.Argument(help="Export folder written by `ursa export` (e.g. models/bears).", show_default=False)]
Int8Opt = Annotated[bool, typer.Option("--int8", help="Use model.int8.onnx (an export made with --int8).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="onnx (ONNX Runtime), torch (PyTorch on the safetensors weights) or auto.")]


def data_config(train: str | None, valid: str | None, labels: str | None, valid_pct: float, seed: int, flip: bool, allow_new_labels: bool = False, aug: Augment | None = None) -> DataConfig:
    """The DataConfig of the data options (checked by DataConfig itself); `aug` None: the default augmentation."""
    extra = {} if aug is None else {"aug": aug}
    return DataConfig(train=train, valid=valid, labels=labels, valid_pct=valid_pct, seed=seed, flip=flip, allow_new_labels=allow_new_labels, **extra)


def augment(preset: str, *, flip_vert: bool = False, **settings: float | None) -> Augment:
    """The Augment of the augmentation options: the `--aug` preset with each setting given replacing its own
    (checked by Augment itself, naming the option)."""
    import dataclasses

    from ursa.errors import DataError

    if preset not in AUG_PRESETS:
        raise DataError(f"--aug must be one of {', '.join(map(repr, AUG_PRESETS))}, got {preset!r}.")
    changes: dict[str, object] = {k: v for k, v in settings.items() if v is not None}
    if flip_vert:
        changes["flip_vert"] = True
    return dataclasses.replace(AUG_PRESETS[preset], **changes) if changes else AUG_PRESETS[preset]


def check_out_file(out: Path, suffix: str = ".png") -> Path:
    """`--out` of a command that writes one picture: a file name ending in `suffix`, not a folder."""
    from ursa.errors import DataError

    if out.suffix.lower() != suffix:
        raise DataError(f"--out {out} should end in {suffix}. Pass a file name such as batch{suffix}.")
    if out.exists() and out.is_dir():
        raise DataError(f"--out {out} is a folder. Pass a file name such as {out / ('batch' + suffix)}.")
    return out


def check_server(*, port: int, concurrency: int | None = None, threads: int | None = None, max_upload_mb: float | None = None) -> None:
    """The web servers' options, checked before anything is printed or loaded.

    Port 0 (any free port) is refused: the address printed must be the one a person can open.
    """
    from ursa.errors import ServeError

    check_number(port, "--port", ServeError, integer=True, at_least=1, at_most=65535)
    check_number(concurrency, "--concurrency", ServeError, integer=True, at_least=1, optional=True, hint="Leave it out for one per core, at most 4.")
    check_number(threads, "--threads", ServeError, integer=True, at_least=1, optional=True, hint="Leave it out for cores / concurrency.")
    check_number(max_upload_mb, "--max-upload-mb", ServeError, above=0.0, optional=True, unit="MiB")
