"""One pixel limit for every stage (issue 12, item 12): a 12000x12000 PNG is refused by download, quarantined
by verify, skipped by training's decode and refused by serving, each with a reason, and Pillow's raw
DecompressionBombWarning is never printed."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from ursa.config import MAX_PIXELS, CollectConfig, VerifyConfig
from ursa import imageio as images
from ursa.errors import ImageTooLargeError


def big_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A valid 1-bit grey PNG of width x height white-and-black pixels: ~18 MB of rows that compress to ~20 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "cats" / "big.png"
    path.parent.mkdir()
    path.write_bytes(big_png())
    return path


@pytest.fixture
def no_bomb_warning() -> Iterator[None]:
    """Fail if Pillow's DecompressionBombWarning is raised anywhere in the test (it would be printed raw)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)], [str(w.message) for w in seen]


def test_the_file_is_what_it_claims(big: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(big) as im:
            assert im.size == (12_000, 12_000) and MAX_PIXELS < 144_000_000 < 2 * Image.MAX_IMAGE_PIXELS  # Pillow alone only warns


def test_every_stage_has_the_same_limit() -> None:
    from ursa import export
    from ursa.imageio import sniff_image

    assert images.MAX_PIXELS == MAX_PIXELS == export.MAX_PIXELS == CollectConfig().max_pixels == VerifyConfig().max_pixels
    assert sniff_image.__kwdefaults__["max_pixels"] == MAX_PIXELS
    assert images.decode_image.__kwdefaults__["max_pixels"] == MAX_PIXELS


def test_download_refuses_it(big: Path, no_bomb_warning: None) -> None:
    from ursa.imageio import sniff_image

    with pytest.raises(ImageTooLargeError, match="12000x12000 = 144.0 megapixels, over the limit of 40 megapixels"):
        sniff_image(big.read_bytes())


def test_verify_quarantines_it(big: Path, tmp_path: Path, no_bomb_warning: None) -> None:
    from ursa.verify import verify_folder

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats/big.png").write_bytes(big.read_bytes())
    report = verify_folder(tmp_path)
    assert [(r.file, r.status) for r in report.results] == [("cats/big.png", "quarantined")]
    assert "144.0 megapixels, over the limit of 40 megapixels" in report.results[0].changes[0]


def test_training_skips_it_with_the_reason(big: Path, no_bomb_warning: None) -> None:
    """Regression: training decoded it (255 MB) while verify quarantined it and serve refused it."""
    from ursa.data.items import Item
    from ursa.data.loaders import ImageDataset
    from ursa.data.transforms import open_image

    with pytest.raises(ImageTooLargeError, match=r"big.png is 12000x12000 = 144.0 megapixels, over the limit of 40 megapixels.*Shrink it"):
        open_image(big)
    ds = ImageDataset(big.parent.parent, [Item("cats/big.png", "cats")], ["cats"], lambda im: im, size=32)
    assert ds[0] is None and "over the limit of 40 megapixels" in ds.failed["cats/big.png"]


def test_serving_refuses_it(big: Path, no_bomb_warning: None) -> None:
    from ursa.imageio import decode_image

    with pytest.raises(ImageTooLargeError, match="144.0 megapixels, over the limit of 40"):
        decode_image(big.read_bytes())


def test_open_checked_turns_pillows_bomb_error_into_the_same_refusal(tmp_path: Path, no_bomb_warning: None) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(big_png(20_000, 20_000))  # over twice Pillow's own limit: Pillow raises, not warns
    with pytest.raises(ImageTooLargeError, match="too large to decode safely.*40 megapixels"):
        images.open_checked(huge)
    with images.open_checked(big_png(100, 100), name="small.png") as im:
        assert im.size == (100, 100)
    with pytest.raises(ImageTooLargeError, match="small.png is 100x100"):
        images.open_checked(big_png(100, 100), name="small.png", max_pixels=9_999)


def test_the_cli_prints_no_raw_warning(big: Path, tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats/big.png").write_bytes(big.read_bytes())
    cli = subprocess.run([sys.executable, "-c", "from ursa.cli import main; main()", "verify", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "DecompressionBombWarning" not in cli.stdout + cli.stderr and "quarantined: cats/big.png" in cli.stdout
