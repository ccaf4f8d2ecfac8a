"""The CLI as a package of stage modules: same commands in the same order, a fast `--help`, and the logic it
used to hold (allocator tuning, torchrun argv rewriting, lesson arrays, predict's paths and CSV) where it lives now."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

COMMANDS = ["info", "show-batch", "lr-find", "train", "demo", "download", "search", "verify", "export", "predict", "serve",
            "interpret", "issues", "next", "review", "studio", "lesson"]  # fmt: skip


def test_commands_are_listed_in_the_order_of_the_stages() -> None:
    from ursa.cli import app

    assert list(typer.main.get_command(app).commands) == COMMANDS  # type: ignore[attr-defined]


def test_help_imports_no_heavy_library() -> None:
    """`ursa --help` stays instant: the stage modules import their libraries inside the commands."""
    code = "import sys, ursa.cli; print(sorted(m for m in ('torch', 'numpy', 'PIL', 'httpx', 'ursa.train', 'ursa.export') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_ursa_runs_the_cli() -> None:
    res = subprocess.run([sys.executable, "-m", "ursa", "lesson", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "minibatch" in res.stdout


def test_without_nproc_drops_both_spellings() -> None:
    from ursa.train.launch import without_nproc

    argv = ["train", "data", "--nproc", "4", "--bs", "8", "--nproc=2", "--nprocs-like", "x"]
    assert without_nproc(argv) == ["train", "data", "--bs", "8", "--nprocs-like", "x"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_mallopt_applies_and_tune_allocator_reports_it() -> None:
    from ursa._malloc import M_MMAP_THRESHOLD, mallopt
    from ursa.train.runtime import tune_allocator

    assert mallopt(M_MMAP_THRESHOLD, 256 * 1024) is True
    assert tune_allocator() is True


def test_expand_image_paths_lists_folders_and_unexpanded_globs(tmp_path: Path) -> None:
    from ursa.cli.predict import expand_image_paths

    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    got = expand_image_paths([tmp_path, str(tmp_path / "*.jpg"), str(tmp_path / "*.gif"), tmp_path / "missing.png"])
    assert got == [tmp_path / "a.PNG", tmp_path / "b.jpg", tmp_path / "b.jpg", Path(str(tmp_path / "*.gif")), tmp_path / "missing.png"]


def test_write_predictions_csv_has_a_row_per_image_and_empty_error_cells(tmp_path: Path) -> None:
    from ursa.cli.predict import write_predictions_csv

    rows = [
        {"path": "a.jpg", "status": "ok", "label": "cat", "prob": 0.75, "best": "cat", "top": [("cat", 0.75), ("dog", 0.25)], "error": "", "probs": np.array([0.75, 0.25])},
        {"path": "b.jpg", "status": "error", "label": "", "prob": None, "best": "", "top": [], "error": "not an image", "probs": None},
    ]  # fmt: skip
    out = write_predictions_csv(rows, tmp_path / "p.csv", ["cat", "dog"])
    with out.open(newline="") as f:
        got = list(csv.reader(f))
    assert got == [
        ["path", "status", "label", "prob", "best", "top", "error", "p_cat", "p_dog"],
        ["a.jpg", "ok", "cat", "0.750000", "cat", "cat:0.7500; dog:0.2500", "", "0.750000", "0.250000"],
        ["b.jpg", "error", "", "", "", "", "not an image", "", ""],
    ]


def test_image_arrays_of_the_embedded_digits_and_its_errors(tmp_path: Path) -> None:
    from ursa.data.arrays import image_arrays
    from ursa.errors import DataError

    a = image_arrays(None, seed=0, size=16)
    assert a.x_train.shape[1] == a.x_valid.shape[1] == 64 and a.image_shape == (8, 8)
    assert len(a.x_train) + len(a.x_valid) == 1797 and a.x_train.dtype == np.float32 and len(a.classes) == 10
    with pytest.raises(DataError, match="does not exist"):
        image_arrays(tmp_path / "nowhere", seed=0, size=16)
    with pytest.raises(DataError, match="at least 2 pixels"):
        image_arrays(None, seed=0, size=1)
