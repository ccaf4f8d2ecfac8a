"""Small images as flat arrays, for the lessons: the embedded digits, or a class-folder dataset shrunk to grayscale.

The lessons import nothing from the rest of ursa; this is where their data comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ursa.errors import DataError

__all__ = ["ImageArrays", "image_arrays"]


class ImageArrays(NamedTuple):
    """x are float32 (n, pixels) in [0, 1], y int64 class indices into `classes`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    classes: list[str]
    image_shape: tuple[int, ...]  # (h, w) of one image before flattening
    description: str  # where the images came from, for a title


def image_arrays(data: Path | None, *, seed: int, size: int) -> ImageArrays:
    """The train and validation images of `data` (None: the embedded 8x8 digits) as flat arrays.

    With `data`: its images as `size` x `size` grayscale (size >= 2 px), split by `build_split` (seeded,
    stratified) exactly as training would. Without: the digits, split by the library's own `split_items`.
    """
    from ursa.config import DataConfig
    from ursa.data.items import Item
    from ursa.data.split import build_split, split_items

    if size < 2:
        raise DataError(f"size must be at least 2 pixels, got {size}. Try 16.")
    if data is None:
        from ursa.data.embedded import digits_arrays

        images, labels, names = digits_arrays()
        # The library's own split (seeded, stratified by class), over item names standing in for files.
        items = [Item(f"{i:04d}", names[int(y)]) for i, y in enumerate(labels)]
        train, valid = split_items(items, valid_pct=0.2, seed=seed)
        ti = np.array([int(it.name) for it in train])
        vi = np.array([int(it.name) for it in valid])
        flat = images.reshape(len(images), -1)
        return ImageArrays(flat[ti], labels[ti], flat[vi], labels[vi], names, images.shape[1:], "embedded digits (8x8)")
    if not data.is_dir():
        raise DataError(
            f"dataset folder {data} does not exist. Pass a folder with one sub-folder of images per class, "
            "or leave DATA out to use the embedded digits."
        )
    split = build_split(data, DataConfig(seed=seed))
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
        raise DataError(f"could not read an image under {data} ({exc}). Run `ursa verify {data}` first.") from exc
    desc = f"{data} ({size}x{size} grayscale)"
    return ImageArrays(xt, split.label_ids(split.train), xv, split.label_ids(split.valid), split.classes, (size, size), desc)
