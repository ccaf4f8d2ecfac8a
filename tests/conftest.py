"""Shared fixtures: tiny generated image datasets and a CLI runner. No network, no shared data needed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"

# Distinct colour and shape per class, so even a tiny model separates them.
_STYLES = [((220, 40, 40), "ellipse"), ((40, 160, 60), "rectangle"), ((40, 70, 220), "triangle"), ((230, 200, 40), "cross")]


def draw_example(cls: int, i: int, *, size: int = 64, seed: int = 0) -> Image.Image:
    """One generated image of class `cls` (variant `i`): a coloured shape on a noisy background."""
    rng = np.random.default_rng([seed, cls, i])
    bg = (rng.integers(0, 60, (size, size, 3)) + 100).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    color, shape = _STYLES[cls % len(_STYLES)]
    m = int(size * 0.15) + int(rng.integers(0, size // 8))
    box = (m, m, size - m, size - m)
    if shape == "ellipse":
        d.ellipse(box, fill=color)
    elif shape == "rectangle":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=color)
    else:
        w = size // 8
        d.rectangle((size // 2 - w, m, size // 2 + w, size - m), fill=color)
        d.rectangle((m, size // 2 - w, size - m, size // 2 + w), fill=color)
    return im


def make_dataset(root: Path, *, classes: int = 3, per_class: int = 8, size: int = 64, fmt: str = "png", seed: int = 0) -> Path:
    """root/<class_k>/<i>.<fmt> images; returns root."""
    names = ["bear", "cat", "dog", "eel"]
    for c in range(classes):
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_example(c, i, size=size, seed=seed).save(d / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """3 classes x 8 generated 64 px PNGs under tmp_path/data."""
    return make_dataset(tmp_path / "data")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `ursa ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from ursa.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature caches of tests never land in the user's home; one per session keeps reruns fast."""
    if "URSA_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("URSA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ursa-cache"))
    monkeypatch.setenv("COLUMNS", "160")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and kept off the network (its background services would otherwise try to reach out).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright; skipped when absent, a failure when CI is set."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: apt-get install -y chromium (.ci/run does this).")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
