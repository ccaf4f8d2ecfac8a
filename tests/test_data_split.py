"""Split invariants (hypothesis properties), dataset reading, labels CSVs and their error paths."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ursa.config import DataConfig
from ursa.data.items import Item, read_labels_csv, scan_class_folders
from ursa.data.split import build_split, load_split, save_split, split_items
from ursa.errors import DataError

from conftest import SHARED_DATA, draw_example, make_dataset

labels_st = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=4, max_size=80)


def _items(labels: list[str]) -> list[Item]:
    return [Item(f"{lab}/{i:04d}.jpg", lab) for i, lab in enumerate(labels)]


def _ok(labels: list[str]) -> bool:
    return all(labels.count(x) >= 2 for x in set(labels))


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, pct=st.floats(0.05, 0.95), seed=st.integers(0, 2**31 - 1), shuffle_seed=st.integers(0, 1000))
def test_split_is_deterministic_disjoint_stratified_and_order_independent(labels: list[str], pct: float, seed: int, shuffle_seed: int) -> None:
    if not _ok(labels):
        return
    items = _items(labels)
    tr, va = split_items(items, valid_pct=pct, seed=seed)
    shuffled = items[:]
    random.Random(shuffle_seed).shuffle(shuffled)
    assert (tr, va) == split_items(shuffled, valid_pct=pct, seed=seed)  # order-independent, deterministic
    assert not set(tr) & set(va)  # disjoint
    assert sorted(tr + va) == sorted(items)  # complete
    for lab in set(labels):  # stratified: each class has its rounded share, both sides non-empty
        n = labels.count(lab)
        nv = sum(1 for it in va if it.label == lab)
        assert nv == min(max(1, round(n * pct)), n - 1)
        assert n - nv >= 1


@settings(max_examples=30, deadline=None)
@given(labels=labels_st, seed=st.integers(0, 1000))
def test_duplicate_groups_stay_on_one_side(labels: list[str], seed: int) -> None:
    if not _ok(labels):
        return
    items = _items(labels)
    groups = {it.name: f"g{i // 3}" for i, it in enumerate(items)}  # groups of up to 3, some across labels
    tr, va = split_items(items, valid_pct=0.3, seed=seed, groups=groups)
    side = {}
    for it in tr:
        side.setdefault(groups[it.name], set()).add("t")
    for it in va:
        side.setdefault(groups[it.name], set()).add("v")
    assert all(len(s) == 1 for s in side.values())
    for g in side:
        if len({it.label for it in items if groups[it.name] == g}) > 1:
            assert side[g] == {"t"}  # a picture under two labels stays in training


def test_adding_a_class_does_not_reshuffle_the_others() -> None:
    base = _items(["a"] * 20 + ["b"] * 20)
    more = base + _items(["c"] * 20)
    va1 = {it for it in split_items(base, seed=3)[1] if it.label in "ab"}
    va2 = {it for it in split_items(more, seed=3)[1] if it.label in "ab"}
    assert va1 == va2


@pytest.mark.parametrize("pct", [0.0, 1.0, -0.1, 1.5])
def test_valid_pct_out_of_range(pct: float, tiny_dataset: Path) -> None:
    with pytest.raises(DataError, match="valid-pct"):
        build_split(tiny_dataset, DataConfig(valid_pct=pct))


def test_class_with_one_image(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", classes=2, per_class=4)
    (root / "solo").mkdir()
    draw_example(2, 0).save(root / "solo" / "x.png")
    with pytest.raises(DataError, match="'solo' has 1 image"):
        build_split(root)


def test_empty_and_single_class_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_split(tmp_path / "empty")
    one = make_dataset(tmp_path / "one", classes=1, per_class=4)
    with pytest.raises(DataError, match="single class"):
        build_split(one)
    with pytest.raises(DataError, match="does not exist"):
        build_split(tmp_path / "nope")


def test_non_images_become_skipped_rows(tiny_dataset: Path) -> None:
    (tiny_dataset / "bear" / "notes.txt").write_text("hello")  # quietly ignored
    (tiny_dataset / "bear" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tiny_dataset / "cat" / "page.jpg").write_text("<html>404</html>")
    (tiny_dataset / ".ursa").mkdir()
    draw_example(0, 0).save(tiny_dataset / ".ursa" / "hidden.png")
    draw_example(0, 1).save(tiny_dataset / "bear" / "noext", format="PNG")  # no extension, still an image
    found = scan_class_folders(tiny_dataset)
    assert {s.name for s in found.skipped} == {"bear/broken.jpg", "cat/page.jpg"}
    assert "bear/noext" in {it.name for it in found.items}
    assert not any(".ursa" in it.name for it in found.items)


def test_train_valid_folders_detected(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d" / "train", per_class=4)
    make_dataset(tmp_path / "d" / "valid", per_class=2, seed=1)
    sp = build_split(tmp_path / "d")
    assert sp.how == "folders" and len(sp.train) == 12 and len(sp.valid) == 6
    assert all(it.name.startswith("train/") for it in sp.train)
    make_dataset(tmp_path / "e" / "training", per_class=3)
    make_dataset(tmp_path / "e" / "val", classes=4, per_class=1)
    with pytest.raises(DataError, match="no training folder"):
        build_split(tmp_path / "e", DataConfig(train="training", valid="val"))


def test_labels_csv_with_windows_paths_and_errors(tiny_dataset: Path) -> None:
    csv = tiny_dataset / "cleaned.csv"
    rows = ["name,label"] + [f"bear\\{i:03d}.png,bear" for i in range(8)] + [f"./cat/{i:03d}.png,cat" for i in range(8)]
    csv.write_text("\n".join(rows) + "\n")
    sp = build_split(tiny_dataset, DataConfig(labels="cleaned.csv"))
    assert sp.how == "csv" and sp.classes == ["bear", "cat"] and len(sp.train) + len(sp.valid) == 16
    csv.write_text("name,label\nbear/000.png,bear\nbear/missing.png,bear\ncat/000.png,cat\n")
    with pytest.raises(DataError, match="1 files that do not exist.*bear/missing.png"):
        build_split(tiny_dataset, DataConfig(labels=str(csv)))
    csv.write_text("name,label\nbear/000.png,bear\nbear/001.png,panda\ncat/000.png,cat\n")
    with pytest.raises(DataError, match="panda.*--allow-new-labels"):
        build_split(tiny_dataset, DataConfig(labels=str(csv)))
    csv.write_text("file,class\nbear/000.png,bear\n")
    with pytest.raises(DataError, match="needs `name` and `label`"):
        read_labels_csv(tiny_dataset, csv)
    with pytest.raises(DataError, match="does not exist"):
        read_labels_csv(tiny_dataset, tiny_dataset / "absent.csv")


def test_split_json_round_trip(tiny_dataset: Path, tmp_path: Path) -> None:
    sp = build_split(tiny_dataset, DataConfig(seed=7))
    p = save_split(sp, tmp_path / "split.json")
    back = load_split(p)
    assert back.train == sp.train and back.valid == sp.valid and back.classes == sp.classes
    assert json.loads(p.read_text())["seed"] == 7
    assert build_split(tiny_dataset, DataConfig(seed=7)).valid == sp.valid


def test_a_relative_dataset_path_is_recorded_absolute(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ursa train data/bears` then `ursa export` from another folder: the run must still find the dataset."""
    monkeypatch.chdir(tiny_dataset.parent)
    sp = build_split(tiny_dataset.name, DataConfig(seed=7))
    p = save_split(sp, tmp_path / "split.json")
    monkeypatch.chdir(tmp_path)
    back = load_split(p)
    assert back.root.is_absolute() and back.root == tiny_dataset.resolve() and back.root.is_dir()


