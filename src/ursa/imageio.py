"""Image input/output in Pillow + numpy only (no torch): sniffing, decoding, EXIF, the pixel limit, the
suffix lists, and the evaluation geometry, shared by download, verify, training and serving.

Training (`ursa.data.transforms`) and the exported predictor (`ursa.export`) both call these, so a photo
gives the same input tensor in both, by construction, and serving needs neither torch nor torchvision.
Decode errors are `ursa.errors.BadImageError` and its subclasses, in every stage.
The evaluation resize samples only the crop's region of the photo, in two halves that can run on two
cores at once (see `resize_center_crop`).

The pixel limit: `MAX_PIXELS` (width x height) is the one limit of every stage. Download refuses larger
images, verify quarantines them, training skips them (`open_checked`, a row with the reason) and serving
answers 413, each reading the size from the header before decoding and saying so in its own words
(`too_many_pixels`). Pillow's own decompression-bomb warning is never printed: the size is checked
against this limit first, and Pillow's error (over twice its own limit) becomes the same refusal.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from concurrent.futures import Executor
from typing import IO, Any, Callable

import numpy as np
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ursa.config import MAX_PIXELS
from ursa.errors import BadImageError, DataError, ImageTooLargeError, NotAnImageError

__all__ = ["MAX_PIXELS", "IMAGE_SUFFIXES", "NON_IMAGE_SUFFIXES", "EXTENSIONS", "too_many_pixels", "sniff_image", "open_checked", "decode_image", "RESAMPLE", "CROP_MODES", "draft_jpeg", "upright_rgb", "to_rgb", "eval_geometry", "eval_min_side", "eval_crop_mode", "resize_center_crop", "eval_input", "normalize_into"]

# timm's evaluation crop modes (`transforms_imagenet_eval`): "center" resizes the short side to S / crop_pct
# and crops S x S; "squash" resizes both sides to S / crop_pct (aspect not kept) and crops; "border" resizes
# the long side to S / crop_pct and pads the short one with the mean colour up to S, then crops.
CROP_MODES = ("center", "squash", "border")
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
# Formats a download keeps, by what Pillow calls them, and the extension their files get.
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
              "TIFF": ".tif", "AVIF": ".avif"}  # fmt: skip
# Suffixes of the image files a folder given on the command line is expanded to (a file named directly is
# always tried, whatever its name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# The one list of files in a dataset that are not images and are left alone without a word: the CSVs,
# notes and logs people and tools keep beside their photos.
NON_IMAGE_SUFFIXES = frozenset({".csv", ".txt", ".json", ".jsonl", ".md", ".ini", ".log", ".db", ".yaml", ".yml"})
# Where Pillow's `getexif` looks for an orientation: EXIF blocks, TIFF tags and XMP packets.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def too_many_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS) -> str | None:
    """None when a `width` x `height` image is within `max_pixels`, else what is wrong, for a message:
    '12000x12000 = 144.0 megapixels, over the limit of 40 megapixels (a guard against decompression bombs)'."""
    if width * height <= max_pixels:
        return None
    return (f"{width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} megapixels "
            "(a guard against decompression bombs)")  # fmt: skip


def sniff_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(extension, width, height) of an image given its bytes; reads only the header, never decodes pixels.

    Raises NotAnImageError (ImageTooLargeError for decompression bombs) with a reason for empty bodies, HTML or other text, unknown formats, and headers
    claiming more than `max_pixels` pixels (decompression bombs; the limit every stage shares by default).
    """
    if not data:
        raise NotAnImageError("empty: the server sent 0 bytes")
    head = data[:64]
    known = (
        head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))
    )
    if not known:
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script", b"<meta")):
            raise NotAnImageError("not an image: an HTML page")
        if text.startswith((b"<?xml", b"<svg")):
            raise NotAnImageError("not an image: XML or SVG (vector drawings are not supported)")
        if text.startswith((b"{", b"[")):
            raise NotAnImageError("not an image: JSON")
        raise NotAnImageError(f"not an image: unknown format starting {head[:8]!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format or "", img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"decompression bomb: the header claims over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise NotAnImageError(f"not an image: unreadable header ({exc})") from exc
    if w * h > max_pixels:
        raise ImageTooLargeError(f"decompression bomb: {too_many_pixels(w, h, max_pixels)}")
    ext = EXTENSIONS.get(fmt)
    if ext is None:
        raise NotAnImageError(f"not an image: unsupported format {fmt}")
    return ext, w, h


def open_checked(src: str | os.PathLike[str] | bytes | IO[bytes], *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """`Image.open(src)` (a path, bytes or a binary file; not decoded yet) when its header's width x height
    is within `max_pixels`, else ImageTooLargeError naming the file, its size and the fix. Pillow's
    DecompressionBombWarning is not printed and its DecompressionBombError (over twice Pillow's own
    limit) becomes the same ImageTooLargeError; other errors (not an image, unreadable) propagate as Pillow raises them."""
    label = name or ("the image" if isinstance(src, (bytes, bytearray, memoryview)) or hasattr(src, "read") else str(src))
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, against our limit
            im = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label} is too large to decode safely ({exc}); the limit is {max_pixels / 1e6:g} megapixels. "
                        "Shrink it below that, or move it out of the dataset.") from None  # fmt: skip
    problem = too_many_pixels(*im.size, max_pixels)
    if problem is not None:
        im.close()
        raise ImageTooLargeError(f"{label} is {problem}. Shrink it below that, or move it out of the dataset.")
    return im


