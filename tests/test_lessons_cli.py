"""`ursa lesson ...`: every command writes a picture a test can open, and bad input exits 2 with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ursa.cli import main

# Small sizes: the defaults are the full-size lessons, these keep each command to about a second.
SMALL = {
    "sgd": ["--n", "30", "--epochs", "6"],
    "minibatch": ["--n", "2000", "--features", "5", "--steps", "20"],
    "lr": ["--epochs", "2"],
    "epochs": ["--epochs", "6", "--n-train", "100", "--hidden", "32"],
    "fit": [],
    "predict": ["--epochs", "1", "--batch-size", "32", "--show", "3"],
}
SUFFIX = {"sgd": ".gif"}


def run(args: list[str]) -> int:
    """Run the console entry point; returns its exit code."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_lesson_writes_an_image(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{name}{SUFFIX.get(name, '.png')}"
    assert run(["lesson", name, "--out", str(out), *SMALL[name]]) == 0
    assert out.stat().st_size > 0
    with Image.open(out) as im:
        im.load()
        assert im.size[0] > 300 and im.size[1] > 200
    printed = capsys.readouterr().out
    assert "notice:" in printed and str(out.name) in printed
    assert not list(tmp_path.glob(".*.tmp*")), "temporary files must be renamed or removed"


def test_sgd_also_writes_html(tmp_path: Path) -> None:
    out = tmp_path / "anim" / "line.gif"  # a missing folder is created
    assert run(["lesson", "sgd", "--out", str(out), *SMALL["sgd"]]) == 0
    assert "data:image/png;base64" in out.with_suffix(".html").read_text(encoding="utf-8")
    out.unlink()
    out.with_suffix(".html").unlink()
    assert run(["lesson", "sgd", "--out", str(out), "--no-html", *SMALL["sgd"]]) == 0
    assert out.exists() and not out.with_suffix(".html").exists()


def test_predict_error_rate_matches_library_metric(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["lesson", "predict", "--out", str(tmp_path / "p.png"), *SMALL["predict"]]) == 0
    printed = capsys.readouterr().out
    assert "ursa.train.metrics.error_rate" in printed
    assert "│   yes │" in printed or " yes " in printed.split("error rate on the batch")[1]


@pytest.mark.parametrize("name", ["lr", "epochs", "predict"])
def test_classification_lessons_read_a_data_folder(name: str, tmp_path: Path) -> None:
    from ursa.data.embedded import write_digits

    root = write_digits(tmp_path / "digits", size=16, per_class=12)
    out = tmp_path / f"{name}.png"
    assert run(["lesson", name, str(root), "--size", "8", "--out", str(out), *SMALL[name]]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 300


@pytest.mark.parametrize(
    "args, message",
    [
        (["lesson", "lr", "{tmp}/nowhere"], "does not exist"),
        (["lesson", "epochs", "{tmp}/nowhere"], "does not exist"),
        (["lesson", "fit", "--out", "{tmp}/fit.txt"], "should end in .png"),
        (["lesson", "sgd", "--out", "{tmp}/sgd.png"], "should end in .gif"),
        (["lesson", "minibatch", "--out", "{tmp}"], "should end in"),
        (["lesson", "fit", "--out", "{tmp}/dir.png"], "is a folder"),
        (["lesson", "fit", "--out", "{tmp}/file.txt/fit.png"], "cannot create the folder"),
        (["lesson", "sgd", "--out", "{tmp}/s.gif", "--lr", "-1"], "lr must be a positive"),
        (["lesson", "sgd", "--out", "{tmp}/s.gif", "--n", "1"], "at least 2 points"),
        (["lesson", "minibatch", "--out", "{tmp}/m.png", "--n", "100", "--batch-size", "0"], "batch size"),
        (["lesson", "lr", "--out", "{tmp}/l.png", "--good", "0"], "positive"),
        (["lesson", "lr", "--size", "1"], "--size must be at least 2"),
        (["lesson", "epochs", "--out", "{tmp}/e.png", "--noise", "1.5"], "label noise"),
        (["lesson", "fit", "--out", "{tmp}/f.png", "--degrees", "1", "4", "40"], "each degree"),
        (["lesson", "predict", "--out", "{tmp}/p.png", "--show", "0"], "show >= 1"),
    ],
)
def test_bad_input_exits_2_with_the_fix(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default --out lands here, never in the repository
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "file.txt"]  # nothing written


def test_a_class_folder_with_one_image_is_a_lesson_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ursa.data.embedded import write_digits

    root = write_digits(tmp_path / "digits", size=16, per_class=3)
    for extra in sorted((root / "zero").iterdir())[1:]:
        extra.unlink()  # "zero" keeps one image: too few to split
    assert run(["lesson", "lr", str(root), "--out", str(tmp_path / "lr.png")]) == 2
    assert "at least 2" in capsys.readouterr().err
