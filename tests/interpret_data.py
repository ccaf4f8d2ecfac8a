"""A tiny generated dataset with planted problems, and one training run on it, shared by the issue-4 tests.

Three classes, each a coloured shape drawn at a random place, size and angle on a varied background (so
images of one class differ as much as photos do, and only planted copies are near duplicates). Planted:
flipped labels, an exact copy under another label, a re-encoded copy, and dark / blurry / tiny images.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle")
_COLORS = {"circle": (220, 40, 40), "square": (40, 170, 60), "triangle": (40, 70, 230)}


def draw(cls: str, i: int, *, size: int = 64, seed: int = 0) -> Image.Image:
    """One image of class `cls`, variant `i`."""
    rng = np.random.default_rng([seed, CLASSES.index(cls), i])
    base = rng.integers(90, 170) + rng.integers(-20, 20, 3)  # greyish, tinted
    grad = np.linspace(0, 1, size)[None, :, None] * rng.integers(-60, 60, 3)
    noise = rng.integers(-6, 6, (size, size, 3))
    im = Image.fromarray(np.clip(base + grad + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):  # distractor strokes in random colours
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.integers(0, 255, 3)), width=int(rng.integers(1, 4)))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    color = _COLORS[cls]
    if cls == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif cls == "square":
        d.regular_polygon((cx, cy, r), 4, rotation=float(rng.uniform(0, 90)), fill=color)
    else:
        d.regular_polygon((cx, cy, r), 3, rotation=float(rng.uniform(0, 120)), fill=color)
    return im


@dataclass
class Planted:
    root: Path
    flipped: dict[str, str] = field(default_factory=dict)  # name -> true class
    exact_copy: tuple[str, str] = ("", "")  # (original, copy under another label)
    near_copy: tuple[str, str] = ("", "")  # (original, re-encoded copy, same label)
    dark: str = ""
    blurry: str = ""
    tiny: str = ""


def make_planted(root: Path, *, per_class: int = 24, seed: int = 0) -> Planted:
    """root/<class>/<i>.png plus the planted problems; returns what was planted where."""
    p = Planted(root)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(cls, i, seed=seed).save(root / cls / f"{i:03d}.png")
    # flipped labels: a picture of one class filed under another
    for k, (true, wrong) in enumerate([("circle", "square"), ("square", "circle"), ("triangle", "circle")]):
        name = f"{wrong}/f{k}.png"
        draw(true, 100 + k, seed=seed).save(root / name)
        p.flipped[name] = true
    # the same picture under two labels (exact copy)
    shutil.copyfile(root / "square/005.png", root / "circle/copy_of_square005.png")
    p.exact_copy = ("square/005.png", "circle/copy_of_square005.png")
    # a re-encoded copy with the same label (near duplicate)
    Image.open(root / "triangle/007.png").convert("RGB").save(root / "triangle/near007.jpg", quality=95)
    p.near_copy = ("triangle/007.png", "triangle/near007.jpg")
    # quality problems
    dark = np.asarray(draw("circle", 200, seed=seed), np.float32) * 0.06
    Image.fromarray(dark.astype(np.uint8)).save(root / "circle/dark.png")
    p.dark = "circle/dark.png"
    draw("square", 201, seed=seed).filter(ImageFilter.GaussianBlur(8)).save(root / "square/blurry.png")
    p.blurry = "square/blurry.png"
    draw("triangle", 202, size=20, seed=seed).save(root / "triangle/tiny.png")
    p.tiny = "triangle/tiny.png"
    return p


_CACHE: dict[str, tuple[Planted, Path]] = {}


def planted_run(base: Path) -> tuple[Planted, Path]:
    """The planted dataset under `base` and a run trained on it (made once per test session)."""
    if "run" not in _CACHE:
        from ursa.config import DataConfig, TrainConfig
        from ursa.train.recipe import train_run

        planted = make_planted(base / "planted")
        res = train_run(planted.root, base / "runs" / "planted", data=DataConfig(seed=0), train=TrainConfig(size=64, epochs=3, views=2), progress=False)
        _CACHE["run"] = (planted, res.out)
    return _CACHE["run"]


def make_review_case(base: Path) -> tuple[Path, Path]:
    """A small dataset and a run folder holding only config.json and a hand-written issues.csv (no training):
    two label issues, a duplicate pair and a dark image. Returns (root, run)."""
    import csv
    import json

    root = base / "data"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            draw(cls, i).save(root / cls / f"{i:03d}.png")
    shutil.copyfile(root / "circle/000.png", root / "circle/copy.png")
    run = base / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"root": str(root), "classes": list(CLASSES)}))
    rows = [
        ["label", "square/001.png", "square", "train", "circle", "0.97", "0.02", "", "model says circle"],
        ["label", "triangle/002.png", "triangle", "valid", "square", "0.88", "0.05", "", "model says square"],
        ["duplicate", "circle/000.png", "circle", "train", "", "", "1.0", "g1", "exact copies"],
        ["duplicate", "circle/copy.png", "circle", "train", "", "", "1.0", "g1", "exact copies"],
        ["dark", "square/003.png", "square", "train", "", "", "0.05", "", "mean brightness 0.05"],
    ]
    with open(run / "issues.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "name", "label", "split", "suggested", "confidence", "score", "group", "detail"])
        w.writerows(rows)
    return root, run


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` outside `.ursa/` (the dataset as a user sees it)."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and ".ursa" not in p.relative_to(root).parts}
