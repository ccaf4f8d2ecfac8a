"""verify_folder: repairs, shrinking, quarantine with a journal, duplicates, odd names, and never losing a file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.collect.manifest import Manifest
from ursa.config import VerifyConfig
from ursa.errors import VerifyError
from ursa.verify import journal_path, quarantine_dir, verify_folder


def test_good_images_are_left_alone(tmp_path: Path, encode, photo, write) -> None:  # noqa: ANN001
    a = write(tmp_path, "a/1.jpg", encode(photo(), "JPEG"))
    before = a.read_bytes()
    report = verify_folder(tmp_path)
    assert report.count("ok") == 1 and a.read_bytes() == before
    assert not journal_path(tmp_path).exists()


def test_exif_orientation_is_applied_and_the_original_kept(tmp_path: Path, encode, photo, write, journal, result_for) -> None:  # noqa: ANN001
    img = photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = write(tmp_path, "a/rot.jpg", encode(img, "JPEG", exif=exif.tobytes()))
    original = path.read_bytes()
    report = verify_folder(tmp_path)
    assert result_for(report, "a/rot.jpg").status == "repaired"
    with Image.open(path) as fixed:
        assert fixed.size == (20, 40)
        assert fixed.getexif().get(0x0112, 1) == 1
    entry = journal(tmp_path)[0]
    assert entry["op"] == "repair" and "EXIF" in entry["reason"] and entry["seq"] == 1 and entry["at"]
    assert (tmp_path / entry["original"]).read_bytes() == original
    assert verify_folder(tmp_path).count("repaired") == 0  # idempotent


@pytest.mark.parametrize(
    ("name", "change"),
    [("cmyk.jpg", "CMYK -> RGB"), ("pal.png", "P -> RGB"), ("alpha.png", "transparency -> RGB on white"), ("deep.png", "16-bit")],
)
def test_modes_are_converted(tmp_path: Path, name: str, change: str, encode, photo, write, result_for) -> None:  # noqa: ANN001
    image = {
        "cmyk.jpg": Image.new("CMYK", (20, 20), (0, 255, 255, 0)),
        "pal.png": photo().quantize(16),
        "alpha.png": Image.new("RGBA", (20, 20), (255, 0, 0, 0)),
        "deep.png": Image.fromarray(np.full((8, 8), 40000, np.uint16)),
    }[name]
    path = write(tmp_path, f"a/{name}", encode(image, "JPEG" if name.endswith(".jpg") else "PNG"))
    report = verify_folder(tmp_path)
    result = result_for(report, f"a/{name}")
    assert result.status == "repaired" and any(change in c for c in result.changes), result.changes
    with Image.open(path) as img:
        assert img.mode in ("RGB", "L")
        if name == "alpha.png":
            assert img.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
        if name == "deep.png":
            assert img.getpixel((0, 0)) == round(40000 * 255 / 65535)


def test_truncated_but_readable_is_repaired_unreadable_is_quarantined(tmp_path: Path, encode, photo, write, journal, result_for, bomb_png) -> None:  # noqa: ANN001
    full = encode(photo(200, 150), "JPEG", quality=95)
    write(tmp_path, "a/trunc.jpg", full[: len(full) * 2 // 3])
    write(tmp_path, "a/junk.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg")
    write(tmp_path, "a/page.jpg", b"<!doctype html><html>sign in</html>")
    write(tmp_path, "a/zero.jpg", b"")
    write(tmp_path, "a/bomb.png", bomb_png())
    report = verify_folder(tmp_path)
    assert result_for(report, "a/trunc.jpg").status == "repaired"
    with Image.open(tmp_path / "a/trunc.jpg") as img:
        img.load()  # decodes whole now
        assert img.size == (200, 150)
    quarantined = {r.file: r.changes[0] for r in report.results if r.status == "quarantined"}
    assert set(quarantined) == {"a/junk.jpg", "a/page.jpg", "a/zero.jpg", "a/bomb.png"}
    assert "decompression bomb" in quarantined["a/bomb.png"] and "empty" in quarantined["a/zero.jpg"]
    for rel in quarantined:  # moved, never deleted, each with a journal line
        assert not (tmp_path / rel).exists()
        assert (quarantine_dir(tmp_path) / rel).is_file()
    moves = [e for e in journal(tmp_path) if e["op"] == "quarantine"]
    assert sorted(e["file"] for e in moves) == sorted(quarantined)
    assert all((tmp_path / e["to"]).is_file() for e in moves)


def test_quarantine_never_overwrites(tmp_path: Path, encode, photo, write) -> None:  # noqa: ANN001
    write(tmp_path, "a/x.jpg", b"junk 1")
    verify_folder(tmp_path, config=VerifyConfig())
    write(tmp_path, "a/x.jpg", b"junk 2")
    write(tmp_path, "a/ok.png", encode(photo(), "PNG"))
    verify_folder(tmp_path)
    q = quarantine_dir(tmp_path) / "a"
    assert sorted(p.read_bytes() for p in q.iterdir()) == [b"junk 1", b"junk 2"]


def test_shrinks_over_max_size_keeping_aspect(tmp_path: Path, encode, photo, write) -> None:  # noqa: ANN001
    write(tmp_path, "a/big.png", encode(photo(1000, 500), "PNG"))
    write(tmp_path, "a/small.png", encode(photo(100, 50), "PNG"))
    report = verify_folder(tmp_path, config=VerifyConfig(max_size=200))
    assert report.shrunk == 1
    with Image.open(tmp_path / "a/big.png") as img:
        assert img.size == (200, 100)
    with pytest.raises(VerifyError, match="too small|at least 16"):
        verify_folder(tmp_path, config=VerifyConfig(max_size=3))


def test_odd_names_are_read_by_content(tmp_path: Path, encode, photo, write, result_for) -> None:  # noqa: ANN001
    write(tmp_path, "a/00000145.jpg;w=960", encode(photo(), "JPEG"))
    write(tmp_path, "a/noext", encode(photo(seed=1), "PNG"))
    write(tmp_path, "a/UPPER.JPG", encode(photo(seed=2), "JPEG"))
    anim = [Image.new("RGB", (10, 10), (80 * i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    anim[0].save(buf, "GIF", save_all=True, append_images=anim[1:])
    write(tmp_path, "a/anim.gif", buf.getvalue())
    write(tmp_path, "a/notes.txt", b"not an image, not checked")
    report = verify_folder(tmp_path)
    assert {r.file: r.status for r in report.results} == {
        "a/00000145.jpg;w=960": "ok", "a/noext": "ok", "a/UPPER.JPG": "ok", "a/anim.gif": "repaired",
    }  # fmt: skip
    gif = result_for(report, "a/anim.gif")
    assert gif.new_file == "a/anim.png" and not (tmp_path / "a/anim.gif").exists()
    assert (quarantine_dir(tmp_path) / "originals/a/anim.gif").is_file()
    assert any("first frame" in c for c in gif.changes)


def test_exact_duplicates_by_bytes_and_pixels_across_classes(tmp_path: Path, encode, photo, write) -> None:  # noqa: ANN001
    img = photo(seed=5)
    write(tmp_path, "teddy/1.png", encode(img, "PNG"))
    write(tmp_path, "grizzly/9.png", encode(img, "PNG"))  # same bytes, other class
    write(tmp_path, "teddy/2.bmp", encode(img, "BMP"))  # same pixels, other bytes
    write(tmp_path, "teddy/3.png", encode(photo(seed=6), "PNG"))
    write(tmp_path, "black/4.png", encode(photo(seed=7), "PNG"))
    write(tmp_path, "black/5.png", encode(photo(seed=7), "PNG"))
    report = verify_folder(tmp_path)
    groups = {tuple(g.files): g for g in report.duplicates}
    cross = groups[("grizzly/9.png", "teddy/1.png", "teddy/2.bmp")]
    assert cross.kind == "pixels" and cross.cross_class and cross.labels == ["grizzly", "teddy"]
    same = groups[("black/4.png", "black/5.png")]
    assert same.kind == "bytes" and not same.cross_class
    assert all((tmp_path / f).exists() for g in report.duplicates for f in g.files)  # reported, not moved
    table = report.by_label()
    assert (table["black"]["duplicates"], table["teddy"]["duplicates"], table["grizzly"]["duplicates"]) == (2, 2, 1)
    assert table["teddy"]["files"] == 3


def test_manifest_rows_follow_quarantine_and_repair(tmp_path: Path, encode, write) -> None:  # noqa: ANN001
    write(tmp_path, "a/00000001.jpg", b"<html>")
    write(tmp_path, "a/00000002.png", encode(Image.new("RGBA", (8, 8)), "PNG"))
    m = Manifest(tmp_path)
    m.put({"class": "a", "url": "http://x/1", "status": "ok", "file": "a/00000001.jpg"})
    m.put({"class": "a", "url": "http://x/2", "status": "ok", "file": "a/00000002.png", "sha256": "old"})
    m.save()
    verify_folder(tmp_path)
    rows = Manifest.load(tmp_path).rows
    assert rows[("a", "http://x/1")]["status"] == "quarantined"
    assert ".ursa/quarantine/a/00000001.jpg" in rows[("a", "http://x/1")]["reason"]
    two = rows[("a", "http://x/2")]
    assert two["status"] == "ok" and two["sha256"] not in ("", "old") and two["reason"].startswith("verify:")


def test_no_repair_only_reports(tmp_path: Path, encode, write, result_for) -> None:  # noqa: ANN001
    path = write(tmp_path, "a/cmyk.jpg", encode(Image.new("CMYK", (8, 8)), "JPEG"))
    before = path.read_bytes()
    report = verify_folder(tmp_path, config=VerifyConfig(repair=False))
    assert result_for(report, "a/cmyk.jpg").status == "ok" and path.read_bytes() == before


def test_bad_roots_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="does not exist"):
        verify_folder(tmp_path / "nope")
    with pytest.raises(VerifyError, match="No files"):
        verify_folder(tmp_path)
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(VerifyError, match="is a file"):
        verify_folder(tmp_path / "f.jpg")


def test_hidden_folders_are_not_checked(tmp_path: Path, encode, photo, write) -> None:  # noqa: ANN001
    write(tmp_path, ".ursa/quarantine/a/bad.jpg", b"junk")
    write(tmp_path, "a/.partial.jpg.tmp", b"junk")
    write(tmp_path, "a/1.png", encode(photo(), "PNG"))
    assert [r.file for r in verify_folder(tmp_path).results] == ["a/1.png"]


def test_names_with_brackets_are_printed_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], write) -> None:  # noqa: ANN001
    import sys

    from ursa.cli import main

    write(tmp_path, "a/bear[bold].jpg", b"not an image")
    monkeypatch.setattr(sys, "argv", ["ursa", "verify", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert "a/bear[bold].jpg" in capsys.readouterr().out
