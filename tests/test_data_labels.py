"""Labels CSVs and listings stay inside the dataset root, keep a train/valid dataset's sides, and skip
symlinks that would list images twice (issue 12, items 2, 3 and 10)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ursa.config import DataConfig
from ursa.data import items as items_mod
from ursa.data.items import read_labels_csv, scan_class_folders
from ursa.data.split import build_split, load_split, save_split
from ursa.errors import DataError

from conftest import draw_example, make_dataset

FAST = ["--size", "64", "--head", "one_cycle", "--epochs", "2"]


def _write_csv(path: Path, rows: list[str], header: str = "name,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _train_val(root: Path, *, valid: str = "val") -> Path:
    """root/train/{bear,cat} x 6 and root/<valid>/{bear,cat} x 3."""
    make_dataset(root / "train", classes=2, per_class=6)
    make_dataset(root / valid, classes=2, per_class=3, seed=1)
    return root


def _rows(root: Path) -> list[str]:
    return sorted(f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in root.rglob("*.png"))


# ---- item 2: names that leave the dataset root ---------------------------------------------------
@pytest.fixture
def flat(tmp_path: Path) -> Path:
    root = make_dataset(tmp_path / "ds" / "data", classes=2, per_class=4)
    (tmp_path / "outside").mkdir()
    draw_example(0, 9).save(tmp_path / "outside" / "secret.jpg")
    return root


def _escape_rows(root: Path) -> dict[str, str]:
    outside = root.parent.parent / "outside"
    (root / "bear" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return {
        "dotdot": "../../outside/secret.jpg",
        "passwd": "../../../../etc/passwd",
        "backslash": "..\\..\\outside\\secret.jpg",
        "inner_dotdot": "bear/../../../outside/secret.jpg",
        "absolute": str(outside / "secret.jpg"),
        "file_symlink": "bear/link.jpg",
        "dir_symlink": "linked/secret.jpg",
    }


@pytest.mark.parametrize("kind", ["dotdot", "passwd", "backslash", "inner_dotdot", "absolute", "file_symlink", "dir_symlink"])
def test_a_name_that_leaves_the_root_is_refused_before_anything_is_opened(flat: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _escape_rows(flat)[kind]
    opened: list[Path] = []
    monkeypatch.setattr(items_mod, "check_image", lambda p: opened.append(p))
    csv = _write_csv(flat / "labels.csv", [*(_rows(flat)), f'"{bad}",bear'])
    with pytest.raises(DataError, match=r"outside the dataset root.*row \d+: .*remove those rows, or copy the files into the dataset") as exc:
        build_split(flat, DataConfig(labels=str(csv)))
    assert f"row {len(_rows(flat)) + 2}" in str(exc.value)  # the header is row 1
    assert opened == []  # refused before a single file was read


def test_cli_train_refuses_an_escaping_name_and_writes_no_run_folder(run_cli, flat: Path, tmp_path: Path) -> None:
    _write_csv(flat / "labels.csv", [*_rows(flat), "../../outside/secret.jpg,black"])
    code, _, err = run_cli("train", flat, "--labels", flat / "labels.csv", "--allow-new-labels", "--out", tmp_path / "runs" / "r", *FAST)
    assert code == 2 and "../../outside/secret.jpg" in err and "row 10" in err
    assert not (tmp_path / "runs").exists()


def test_names_inside_the_root_still_read(flat: Path) -> None:
    rows = [f"{flat / 'bear' / '000.png'},bear", "./bear/001.png,bear", "bear\\002.png,bear", *[f"cat/{i:03d}.png,cat" for i in range(4)]]
    found = read_labels_csv(flat, _write_csv(flat / "labels.csv", rows))
    assert sorted(it.name for it in found.items)[:3] == ["bear/000.png", "bear/001.png", "bear/002.png"]


def test_an_edited_split_json_cannot_point_outside_the_root(flat: Path, tmp_path: Path) -> None:
    path = save_split(build_split(flat), tmp_path / "split.json")
    data = json.loads(path.read_text())
    data["valid"].append(["../../../../etc/passwd", "bear"])
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="outside the dataset root.*etc/passwd.*train again"):
        load_split(path)


# ---- item 3: a train/ val/ dataset retrained from a labels CSV -------------------------------------
@pytest.mark.parametrize("folders", [None, ("train", "val")])
def test_hand_written_csv_on_train_val_dataset_keeps_the_sides(tmp_path: Path, folders: tuple[str, str] | None) -> None:
    root = _train_val(tmp_path / "tv")
    csv = _write_csv(root / "labels.csv", _rows(root))
    cfg = DataConfig(labels=str(csv), train=folders[0] if folders else None, valid=folders[1] if folders else None)
    sp = build_split(root, cfg)
    assert sp.classes == ["bear", "cat"] and sp.how == "csv"
    assert {it.name for it in sp.valid} == {r.split(",")[0] for r in _rows(root) if r.startswith("val/")}
    assert all(it.name.startswith("train/") for it in sp.train) and len(sp.train) == 12


def test_cli_retrains_a_train_val_dataset_from_its_csv(run_cli, tmp_path: Path) -> None:
    root = _train_val(tmp_path / "tv")
    _write_csv(root / "labels.csv", _rows(root))
    for extra in ([], ["--train", "train", "--valid", "val"]):
        out = tmp_path / "runs" / f"r{len(extra)}"
        code, _, err = run_cli("train", root, "--labels", root / "labels.csv", *extra, "--out", out, *FAST)
        assert code == 0, err
        m = json.loads((out / "metrics.json").read_text())
        assert m["classes"] == ["bear", "cat"] and (m["n_train"], m["n_valid"]) == (12, 6)


def test_cleaned_csv_of_review_apply_retrains_a_train_val_dataset(tmp_path: Path) -> None:
    from ursa.review import Review

    root = _train_val(tmp_path / "tv", valid="valid")
    rv = Review(root)
    rv.decide("train/bear/000.png", "relabel", label="cat")
    rv.decide("valid/cat/001.png", "delete")
    rv.apply()
    assert (root / "cleaned.csv").read_text().splitlines()[:2] == ["name,label", "train/bear/000.png,cat"]
    sp = build_split(root, DataConfig(labels="cleaned.csv"))
    labels = {it.name: it.label for it in [*sp.train, *sp.valid]}
    assert labels["train/bear/000.png"] == "cat" and "valid/cat/001.png" not in labels
    assert {it.name for it in sp.valid} == {n for n in labels if n.startswith("valid/")} and len(sp.valid) == 5
    assert sp.classes == ["bear", "cat"]


def test_allow_new_labels_keeps_the_val_split(tmp_path: Path) -> None:
    root = _train_val(tmp_path / "tv")
    rows = [r.replace(",bear", ",panda") if r.startswith(("train/bear/000", "train/bear/001", "val/bear/000")) else r for r in _rows(root)]
    csv = _write_csv(root / "labels.csv", rows)
    with pytest.raises(DataError, match=r"panda.*classes: \['bear', 'cat'\].*--allow-new-labels"):
        build_split(root, DataConfig(labels=str(csv)))
    for seed in (1, 2):
        sp = build_split(root, DataConfig(labels=str(csv), allow_new_labels=True, seed=seed))
        assert sp.classes == ["bear", "cat", "panda"]
        assert {it.name for it in sp.valid} == {r.split(",")[0] for r in rows if r.startswith("val/")}  # not re-drawn


@pytest.mark.parametrize("column,valid_value,train_value", [("split", "valid", "train"), ("split", "VAL", "training"), ("is_valid", "True", "False"), ("is_valid", "1", "0")])
def test_split_or_is_valid_column_says_the_side(tmp_path: Path, column: str, valid_value: str, train_value: str) -> None:
    root = make_dataset(tmp_path / "flat", classes=2, per_class=5)
    chosen = {"bear/004.png", "cat/000.png", "cat/003.png"}
    rows = [f"{r},{valid_value if r.split(',')[0] in chosen else train_value}" for r in _rows(root)]
    sp = build_split(root, DataConfig(labels=str(_write_csv(root / "l.csv", rows, header=f"name,label,{column}"))))
    assert {it.name for it in sp.valid} == chosen and len(sp.train) == 7 and sp.valid_pct == 0.0


def test_column_beats_folders_and_bad_sides_are_named(tmp_path: Path) -> None:
    root = _train_val(tmp_path / "tv")
    rows = [f"{r},{'valid' if r.startswith('train/cat/005') else 'train'}" for r in _rows(root)]
    sp = build_split(root, DataConfig(labels=str(_write_csv(root / "l.csv", rows, header="name,label,split"))))
    assert [it.name for it in sp.valid] == ["train/cat/005.png"]
    with pytest.raises(DataError, match=r"row 2: .*split 'test'; use train or valid"):
        build_split(root, DataConfig(labels=str(_write_csv(root / "l.csv", [_rows(root)[0] + ",test"], header="name,label,split"))))
    with pytest.raises(DataError, match="both a `split` and an `is_valid` column"):
        build_split(root, DataConfig(labels=str(_write_csv(root / "l.csv", [_rows(root)[0] + ",train,0"], header="name,label,split,is_valid"))))
    (root / "extra").mkdir()
    draw_example(0, 7).save(root / "extra" / "x.png")
    with pytest.raises(DataError, match=r"'extra/x.png' is in neither train/ nor val/.*split column"):
        build_split(root, DataConfig(labels=str(_write_csv(root / "l.csv", [*_rows(root)[:4], "extra/x.png,bear"]))))


def test_a_class_with_only_validation_rows_is_refused(tmp_path: Path) -> None:
    root = _train_val(tmp_path / "tv")
    rows = [r for r in _rows(root) if not r.startswith("train/cat/")]
    with pytest.raises(DataError, match=r"validation rows but no training rows: \['cat'\]"):
        build_split(root, DataConfig(labels=str(_write_csv(root / "l.csv", rows))))


# ---- item 10: symlinks in the listing ---------------------------------------------------------------
def test_symlinks_are_not_followed_and_are_reported(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=4)
    outside = tmp_path / "outside"
    outside.mkdir()
    draw_example(0, 9).save(outside / "o.png")
    (root / "again").symlink_to(root, target_is_directory=True)  # the dataset root: every image again
    (root / "bear" / "loop").symlink_to(root / "bear", target_is_directory=True)  # a folder already listed
    (root / "bear" / "gone.png").symlink_to(root / "nothing.png")  # dangling
    (root / "bear" / "self.png").symlink_to(root / "bear" / "self.png")  # a loop
    (root / "cat" / "far.png").symlink_to(outside / "o.png")  # a file outside the root
    (root / "cat" / "near.png").symlink_to(root / "cat" / "000.png")  # inside: an ordinary (duplicate) image
    found = scan_class_folders(root)
    assert found.labels == ["bear", "cat"] and len(found.items) == 9
    reasons = {s.name: s.reason for s in found.skipped}
    assert set(reasons) == {"again", "bear/loop", "bear/gone.png", "bear/self.png", "cat/far.png"}
    assert "inside the dataset" in reasons["again"] and "not listed twice" in reasons["bear/loop"]
    assert "dangling" in reasons["bear/gone.png"] and "loop" in reasons["bear/self.png"] and "outside the dataset root" in reasons["cat/far.png"]
    sp = build_split(root)
    assert sp.classes == ["bear", "cat"] and len(sp.train) + len(sp.valid) == 9


def test_train_with_a_symlink_to_the_root_skips_it_and_lists_it(run_cli, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes=2, per_class=5)
    (root / "again").symlink_to(root, target_is_directory=True)
    os.symlink("missing.png", root / "bear" / "gone.png")
    out = tmp_path / "runs" / "r"
    code, stdout, err = run_cli("train", root, "--out", out, *FAST)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["classes"] == ["bear", "cat"]
    skipped = (out / "skipped.csv").read_text()
    assert "again," in skipped and "bear/gone.png" in skipped and "2 skipped" in stdout


def test_a_copied_dataset_inside_itself_fails_clearly_before_any_run_folder(run_cli, tmp_path: Path) -> None:
    """A real copy of every image under another class leaves nothing to validate on: say so, write nothing."""
    import shutil

    root = make_dataset(tmp_path / "data", classes=2, per_class=4)
    shutil.copytree(root, tmp_path / "copy")
    shutil.move(tmp_path / "copy", root / "again")
    code, _, err = run_cli("train", root, "--out", tmp_path / "runs" / "r", *FAST)
    assert code == 2 and "could go to validation" in err and "byte-identical copy" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_after_the_checks_leaves_no_run_folder(run_cli, tmp_path: Path) -> None:
    """Validation images whose headers read but whose pixels do not: training stops, and no folder is left."""
    root = _train_val(tmp_path / "tv", valid="valid")
    for p in (root / "valid").rglob("*.png"):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])  # header intact, pixels cut off
    out = tmp_path / "runs" / "r"
    code, _, err = run_cli("train", root, "--out", out, *FAST)
    assert code == 2 and "no validation image could be decoded" in err and "valid/bear/000.png" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    from ursa.train.recipe import _publish_run

    def half(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _publish_run(tmp_path / "runs" / "r", half)
    assert list((tmp_path / "runs").iterdir()) == []  # neither r nor its staging folder
    (tmp_path / "runs" / "r").mkdir()  # an empty folder is taken; a full one is never touched
    assert _publish_run(tmp_path / "runs" / "r", lambda f: (f / "a").write_text("1")) == tmp_path / "runs" / "r"
    assert _publish_run(tmp_path / "runs" / "r", lambda f: (f / "a").write_text("2")) == tmp_path / "runs" / "r-2"
    assert (tmp_path / "runs" / "r" / "a").read_text() == "1" and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r", "r-2"]


def test_output_folders_with_the_marker_are_not_classes(tmp_path: Path) -> None:
    """runs/ and models/ beside the class folders (the studio's layout) hold an OUTPUT_MARKER file: never classes."""
    root = make_dataset(tmp_path / "data", classes=2, per_class=2)
    for name in ("runs", "models"):
        (root / name / "run").mkdir(parents=True)
        draw_example(0, 9).save(root / name / "run" / "plot.png")
    assert items_mod.folder_classes(root) == ["bear", "cat", "models", "runs"]  # without markers: classes
    for name in ("runs", "models"):
        (root / name / items_mod.OUTPUT_MARKER).write_text("outputs\n")
    assert items_mod.folder_classes(root) == ["bear", "cat"]
    found = scan_class_folders(root)
    assert found.labels == ["bear", "cat"] and not any(it.name.startswith(("runs/", "models/")) for it in found.items)
    (root / "bear" / "deeper").mkdir()
    (root / "bear" / "deeper" / items_mod.OUTPUT_MARKER).write_text("")  # only a top-level folder's marker counts
    draw_example(0, 10).save(root / "bear" / "deeper" / "x.png")
    assert "bear/deeper/x.png" in {it.name for it in scan_class_folders(root).items}