def test_byte_identical_files_stay_together(tiny_dataset: Path) -> None:
    for i in range(4):
        shutil.copy(tiny_dataset / "bear" / "000.png", tiny_dataset / "bear" / f"dup{i}.png")
    for seed in range(5):
        sp = build_split(tiny_dataset, DataConfig(seed=seed))
        dups = {"bear/000.png", *(f"bear/dup{i}.png" for i in range(4))}
        sides = {n in {it.name for it in sp.valid} for n in dups}
        assert len(sides) == 1


@pytest.mark.skipif(not (SHARED_DATA / "monkey10").is_dir(), reason="../shared/data is absent")
def test_real_dataset_reads_with_its_odd_names() -> None:
    sp = build_split(SHARED_DATA / "monkey10", DataConfig(train="training", valid="validation"))
    names = {it.name for it in sp.train}
    assert "training/n9/n9151jpg" in names and "training/n9/n9160.png" in names
    assert len(sp.train) == 1097 and len(sp.valid) == 272 and len(sp.classes) == 10


def test_read_only_dataset_gets_its_cache_elsewhere(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ursa.train.features import cache_dir_for

    monkeypatch.delenv("URSA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_for(tiny_dataset) == tiny_dataset / ".ursa" / "cache"
    ro = make_dataset(tmp_path / "ro", classes=2, per_class=2)
    ro.chmod(0o555)
    try:
        where = cache_dir_for(ro)
        assert str(where).startswith(str(tmp_path / "xdg")) and not (ro / ".ursa").exists()
    finally:
        ro.chmod(0o755)
