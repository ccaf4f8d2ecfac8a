"""The studio's project folder (ursa.web.studio.project.Project): classes, images, journal, undo, paths, runs."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from conftest import draw_example, make_dataset
from PIL import Image

from ursa._io import dataset_lock
from ursa.data.items import OUTPUT_MARKER, folder_classes
from ursa.errors import StudioError
from ursa.review import Review
from ursa.web.studio.project import Conflict, Forbidden, NotFound, Project


def _png(i: int, cls: int = 0) -> bytes:
    buf = io.BytesIO()
    draw_example(cls, i).save(buf, "PNG")
    return buf.getvalue()


def _csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["name"]: r["label"] for r in csv.DictReader(fh)}


def _ops(root: Path) -> list[str]:
    return [ln["op"] for ln in Review(root).lines()]


def test_a_new_project_is_made_with_marked_output_folders(tmp_path: Path) -> None:
    p = Project(tmp_path / "proj")
    for name in ("runs", "models"):
        assert (p.root / name / OUTPUT_MARKER).is_file()
    assert p.summary() == {"root": str(p.root), "classes": [], "removed": [], "runs": [], "latest_run": None, "cleaned_csv": False,
                           "warnings": ["add at least 2 classes with 2 or more images each, then train"]}  # fmt: skip
    assert Project(p.root).root == p.root  # opening it again changes nothing
    assert folder_classes(p.root) == []


def test_projects_the_studio_refuses(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        Project(tmp_path / "missing", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StudioError, match="is a file, not a folder"):
        Project(tmp_path / "file")
    split = tmp_path / "split"
    for side in ("train", "valid"):
        make_dataset(split / side, classes=2, per_class=1)
    with pytest.raises(StudioError, match="train/ and valid/ folders.*Use the CLI for this dataset, or one folder per class"):
        Project(split)
    clash = make_dataset(tmp_path / "clash", classes=2, per_class=1)
    (clash / "runs").mkdir()
    draw_example(0, 1).save(clash / "runs" / "a.png")  # a class named runs: not silently hidden
    with pytest.raises(StudioError, match="holds images .* Rename that class folder"):
        Project(clash)


@pytest.mark.parametrize("name", ["grizzly", "teddy bear", "Ours brun", "熊", "a" * 64, "run", "model", "x.y"])
def test_good_class_names(tmp_path: Path, name: str) -> None:
    assert Project(tmp_path).check_class_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "needs a name"), ("a" * 65, "the limit is 64"), ("a/b", "slash"), ("a\\b", "backslash"), ("a\0b", "control"), ("tab\there", "control"),
    ("new\nline", "control"), (" pad", "starts or ends with a space"), (".hidden", "starts with '.'"), ("..", "starts with '.'"),
    ("runs", "keeps its runs"), ("Models", "keeps its models"), ("train", "split folder"), ("VALID", "split folder"), ("val", "split folder"),
    ("__pycache__", "ignores"), (None, "needs a name"),
])  # fmt: skip
def test_bad_class_names_are_refused(tmp_path: Path, name: object, why: str) -> None:
    p = Project(tmp_path)
    with pytest.raises(StudioError, match=why):
        p.check_class_name(name)  # type: ignore[arg-type]
    with pytest.raises(StudioError):
        p.add_class(name)  # type: ignore[arg-type]


def test_add_class_and_its_conflicts(tmp_path: Path) -> None:
    p = Project(tmp_path)
    assert p.add_class("cats") == {"name": "cats", "count": 0, "warnings": ["only 0 images (10 or more recommended)"], "thumbs": []}
    assert (tmp_path / "cats").is_dir() and _ops(tmp_path) == ["add_class"]
    with pytest.raises(Conflict, match="already exists"):
        p.add_class("cats")
    with pytest.raises(Conflict, match="already exists"):
        p.add_class("CATS")  # one folder on a case-insensitive disk
    (tmp_path / "notes").write_text("a file")
    with pytest.raises(Conflict):
        p.add_class("notes")


def test_classes_counts_thumbs_and_warnings(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "p", classes=3, per_class=2)
    for i in range(2, 12):
        draw_example(0, i).save(root / "bear" / f"{i:03d}.png")
        os.utime(root / "bear" / f"{i:03d}.png", ns=(2 * 10**18 + i, 2 * 10**18 + i))  # newest last (in 2033)
    (root / "cat" / "copy.png").write_bytes((root / "bear" / "000.png").read_bytes())  # an exact duplicate, across classes
    (root / "cat" / "notes.txt").write_text("not an image, left alone")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    q = root / ".ursa" / "quarantine" / "dog" / "bad.png"
    q.parent.mkdir(parents=True)
    q.write_bytes(b"bad")
    Review(root).log.append("quarantine", file="dog/bad.png", to=".ursa/quarantine/dog/bad.png", reason="truncated")  # as verify writes it
    p = Project(root)
    got = {c["name"]: c for c in p.classes()}
    assert {n: c["count"] for n, c in got.items()} == {"bear": 12, "cat": 3, "dog": 2}
    assert got["bear"]["warnings"] == [] and got["bear"]["thumbs"] == [f"bear/{i:03d}.png" for i in range(11, 3, -1)]
    assert got["cat"]["warnings"] == ["only 3 images (10 or more recommended)", "1 exact duplicates"]
    assert got["dog"]["warnings"] == ["only 2 images (10 or more recommended)", "6x fewer images than bear (2 vs 12)", "1 unreadable files in quarantine"]
    s = p.summary()
    assert any("not usable images" in w and "dog/broken.png" in w for w in s["warnings"])
    assert not any("add at least 2 classes" in w for w in s["warnings"])
    draw_example(1, 50).save(root / "cat" / "new.png")  # the listing notices a new file (the folder's mtime changed)
    assert {c["name"]: c["count"] for c in p.classes()}["cat"] == 4


def test_rename_class_moves_the_folder_and_cleaned_csv_rows(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "p", classes=2, per_class=2)
    (root / "cleaned.csv").write_text("name,label\nbear/000.png,bear\nbear/001.png,cat\ncat/000.png,cat\ncat/001.png,cat\n")
    p = Project(root)
    info = p.rename_class("bear", "grizzly")
    assert info["name"] == "grizzly" and info["count"] == 2 and not (root / "bear").exists()
    assert _csv(root / "cleaned.csv") == {"grizzly/000.png": "grizzly", "grizzly/001.png": "cat", "cat/000.png": "cat", "cat/001.png": "cat"}
    assert _ops(root) == ["rename_class", "cleaned"]
    with pytest.raises(NotFound, match="there is no class 'bear'. Classes: cat, grizzly"):
        p.rename_class("bear", "x")
    with pytest.raises(Conflict, match="already exists"):
        p.rename_class("grizzly", "cat")
    with pytest.raises(StudioError, match="split folder"):
        p.rename_class("grizzly", "train")
    with pytest.raises(Conflict, match="already has that name"):
        p.rename_class("cat", "cat")
    Review(root).decide("cat/000.png", "delete")
    with pytest.raises(Conflict, match="pending review decisions .* Apply or undo them first"):
        p.rename_class("cat", "kitten")
    assert (root / "cat").is_dir() and _ops(root) == ["rename_class", "cleaned", "decide"]


def test_remove_and_restore_a_class(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "p", classes=3, per_class=2)
    (root / "cleaned.csv").write_text("name,label\nbear/000.png,bear\nbear/001.png,bear\ncat/000.png,bear\ncat/001.png,cat\ndog/000.png,dog\n")
    p = Project(root)
    out = p.remove_class("bear")
    assert out["removed"] == "bear" and out["count"] == 2 and out["to"].startswith(".ursa/quarantine/classes/")
    assert not (root / "bear").exists() and sorted(f.name for f in (root / out["to"]).iterdir()) == ["000.png", "001.png"]
    assert _csv(root / "cleaned.csv") == {"cat/001.png": "cat", "dog/000.png": "dog"}
    s = p.summary()
    assert [c["name"] for c in s["classes"]] == ["cat", "dog"] and [r["name"] for r in s["removed"]] == ["bear"]
    assert p.image_path(f"{out['to']}/000.png").is_file()  # its images can still be shown
    info = p.restore_class("bear")
    assert info["count"] == 2 and (root / "bear" / "000.png").is_file() and p.summary()["removed"] == []
    assert _csv(root / "cleaned.csv") == {"bear/000.png": "bear", "bear/001.png": "bear", "cat/000.png": "bear", "cat/001.png": "cat", "dog/000.png": "dog"}
    assert _ops(root) == ["remove_class", "cleaned", "restore_class", "cleaned"]
    with pytest.raises(NotFound, match="no removed class 'bear'"):
        p.restore_class("bear")
    p.remove_class("cat")
    p.add_class("cat")
    with pytest.raises(Conflict, match="exists again"):
        p.restore_class("cat")
    with pytest.raises(NotFound):
        p.remove_class("nope")
    Review(root).decide("dog/000.png", "keep")
    with pytest.raises(Conflict, match="pending review decisions"):
        p.remove_class("dog")
    assert (root / "dog").is_dir()


def test_class_changes_wait_for_a_download_or_verify(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "p", classes=2, per_class=1)
    p = Project(root)
    with dataset_lock(root, "download", error=StudioError):
        with pytest.raises(Conflict, match="Another download is writing into"):
            p.rename_class("bear", "grizzly")
        with pytest.raises(Conflict):
            p.remove_class("bear")
    p.rename_class("bear", "grizzly")


def test_add_images_checks_the_class_and_keeps_cleaned_csv_in_step(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "p", classes=2, per_class=1)
    p = Project(root)
    rows = p.add_images("bear", [("a.png", _png(5)), ("b.txt", b"hello"), ("c.png", _png(5))], source="webcam")
    assert [r.status for r in rows] == ["ok", "refused", "duplicate"] and rows[0].file.startswith("bear/webcam-")
    assert not (root / "cleaned.csv").exists()
    (root / "cleaned.csv").write_text("name,label\nbear/000.png,bear\n")
    rows = p.add_images("bear", [("d.png", _png(6))])
    assert _csv(root / "cleaned.csv") == {"bear/000.png": "bear", rows[0].file: "bear"}
    with pytest.raises(NotFound, match="there is no class 'eel'"):
        p.add_images("eel", [("a.png", _png(1))])
    with pytest.raises(StudioError, match="slash"):
        p.add_images("../bear", [("a.png", _png(1))])
    with pytest.raises(StudioError, match="source 'scanner'"):
        p.add_images("bear", [("a.png", _png(1))], source="scanner")
    # the csv was written by hand above, without the first upload and cat/000.png: training would leave them out
    assert any(w.startswith("2 images in the class folders are not in cleaned.csv") for w in p.summary()["warnings"])
    draw_example(1, 7).save(root / "cat" / "by-hand.png")  # added outside the studio
    assert any(w.startswith("3 images in the class folders are not in cleaned.csv") for w in p.summary()["warnings"])


def test_image_path_stays_in_the_classes_and_the_quarantine(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "p", classes=2, per_class=1)
    p = Project(root)
    assert p.image_path("bear/000.png") == root.resolve() / "bear" / "000.png"
    q = root / ".ursa" / "quarantine" / "bear" / "x.png"
    q.parent.mkdir(parents=True)
    q.write_bytes(_png(1))
    assert p.image_path(".ursa/quarantine/bear/x.png").is_file()
    for bad in ("", "../p/bear/000.png", "bear/../../etc/passwd", "/etc/passwd", "bear//000.png", "bear/./000.png", "bear\\000.png", "a\0b", "x" * 2000):
        with pytest.raises(StudioError, match="is not a path|has an empty"):
            p.image_path(bad)
    (root / "runs" / "r").mkdir()
    (root / "runs" / "r" / "a.png").write_bytes(_png(1))
    for other in (".ursa/journal.jsonl", "runs/r/a.png", "cleaned.csv", "bear", "bear/notes.txt", ".ursa/cache/x.png", "bear/.hidden.png"):
        with pytest.raises(Forbidden):
            p.image_path(other)
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(2))
    (root / "bear" / "link.png").symlink_to(outside)
    with pytest.raises(Forbidden, match="outside the project"):
        p.image_path("bear/link.png")
    with pytest.raises(NotFound):
        p.image_path("bear/none.png")


def test_thumbnails_are_small_jpegs_cached_by_mtime(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "bear").mkdir(parents=True)
    draw_example(0, 1, size=400).save(root / "bear" / "big.png")
    p = Project(root)
    data = p.thumbnail("bear/big.png")
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and max(im.size) == 160
    assert p.thumbnail("bear/big.png") is data  # from memory
    assert max(Image.open(io.BytesIO(p.thumbnail("bear/big.png", 64))).size) == 64
    draw_example(1, 2, size=300).save(root / "bear" / "big.png")
    os.utime(root / "bear" / "big.png", ns=(10**18, 10**18))
    assert p.thumbnail("bear/big.png") is not data  # a changed file is drawn again
    for side in (0, 15, 513, True, "160"):
        with pytest.raises(StudioError, match="from 16 to 512"):
            p.thumbnail("bear/big.png", side)  # type: ignore[arg-type]
    (root / "bear" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(StudioError, match="cannot be shown"):
        p.thumbnail("bear/broken.jpg")


def test_runs_latest_run_and_export_dir(tmp_path: Path) -> None:
    p = Project(tmp_path / "p")
    with pytest.raises(NotFound, match="no trained model yet"):
        p.run_dir()
    for i, name in enumerate(("run", "run-2")):
        d = p.root / "runs" / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"error_rate": 0.1 * i, "accuracy": 1 - 0.1 * i}))
        os.utime(d / "metrics.json", ns=(10**18 + i, 10**18 + i))
    (p.root / "runs" / "half").mkdir()  # no metrics.json: not a finished run
    (p.root / "models" / "run").mkdir()
    (p.root / "models" / "run" / "model.json").write_text("{}")
    s = p.summary()
    assert [(r["name"], r["exported"]) for r in s["runs"]] == [("run", True), ("run-2", False)] and s["latest_run"] == "run-2"
    assert s["runs"][1]["error_rate"] == pytest.approx(0.1)
    assert p.run_dir() == p.root / "runs" / "run-2" and p.run_dir("run") == p.root / "runs" / "run"
    with pytest.raises(NotFound, match="no finished run 'half'. Runs: run, run-2"):
        p.run_dir("half")
    for bad in ("../p", ".hidden", "a/b", ""):
        with pytest.raises(StudioError, match="is not a run name"):
            p.run_dir(bad)
        with pytest.raises(StudioError):
            p.export_dir(bad)
    assert p.export_dir("run-2") == p.root / "models" / "run-2"
