"""Decoding and the evaluation geometry in Pillow + numpy only, shared by training and serving.

Training (`ursa.data.transforms`) and the exported predictor (`ursa.export`) both call these, so a photo
gives the same input tensor in both, by construction, and serving needs neither torch nor torchvision.

The evaluation resize is Pillow's antialiased filter applied as two explicit single-axis passes,
horizontal then vertical, rounding to uint8 in between: what `Image.resize` does for almost every
photo (recent Pillow releases may run the vertical pass first for some shapes, which moves a few pixel
values by a little; doing the passes ourselves keeps the result one thing for every Pillow version).
Done this way, only the rows the crop needs go through the first pass and only the crop's columns
through the second, and each pass splits into halves that can run on two cores at once.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

__all__ = ["RESAMPLE", "draft_jpeg", "upright_rgb", "to_rgb", "eval_geometry", "resize_center_crop", "normalize_into"]

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
# Pillow's filter support in source pixels at scale 1 (libImaging/Resample.c); nearest reads one pixel.
_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0, Image.Resampling.NEAREST: 0.5}
# Where Pillow's `getexif` looks for an orientation: EXIF blocks, TIFF tags and XMP packets.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def draft_jpeg(im: Image.Image, min_side: int | None) -> None:
    """Let the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding when the image is at least twice
    `min_side` (px, short side); never below `min_side`. No-op for other formats or before the size is known."""
    if min_side is None or im.format != "JPEG":
        return
    w, h = im.size
    scale = min(w, h) / min_side
    if scale >= 2:
        im.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))


def upright_rgb(im: Image.Image) -> Image.Image:
    """Decode `im` (opened, not yet loaded) and return it upright per its EXIF orientation, as RGB with
    transparency composited on white. Transposes in place: no copy of the pixels unless the mode changes."""
    im.load()
    if hasattr(im, "tag_v2") or any(k in im.info for k in _ORIENTATION_SOURCES):  # else no orientation to read (skips ~0.3 ms)
        ImageOps.exif_transpose(im, in_place=True)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` itself when it is RGB, else an RGB copy with transparency composited on white."""
    im.load()
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def eval_geometry(data_config: dict[str, Any], *, size: int | None = None) -> tuple[int, int, Image.Resampling]:
    """(crop side S, resized short side floor(S / crop_pct), Pillow filter) from a timm data config."""
    size = int(size or data_config["input_size"][-1])
    short = int(math.floor(size / float(data_config.get("crop_pct", 0.875))))
    return size, short, RESAMPLE.get(str(data_config.get("interpolation", "bicubic")), Image.Resampling.BICUBIC)


def resize_center_crop(im: Image.Image, *, short: int, size: int, resample: Image.Resampling, pool: Executor | None = None) -> np.ndarray:
    """Resize an RGB image so its short side is `short` px, center-crop `size` x `size`: -> (S, S, 3) uint8.

    torchvision's `Resize(short)` + `CenterCrop(size)` geometry: the long side becomes int(short * long /
    short_in), the crop offset is round((n - S) / 2), and a crop larger than the image is padded with
    zeros, centred. With `pool` (an executor with a free worker) each pass runs as two halves at once
    (Pillow releases the GIL while resampling).
    """
    w, h = im.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    if nw < size or nh < size:  # crop_pct > 1: resize whole, pad like torchvision
        im = _two_pass(im, nw, nh, resample)
        canvas = Image.new("RGB", (max(nw, size), max(nh, size)))
        canvas.paste(im, ((max(nw, size) - nw) // 2, (max(nh, size) - nh) // 2))
        im, (nw, nh) = canvas, canvas.size
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        return np.asarray(im.crop((left, top, left + size, top + size)))
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    mid = _horizontal_pass(im, nw, nh, top, size, resample, pool)
    out = np.empty((size, size, 3), np.uint8)

    def columns(c0: int, c1: int) -> None:  # second pass for crop columns [c0, c1)
        strip = mid.crop((left + c0, 0, left + c1, h))
        if nh != h:
            strip = strip.resize((c1 - c0, nh), resample=resample)
        out[:, c0:c1] = np.asarray(strip)[top : top + size]

    _in_halves(columns, size, pool)
    return out


def _two_pass(im: Image.Image, nw: int, nh: int, resample: Image.Resampling) -> Image.Image:
    w, h = im.size
    if nw != w:
        im = im.resize((nw, h), resample=resample)
    if nh != h:
        im = im.resize((nw, nh), resample=resample)
    return im


def _horizontal_pass(im: Image.Image, nw: int, nh: int, top: int, size: int, resample: Image.Resampling, pool: Executor | None) -> Image.Image:
    """First pass (width w -> nw) of the rows the second pass reads for its output rows [top, top + size).

    The result keeps the full height h, so the second pass sees the same coordinates as for the whole
    image; the rows it does not read stay black.
    """
    w, h = im.size
    if nw == w:
        return im
    scale = h / nh
    support = _SUPPORT[resample] * max(scale, 1.0)
    # Pillow's window for output row y is [int(c - support + 0.5), int(c + support + 0.5)) with
    # c = (y + 0.5) * scale; two rows of margin on each side cover float rounding.
    r0 = max(0, int((top + 0.5) * scale - support + 0.5) - 2)
    r1 = min(h, int((top + size - 0.5) * scale + support + 0.5) + 2)
    mid = Image.new("RGB", (nw, h))

    def rows(a: int, b: int) -> None:
        mid.paste(im.crop((0, r0 + a, w, r0 + b)).resize((nw, b - a), resample=resample), (0, r0 + a))

    _in_halves(rows, r1 - r0, pool)
    return mid


def _in_halves(fn: Callable[[int, int], None], n: int, pool: Executor | None) -> None:
    """fn(0, n); or, with a pool, fn(0, n/2) on its worker and fn(n/2, n) here at the same time."""
    if pool is None or n < 32:
        fn(0, n)
        return
    m = n // 2
    first = pool.submit(fn, 0, m)
    fn(m, n)
    if first.cancel():  # the worker is busy with another caller's half: do this one here rather than wait
        fn(0, m)
    else:
        first.result()


def normalize_into(x: np.ndarray, a: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """x (3, H, W) float32 <- (a (H, W, 3) uint8 / 255 - mean) / std, per channel.

    The same float32 operations, in the same order, as torchvision's ToDtype(scale=True) + Normalize
    (multiply by 1/255, subtract, divide).
    Returns x.
    """
    x[...] = a.transpose(2, 0, 1)
    x *= np.float32(1.0 / 255.0)
    for c in range(3):
        x[c] -= np.float32(mean[c])
        x[c] /= np.float32(std[c])
    return x