def decode_image(src: Any, *, min_side: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `src` (a path, the bytes of an image file, or a PIL image) as an upright RGB PIL image.

    Same rules as training's `open_image`: EXIF orientation applied, transparency composited on white,
    and JPEGs at least twice as large as `min_side` (px, short side) decoded at 1/2, 1/4 or 1/8 scale
    by the JPEG decoder itself (draft mode). An image over `max_pixels` (width x height, read from the
    header before decoding) raises ImageTooLargeError; anything Pillow cannot decode raises BadImageError.
    """
    if isinstance(src, Image.Image):
        return to_rgb(src)
    is_bytes = isinstance(src, (bytes, bytearray, memoryview))
    name = "the upload" if is_bytes else str(src)
    try:
        # Decoding from memory leaves no file handle open, so the decoded image itself can be returned
        # (no copy: a fresh 0.5 MB buffer costs ~1 ms of page faults).
        data = bytes(src) if is_bytes else Path(src).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below, with our limit
            im = Image.open(io.BytesIO(data))
    except FileNotFoundError:
        raise BadImageError(f"{name} does not exist. Check the path.") from None
    except IsADirectoryError:
        raise BadImageError(f"{name} is a folder, not an image file.") from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name} is not an image Pillow can read. Send a JPEG, PNG, WebP, GIF or BMP file.") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name} is too large to decode safely ({exc}). Send a smaller image.") from None
    except PermissionError:
        raise BadImageError(f"cannot read {name}: permission denied.") from None
    except OSError as exc:
        raise BadImageError(f"{name} is a damaged or truncated image ({exc}).") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:.0f}. Send a smaller image.")
    try:
        draft_jpeg(im, min_side)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return upright_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name} is too large to decode safely ({exc}). Send a smaller image.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what Pillow raises on broken or truncated data
        raise BadImageError(f"{name} is a damaged or truncated image ({type(exc).__name__}: {exc}).") from None


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


def eval_min_side(data_config: dict[str, Any], *, size: int | None = None) -> int:
    """The short side (px) a JPEG may be draft-decoded down to for evaluation: the resize's short side, so a
    drafted photo is never enlarged again (decoding a 640x480 photo at 320x240 and resizing it to 256 px
    blurs edges by up to ~50 levels; see `draft_jpeg`). Augmented training views use the input side."""
    return eval_geometry(data_config, size=size)[1]


def eval_crop_mode(data_config: dict[str, Any]) -> str:
    """The data config's timm `crop_mode` ("center" when absent); DataError for one Ursa does not know."""
    mode = data_config.get("crop_mode") or "center"
    if mode not in CROP_MODES:
        raise DataError(f"the model's data config asks for crop_mode {mode!r}, which Ursa does not implement (it knows {', '.join(CROP_MODES)}). Set 'crop_mode' to one of those in the model's pretrained config.")
    return str(mode)


def resize_center_crop(
    im: Image.Image, *, short: int, size: int, resample: Image.Resampling, pool: Executor | None = None, crop_mode: str = "center", fill: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """Resize an RGB image so its short side is `short` px, center-crop `size` x `size`: -> (S, S, 3) uint8.

    `crop_mode` "squash" resizes both sides to `short` instead; "border" resizes the long side to `short`
    and pads with `fill` where the image is smaller than the crop (timm's `ResizeKeepRatio(longest=1)` +
    `CenterCropOrPad`); the other modes pad with 0, like torchvision's `CenterCrop`.

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

    _crop_rows(im, short, size, resample, pool, keep, crop_mode, fill)
    return out


def eval_input(
    im: Image.Image, *, short: int, size: int, resample: Image.Resampling, mean: Any, std: Any, pool: Executor | None = None, crop_mode: str = "center"
) -> np.ndarray:
    """`resize_center_crop` then `normalize_into`, each half of rows normalized where it was resized
    (on the pool's worker too): -> (3, S, S) float32, the evaluation input of training and serving.
    In "border" mode the padding is the mean colour rounded to a level, as in timm (about 0 after normalizing)."""
    x = np.empty((3, size, size), np.float32)

    def normalize(a: int, b: int, rows: np.ndarray) -> None:
        normalize_into(x[:, a:b], rows, mean, std)

    fill = (round(255 * float(mean[0])), round(255 * float(mean[1])), round(255 * float(mean[2])))
    _crop_rows(im, short, size, resample, pool, normalize, crop_mode, fill)
    return x


def _crop_rows(im: Image.Image, short: int, size: int, resample: Image.Resampling, pool: Executor | None,
               sink: Callable[[int, int, np.ndarray], None], crop_mode: str = "center", fill: tuple[int, int, int] = (0, 0, 0)) -> None:  # fmt: skip
    """Compute the crop of `resize_center_crop` and hand it to sink(first row, end row, (rows, S, 3) uint8)."""
    w, h = im.size
    if crop_mode == "squash":
        nw, nh = short, short
    elif crop_mode == "border":  # timm's ResizeKeepRatio(longest=1.0): the long side becomes `short`
        ratio = max(w / short, h / short)
        nw, nh = max(1, round(w / ratio)), max(1, round(h / ratio))  # max: a sliver of an image keeps one pixel
    elif crop_mode != "center":
        raise DataError(f"unknown crop_mode {crop_mode!r}; use one of {', '.join(CROP_MODES)}.")
    elif w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    if nw < size or nh < size:  # the resized image is smaller than the crop: resize whole, pad like torchvision / timm
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample=resample)
        canvas = Image.new("RGB", (max(nw, size), max(nh, size)), fill if crop_mode == "border" else (0, 0, 0))  # CenterCrop pads with 0
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
