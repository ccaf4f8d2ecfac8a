"""Image decoding and the train / eval transforms, built from the model's own data config.

The model defines its preprocessing (`timm.data.resolve_model_data_config`): input size, mean, std,
crop fraction and interpolation. Nothing here copies those constants.

Training augmentation is an `Augment` (`aug_transforms(...)`, fastai's names and defaults), built on
torchvision's v2 transforms: crop to the input side, flips, one resampling for rotate + zoom + warp (over
a reflection-padded border, as fastai pads, so no black corners), colour jitter, normalize.
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ursa.config import AUG_PRESETS, DEFAULT_AUG, Augment, check_number
from ursa.errors import DataError
from ursa.imageio import draft_jpeg, eval_crop_mode, eval_geometry, eval_input, open_checked, upright_rgb

__all__ = [
    "open_image", "eval_transform", "train_transform", "aug_transforms", "Augment", "DEFAULT_AUG", "AUG_PRESETS",
    "flip_view", "denormalize", "input_size",
]  # fmt: skip

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


def aug_transforms(
    *,
    mult: float = 1.0,
    do_flip: bool = True,
    flip_vert: bool = False,
    max_rotate: float = 10.0,
    max_zoom: float = 1.1,
    max_lighting: float = 0.2,
    max_warp: float = 0.2,
    p_affine: float = 0.75,
    p_lighting: float = 0.75,
    min_scale: float = 1.0,
) -> Augment:
    """fastai's `aug_transforms`, with its names and defaults: an `Augment` for `ImageDataLoaders(ds_tfms=...)`.

    Left-right flips (with `flip_vert`, any of the 8 flips and quarter turns); with probability `p_affine`
    each, a rotation of up to `max_rotate` degrees, a zoom of up to `max_zoom` toward a random point, and a
    perspective warp of up to `max_warp`; with probability `p_lighting`, brightness and contrast changed by
    up to `max_lighting`. `mult` scales max_rotate, max_lighting and max_warp; `min_scale` < 1 crops a random
    share of the area (at least `min_scale`) instead of the whole image. A value out of range raises
    DataError naming it and its range.
    """
    check_number(mult, "aug_transforms(mult=...)", DataError, at_least=0.0)

    def scaled(value: Any) -> Any:  # a value that is not a number is left for Augment to name in its error
        return value * mult if isinstance(value, numbers.Real) and not isinstance(value, bool) else value

    return Augment(
        do_flip=do_flip, flip_vert=flip_vert, max_rotate=scaled(max_rotate), max_zoom=max_zoom, max_lighting=scaled(max_lighting),
        max_warp=scaled(max_warp), p_affine=p_affine, p_lighting=p_lighting, min_scale=min_scale,
    )  # fmt: skip


def train_transform(data_config: dict[str, Any], *, size: int | None = None, aug: Augment = DEFAULT_AUG) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform of `aug`: PIL image -> (3, size, size) float32, normalized.

    Crop: with `aug.min_scale` < 1 a random resized crop (area min_scale..1, aspect 3/4..4/3), else the
    short side resized to `size` and a random square cropped. Then flips, rotate/zoom/warp in one
    resampling, colour jitter. A step that cannot change the image is left out, so `DEFAULT_AUG` is exactly
    the transform (and the random draws) the feature cache's views were made with before `Augment` existed.
    Randomness comes from torch's global generator; callers that need reproducible views seed it
    (see `ursa.train.features`).
    """
    size = size or input_size(data_config)
    interp = _INTERP.get(str(data_config.get("interpolation", "bicubic")), InterpolationMode.BICUBIC)
    if aug.min_scale < 1.0:
        steps: list[Any] = [T.RandomResizedCrop(size, scale=(aug.min_scale, 1.0), interpolation=interp, antialias=True)]
    else:
        steps = [T.Resize(size, interpolation=interp, antialias=True), T.RandomCrop(size)]
    if aug.do_flip:
        steps.append(T.RandomHorizontalFlip())
        if aug.flip_vert:
            steps += [T.RandomVerticalFlip(), _RandomTranspose()]  # with the mirror: the 8 symmetries of a square, equally likely
    if aug.p_affine > 0 and (aug.max_rotate > 0 or aug.max_zoom > 1 or aug.max_warp > 0):
        steps.append(_AffineWarp(aug))
    if aug.p_lighting > 0 and (aug.max_lighting > 0 or aug.saturation > 0):
        jitter = T.ColorJitter(brightness=aug.max_lighting, contrast=aug.max_lighting, saturation=aug.saturation)
        steps.append(jitter if aug.p_lighting >= 1 else T.RandomApply([jitter], p=aug.p_lighting))
    return T.Compose([*steps, *_normalize(data_config)])


