"""The embedded default dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans).

It ships inside an installed package, so `ursa demo` and the lessons run on any machine with no network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ursa._io import atomic_write_bytes

__all__ = ["digits_arrays", "write_digits", "DIGIT_NAMES"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images float32 (1797, 8, 8) in [0, 1], labels int64 (1797,), class names)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64), list(DIGIT_NAMES)


def write_digits(root: str | Path, *, size: int = 32, per_class: int | None = None) -> Path:
    """Write the digits as `root/<name>/<index>.png` (white ink on black, `size` px); returns `root`.

    Files already present are left alone, so a second call is instant and never overwrites anything.
    `per_class` keeps the first N images of each class (a smaller, faster demo).
    """
    root = Path(root)
    images, labels, names = digits_arrays()
    seen = {k: 0 for k in range(10)}
    for i, (img, y) in enumerate(zip(images, labels)):
        if per_class is not None and seen[int(y)] >= per_class:
            continue
        seen[int(y)] += 1
        path = root / names[int(y)] / f"{i:04d}.png"
        if path.exists():
            continue
        pil = Image.fromarray((img * 255).astype(np.uint8), mode="L").resize((size, size), Image.Resampling.BICUBIC)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        pil.convert("RGB").save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
    return root
