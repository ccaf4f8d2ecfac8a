"""Image decoding and the train / eval transforms, built from the model's own data config.

The model defines its preprocessing (`timm.data.resolve_model_data_config`): input size, mean, std,
crop fraction and interpolation. Nothing here copies those constants.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ursa.imageio import draft_jpeg, eval_crop_mode, eval_geometry, eval_input, open_checked, upright_rgb

__all__ = ["open_image", "eval_transform", "train_transform", "flip_view", "denormalize", "input_size"]

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}


def input_size(data_config: dict[str, Any]) -> int:
    """Square input side in pixels (the model's `input_size` is (C, H, W))."""
    return int(data_config["input_size"][-1])


def open_image(path: str | Path, *, min_side: int | None = None) -> Image.Image:
    """Decode `path` as an RGB PIL image, upright per its EXIF orientation.

    For JPEGs larger than needed, `min_side` lets the decoder downscale by 1/2, 1/4 or 1/8 while
    decoding (several times faster on phone photos) without going below `min_side` pixels. An image
    over the pixel limit every stage shares (`ursa.imageio.MAX_PIXELS`) raises ImageTooLargeError before it
    is decoded; the loaders skip it with that reason, as they skip any file that will not decode.
    """
    im = open_checked(path)
    draft_jpeg(im, min_side)
    return upright_rgb(im)


def _normalize(data_config: dict[str, Any]) -> list[Any]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))]


def eval_transform(data_config: dict[str, Any], *, size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to size / crop_pct, center-crop `size`, normalize. Output (3, size, size) float32.
    The config's timm `crop_mode` ("squash", "border") changes the resize as in timm's eval transform.

    It is `ursa.imageio.eval_input`, the function the exported predictor calls too.
    """
    side, short, resample = eval_geometry(data_config, size=size)
    mode = eval_crop_mode(data_config)
    return functools.partial(_eval, side=side, short=short, resample=resample, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), crop_mode=mode)


def _eval(im: Image.Image, *, side: int, short: int, resample: Image.Resampling, mean: tuple[float, ...], std: tuple[float, ...], crop_mode: str) -> torch.Tensor:
    return torch.from_numpy(eval_input(im, short=short, size=side, resample=resample, mean=mean, std=std, crop_mode=crop_mode))


def train_transform(
    data_config: dict[str, Any],
    *,
    size: int | None = None,
    flip: bool = True,
    scale: tuple[float, float] = (0.35, 1.0),
    jitter: float = 0.2,
) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (area `scale`, aspect 3/4..4/3), optional horizontal flip, colour jitter, normalize.

    Randomness comes from torch's global generator; callers that need reproducible views seed it
    (see `ursa.train.features`).
    """
    size = size or input_size(data_config)
    interp = _INTERP.get(str(data_config.get("interpolation", "bicubic")), InterpolationMode.BICUBIC)
    steps: list[Any] = [T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if jitter > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return T.Compose([*steps, *_normalize(data_config)])


def flip_view(x: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror of a (..., H, W) batch (the test-time-augmentation view)."""
    return torch.flip(x, dims=[-1])


def denormalize(x: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """Undo `Normalize` for display: (..., 3, H, W) -> values in [0, 1]."""
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