class _RandomTranspose:
    """Swap rows and columns (a quarter turn and a mirror) with probability 0.5; the image is square here."""

    def __call__(self, im: Any) -> Any:
        return TF.rotate(TF.horizontal_flip(im), 90) if torch.rand(1).item() < 0.5 else im

    def __repr__(self) -> str:
        return "_RandomTranspose()"


class _AffineWarp:
    """Rotation, zoom toward a random point and perspective warp, each drawn with probability p_affine,
    applied to a square image in one resampling (as fastai composes them), over a reflection-padded border.

    The output's corners are mapped back through the inverse of rotate + zoom, then each is moved by the warp;
    the homography between the two sets of points is one `perspective` call on the padded image.
    """

    def __init__(self, aug: Augment):
        self.aug = aug
        turn = math.radians(min(aug.max_rotate, 45.0))
        # how far outside the square a rotated (and warped) window reaches, as a share of half the side
        self.reach = (math.cos(turn) + math.sin(turn)) * (1.0 + 2.0 * aug.max_warp) - 1.0

    def __repr__(self) -> str:
        a = self.aug
        return f"_AffineWarp(max_rotate={a.max_rotate}, max_zoom={a.max_zoom}, max_warp={a.max_warp}, p={a.p_affine})"

    def __call__(self, im: Any) -> Any:
        a = self.aug
        rand = lambda: torch.rand(1).item()  # noqa: E731  # torch's generator, so a seeded view repeats
        angle = (rand() * 2 - 1) * a.max_rotate if a.max_rotate > 0 and rand() < a.p_affine else 0.0
        zoom, centre = 1.0, (0.5, 0.5)
        if a.max_zoom > 1 and rand() < a.p_affine:
            zoom, centre = 1.0 + rand() * (a.max_zoom - 1.0), (rand(), rand())
        warp = [(rand() * 2 - 1) * a.max_warp for _ in range(8)] if a.max_warp > 0 and rand() < a.p_affine else [0.0] * 8
        if angle == 0.0 and zoom == 1.0 and not any(warp):
            return im
        w, h = TF.get_size(im)[::-1]  # (H, W) -> (W, H)
        half = min(w, h) / 2.0
        pad = math.ceil(half * self.reach) + 2
        cx, cy = pad + w / 2.0, pad + h / 2.0
        # the zoomed window moves toward `centre` and stays inside the image: shift up to half * (zoom - 1)
        tx, ty = ((centre[0] * 2 - 1) * (w / 2.0) * (zoom - 1.0), (centre[1] * 2 - 1) * (h / 2.0) * (zoom - 1.0))
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        corners = [(-w / 2.0, -h / 2.0), (w / 2.0, -h / 2.0), (w / 2.0, h / 2.0), (-w / 2.0, h / 2.0)]
        src, dst = [], []
        for k, (x, y) in enumerate(corners):
            # where the output corner comes from: undo the shift, the zoom and the rotation
            ux, uy = (x - tx) / zoom, (y - ty) / zoom
            src.append([cx + cos * ux + sin * uy, cy - sin * ux + cos * uy])
            dst.append([cx + x + warp[2 * k] * half, cy + y + warp[2 * k + 1] * half])
        padded = TF.pad(im, [pad, pad, pad, pad], padding_mode="reflect")
        out = TF.perspective(padded, src, dst, interpolation=InterpolationMode.BILINEAR)
        return TF.crop(out, pad, pad, h, w)


def flip_view(x: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror of a (..., H, W) batch (the test-time-augmentation view)."""
    return torch.flip(x, dims=[-1])


def denormalize(x: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """Undo `Normalize` for display: (..., 3, H, W) -> values in [0, 1]."""
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
