"""ursa.collect.local: image bytes from this machine (uploads, webcam frames, pastes) into a class folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ursa.collect.local import Added, add_images, stored_name
from ursa.errors import CollectError


def test_stores_under_content_names_and_dedups(tmp_path: Path, make_jpeg, make_png) -> None:  # noqa: ANN001
    jpg, png = make_jpeg(1), make_png(2)
    rows = add_images(tmp_path, "cats", [("../../evil.jpg", jpg), ("IMG_1.PNG", png), ("again.jpg", jpg)], source="webcam")
    assert [r.status for r in rows] == ["ok", "ok", "duplicate"]
    name = f"webcam-{hashlib.sha256(jpg).hexdigest()[:12]}.jpg"
    assert rows[0] == Added("../../evil.jpg", "ok", "", f"cats/{name}")  # the client's name is never a path
    assert rows[1].file.endswith(".png") and rows[1].file.startswith("cats/webcam-")  # the extension comes from the bytes
    assert rows[2].reason == f"same picture as cats/{name}" and rows[2].file == f"cats/{name}"
    assert sorted(p.name for p in (tmp_path / "cats").iterdir()) == sorted([name, rows[1].file.split("/")[1]])
    assert (tmp_path / "cats" / name).read_bytes() == jpg
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()
    assert stored_name(jpg, ".jpg", source="webcam") == name


def test_same_picture_already_in_the_folder_under_another_name(tmp_path: Path, make_jpeg) -> None:  # noqa: ANN001
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "00000001.jpg").write_bytes(make_jpeg(3))  # the downloader's numbered file
    rows = add_images(tmp_path, "cats", [("x.jpg", make_jpeg(3))], source="paste")
    assert rows[0].status == "duplicate" and rows[0].file == "cats/00000001.jpg"
    assert len(list((tmp_path / "cats").iterdir())) == 1


def test_a_hand_edited_file_with_our_name_is_never_overwritten(tmp_path: Path, make_jpeg) -> None:  # noqa: ANN001
    data = make_jpeg(4)
    taken = tmp_path / "cats" / stored_name(data, ".jpg")
    taken.parent.mkdir()
    taken.write_bytes(b"my notes")  # not an image, and not these bytes
    rows = add_images(tmp_path, "cats", [("a.jpg", data)])
    assert rows[0].status == "ok" and rows[0].file != f"cats/{taken.name}"
    assert taken.read_bytes() == b"my notes" and (tmp_path / rows[0].file).read_bytes() == data


def test_refusals_are_rows_with_reasons(tmp_path: Path, make_jpeg, bomb_png, encode, photo) -> None:  # noqa: ANN001
    good = make_jpeg(5)
    whole = encode(photo(200, 150), "JPEG")  # its header parses when cut; its pixels do not decode
    rows = add_images(
        tmp_path, "cats",
        [("empty.jpg", b""), ("page.jpg", b"<!doctype html><html></html>"), ("bomb.png", bomb_png()), ("cut.jpg", whole[: len(whole) * 2 // 3]),
         ("big.jpg", whole + b"\0" * 100), ("ok.jpg", good)],
        max_bytes=max(len(good), len(whole)) + 50,
    )  # fmt: skip
    by = {r.given: r for r in rows}
    assert [r.status for r in rows] == ["refused"] * 5 + ["ok"]
    assert "0 bytes" in by["empty.jpg"].reason and "server" not in by["empty.jpg"].reason
    assert "HTML" in by["page.jpg"].reason
    assert "decompression bomb" in by["bomb.png"].reason
    assert "truncated" in by["cut.jpg"].reason.lower() and "header" not in by["cut.jpg"].reason
    assert "over the limit" in by["big.jpg"].reason
    assert [p.name for p in (tmp_path / "cats").iterdir()] == [by["ok.jpg"].file.split("/")[1]]
    assert by["ok.jpg"].as_dict() == {"given": "ok.jpg", "status": "ok", "reason": "", "file": by["ok.jpg"].file}


@pytest.mark.parametrize("cls", ["", ".", "..", ".hidden", "a/b", "a\\b", "nul\0"])
def test_bad_class_names_are_refused(tmp_path: Path, cls: str, make_jpeg) -> None:  # noqa: ANN001
    with pytest.raises(CollectError, match="not a class folder name"):
        add_images(tmp_path, cls, [("a.jpg", make_jpeg(1))])


def test_bad_source_and_a_file_in_the_way_are_refused(tmp_path: Path, make_jpeg) -> None:  # noqa: ANN001
    with pytest.raises(CollectError, match="source 'scanner' is not one of upload, webcam, paste"):
        add_images(tmp_path, "cats", [("a.jpg", make_jpeg(1))], source="scanner")
    (tmp_path / "dogs").write_text("a file, not a folder")
    with pytest.raises(CollectError, match="is not a folder"):
        add_images(tmp_path, "dogs", [("a.jpg", make_jpeg(1))])


def test_an_unwritable_folder_is_an_error(tmp_path: Path, make_jpeg, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from ursa.collect import local

    def refuse(path, data, **kw):  # noqa: ANN001, ANN003, ANN202 - what a read-only folder does (root ignores chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(local, "atomic_write_bytes", refuse)
    with pytest.raises(CollectError, match="cannot write .*Permission denied. Check that .* is a folder you can write to"):
        add_images(tmp_path, "cats", [("a.jpg", make_jpeg(1))])
