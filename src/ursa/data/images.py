"""Decoding and the evaluation geometry in Pillow + numpy only, shared by training and serving.

Training (`ursa.data.transforms`) and the exported predictor (`ursa.export`) both call these, so a photo
gives the same input tensor in both, by construction, and serving needs neither torch nor torchvision.
The evaluation resize samples only the crop's region of the photo, in two halves that can run on two
cores at once (see `resize_center_crop`).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

__all__ = ["RESAMPLE", "draft_jpeg", "upright_rgb", "to_rgb", "eval_geometry", "resize_center_crop", "eval_input", "normalize_into"]

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
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

    torchvision's `Resize(short)` + `CenterCrop(size)` geometry (the long side becomes int(short * long /
    short_in), the crop offset round((n - S) / 2); a crop larger than the image is padded with zeros,
    centred), computed by resampling only the crop's region of the source (Pillow's `box`), in two
    halves of rows. Pillow takes the box in float32, so a few values in 100,000 differ by one level
    from resizing the whole image and cropping; training and serving both call this function, so they
    agree exactly. With `pool` (an executor with a free worker) the halves run at once (Pillow releases
    the GIL while resampling); the result is the same either way.
    """
    out = np.empty((size, size, 3), np.uint8)

    def keep(a: int, b: int, rows: np.ndarray) -> None:
        out[a:b] = rows

    _crop_rows(im, short, size, resample, pool, keep)
    return out


def eval_input(im: Image.Image, *, short: int, size: int, resample: Image.Resampling, mean: Any, std: Any, pool: Executor | None = None) -> np.ndarray:
    """`resize_center_crop` then `normalize_into`, each half of rows normalized where it was resized
    (on the pool's worker too): -> (3, S, S) float32, the evaluation input of training and serving."""
    x = np.empty((3, size, size), np.float32)

    def normalize(a: int, b: int, rows: np.ndarray) -> None:
        normalize_into(x[:, a:b], rows, mean, std)

    _crop_rows(im, short, size, resample, pool, normalize)
    return x


def _crop_rows(im: Image.Image, short: int, size: int, resample: Image.Resampling, pool: Executor | None,
               sink: Callable[[int, int, np.ndarray], None]) -> None:  # fmt: skip
    """Compute the crop of `resize_center_crop` and hand it to sink(first row, end row, (rows, S, 3) uint8)."""
    w, h = im.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    if nw < size or nh < size:  # crop_pct > 1: resize whole, pad like torchvision
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample=resample)
        canvas = Image.new("RGB", (max(nw, size), max(nh, size)))
        canvas.paste(im, ((max(nw, size) - nw) // 2, (max(nh, size) - nh) // 2))
        im, (nw, nh) = canvas, canvas.size
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        sink(0, size, np.asarray(im.crop((left, top, left + size, top + size))))
        return
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    sx, sy = w / nw, h / nh

    def rows(a: int, b: int) -> None:  # output rows [a, b) of the crop
        if b > a:
            box = (left * sx, (top + a) * sy, (left + size) * sx, (top + b) * sy)
            sink(a, b, np.asarray(im.resize((size, b - a), resample=resample, box=box)))

    _in_halves(rows, size, pool)


def _in_halves(fn: Callable[[int, int], None], n: int, pool: Executor | None) -> None:
    """fn(0, n/2) and fn(n/2, n): with a pool, the first on its worker while the second runs here."""
    m = n // 2
    if pool is None:
        fn(0, m)
        fn(m, n)
        return
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
