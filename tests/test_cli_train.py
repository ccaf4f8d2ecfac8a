"""Every training command of the README, run through the real CLI on tiny generated images, and its error paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import draw_example, make_dataset

FAST = ["--size", "64", "--head", "one_cycle", "--epochs", "3"]


def test_info(run_cli, tiny_dataset: Path) -> None:
    (tiny_dataset / "bear" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    code, out, _ = run_cli("info", tiny_dataset)
    assert code == 0
    assert "bear" in out and "cat" in out and "dog" in out and "64x64" in out
    assert "1 file(s) skipped" in out and "broken.jpg" in out


def test_show_batch(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch.png"
    code, stdout, _ = run_cli("show-batch", tiny_dataset, "--out", out, "--size", "96")
    assert code == 0 and "wrote" in stdout
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 300


def test_lr_find(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "lr.png"
    code, stdout, _ = run_cli("lr-find", tiny_dataset, "--out", out, "--size", "64")
    assert code == 0 and "suggested learning rate" in stdout
    assert out.stat().st_size > 5000


def test_train_writes_the_run_folder_and_is_deterministic(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    code, stdout, err = run_cli("train", tiny_dataset, "--out", tmp_path / "runs" / "t", *FAST)
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    for f in ("config.json", "split.json", "history.csv", "metrics.json", "losses.png", "predictions.csv", "models/model.safetensors"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    assert {"error_rate", "accuracy", "n_train", "n_valid", "classes", "wall_s"} <= set(m)
    assert m["classes"] == ["bear", "cat", "dog"] and m["n_train"] + m["n_valid"] == 24
    assert m["error_rate"] <= 0.34  # generated shapes are easy; chance is 0.67
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 3 and rows[0]["stage"] == "head"
    assert "epoch   3/3" in stdout and "error_rate" in stdout
    # same seed, same split and metrics; the existing run is not overwritten
    code, stdout, _ = run_cli("train", tiny_dataset, "--out", tmp_path / "runs" / "t", *FAST)
    assert code == 0 and (tmp_path / "runs" / "t-2" / "metrics.json").is_file()
    m2 = json.loads((tmp_path / "runs" / "t-2" / "metrics.json").read_text())
    assert m2["error_rate"] == m["error_rate"] and m2["valid_loss"] == pytest.approx(m["valid_loss"], abs=1e-6)
    assert json.loads((run / "split.json").read_text())["valid"] == json.loads((tmp_path / "runs" / "t-2" / "split.json").read_text())["valid"]


def test_train_with_train_valid_folders_and_fine_tune(run_cli, tmp_path: Path) -> None:
    make_dataset(tmp_path / "d" / "train", per_class=6)
    make_dataset(tmp_path / "d" / "val", per_class=3, seed=1)
    code, _, err = run_cli("train", tmp_path / "d", "--train", "train", "--valid", "val", "--out", tmp_path / "r", *FAST, "--fine-tune", "1")
    assert code == 0, err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["n_train"] == 18 and m["n_valid"] == 9 and m["final_stage"] == "fine_tune"
    stages = [r["stage"] for r in csv.DictReader(open(tmp_path / "r" / "history.csv"))]
    assert stages == ["head"] * 3 + ["fine_tune"]


def test_train_with_labels_csv(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    rows = ["name,label"] + [f"{c}\\{i:03d}.png,{c}" for c in ("bear", "cat") for i in range(8)]
    (tiny_dataset / "cleaned.csv").write_text("\n".join(rows))
    code, _, err = run_cli("train", tiny_dataset, "--labels", "cleaned.csv", "--out", tmp_path / "r", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["classes"] == ["bear", "cat"]


def test_demo_on_the_embedded_digits(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--per-class", "6", "--size", "48")
    assert code == 0, err
    assert (tmp_path / "demo" / "digits" / "seven").is_dir()
    m = json.loads((tmp_path / "demo" / "runs" / "digits" / "metrics.json").read_text())
    assert len(m["classes"]) == 10 and "results:" in out
    assert f"ursa studio {tmp_path / 'demo' / 'digits'}" in " ".join(out.split())  # the way on to the web page


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("empty", [], "no images found"),
        ("single", [], "single class"),
        ("one_image", [], "has 1 image"),
        ("csv_missing", ["--labels", "bad.csv"], "do not exist"),
        ("csv_unknown", ["--labels", "bad.csv"], "not classes of"),
        ("ok", ["--valid-pct", "1.5"], "between 0 and 1"),
        ("bad_weights", ["--weights", "w.safetensors"], "weights"),
        ("ok", ["--train", "train"], "both --train and --valid"),
    ],
)
def test_bad_input_exits_2_with_the_fix_and_writes_nothing(run_cli, tmp_path: Path, setup: str, args: list[str], message: str) -> None:
    root = tmp_path / "d"
    root.mkdir()
    if setup != "empty":
        make_dataset(root, classes=1 if setup == "single" else 2, per_class=4)
    if setup == "one_image":
        (root / "solo").mkdir()
        draw_example(2, 0).save(root / "solo" / "a.png")
    if setup == "csv_missing":
        (root / "bad.csv").write_text("name,label\nbear/000.png,bear\nbear/zzz.png,bear\n")
    if setup == "csv_unknown":
        (root / "bad.csv").write_text("name,label\nbear/000.png,grizzly\n")
    if setup == "bad_weights":
        (root / "w.safetensors").write_bytes(b"garbage")
        args = ["--weights", str(root / "w.safetensors")]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code, _, err = run_cli("train", root, "--out", tmp_path / "run", *FAST, *args)
    assert code == 2
    assert message in err.replace("\n", " ")
    assert not (tmp_path / "run").exists()
    assert sorted(p.relative_to(root) for p in root.rglob("*") if ".ursa" not in p.parts) == [b for b in before if ".ursa" not in b.parts]


def test_default_lbfgs_head_fits_and_records_one_row(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("train", tiny_dataset, "--out", tmp_path / "r", "--size", "64")
    assert code == 0, err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["head"] == "lbfgs" and m["error_rate"] <= 0.34
    assert len(m["views"]) > 1  # a tiny set gets several cached augmented views
    rows = list(csv.DictReader(open(tmp_path / "r" / "history.csv")))
    assert [r["stage"] for r in rows] == ["head"] and float(rows[0]["train_loss"]) < 1.0
    code, _, err = run_cli("train", tiny_dataset, "--out", tmp_path / "r2", "--head", "sgd")
    assert code == 2 and "--head (TrainConfig.head) must be one of 'lbfgs', 'one_cycle', got 'sgd'" in " ".join(err.split())
