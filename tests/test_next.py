"""`ursa next RUN --pool DIR` and `learn.next_batch`: picks from an unlabelled folder, written whole or not at all."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PLANTED_CLASSES, _draw_shape


@dataclass
class Case:
    root: Path
    run: Path
    pool: Path


def make_dataset(root: Path, *, per_class: int = 8) -> Path:
    """root/<shape>/<i>.png: varied generated shapes (distinct enough not to count as near copies)."""
    for cls in PLANTED_CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw_shape(cls, i).save(root / cls / f"{i:03d}.png")
    return root


def _make_pool(pool: Path, root: Path) -> Path:
    """12 new images in two sub-folders, a copy of a training image, a text file and a hidden folder."""
    for cls in PLANTED_CLASSES:
        for i in range(4):
            sub = pool / ("day1" if i % 2 else "day2")
            sub.mkdir(parents=True, exist_ok=True)
            _draw_shape(cls, 50 + i, seed=7).save(sub / f"{cls}{i}.png")
    first = PLANTED_CLASSES[0]
    shutil.copy(root / first / "000.png", pool / "copy_of_training.png")
    (pool / "notes.txt").write_text("not an image")
    (pool / ".ursa").mkdir()
    _draw_shape(first, 1).save(pool / ".ursa" / "hidden.png")
    return pool


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    from ursa.config import DataConfig, TrainConfig
    from ursa.train.recipe import train_run

    base = tmp_path_factory.mktemp("next")
    root = make_dataset(base / "data")
    res = train_run(root, base / "runs" / "shapes", data=DataConfig(seed=0), train=TrainConfig(size=64, views=2), progress=False)
    return Case(root, res.out, _make_pool(base / "unsorted", root))


def _run_copy(case: Case, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(case.run, run)
    return run


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_next_writes_picks_with_guess_and_reason(case: Case, run_cli, tmp_path: Path) -> None:
    run = _run_copy(case, tmp_path)
    before = {p: p.read_bytes() for p in case.pool.rglob("*") if p.is_file()}
    code, out, err = run_cli("next", run, "--pool", case.pool, "--n", "5")
    assert code == 0, err
    rows = _rows(run / "next.csv")
    assert len(rows) == 5 and list(rows[0]) == ["name", "guess", "confidence", "reason"]
    names = [r["name"] for r in rows]
    assert len(set(names)) == 5
    assert all(Path(n).is_absolute() and Path(n).is_file() and Path(n).parent.parent in (case.pool.resolve(), case.pool.resolve().parent) for n in names)
    assert not any(n.endswith("copy_of_training.png") or "/.ursa/" in n for n in names)  # a training copy, a hidden file
    assert all(r["guess"] in PLANTED_CLASSES and 0 <= float(r["confidence"]) <= 1 and r["reason"] for r in rows)
    assert (run / "next.png").stat().st_size > 1000
    assert "1 files skipped" in out and "notes.txt" in out
    assert "1 pool images skipped as copies" in out
    assert "ursa review" in out and "--pool" in out
    assert {p: p.read_bytes() for p in case.pool.rglob("*") if p.is_file()} == before  # the pool is only read
    # the same again: deterministic, and the pool's features come from the cache
    code, _, _ = run_cli("next", run, "--pool", case.pool, "--n", "5")
    assert code == 0 and [r["name"] for r in _rows(run / "next.csv")] == names


@pytest.mark.parametrize(
    "how, match",
    [
        ("dataset", "training folder itself"),
        ("class", "inside the training folder"),
        ("around", "holds the training folder"),
        ("missing", "does not exist"),
        ("empty", "holds no images"),
        ("too_many", "more than the 13 images"),
        ("zero", "--n"),
        ("no_pool", "pass --pool"),
        ("file", "is a file"),
    ],
)
def test_next_bad_input_exits_2_and_writes_nothing(case: Case, run_cli, tmp_path: Path, how: str, match: str) -> None:
    run = _run_copy(case, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    pool = {"dataset": case.root, "class": case.root / PLANTED_CLASSES[0], "around": case.root.parent, "missing": tmp_path / "nope", "empty": empty, "file": empty / "readme.txt"}.get(how, case.pool)
    args = ["next", run, "--n", {"too_many": "14", "zero": "0"}.get(how, "3")] + ([] if how == "no_pool" else ["--pool", pool])
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert match in " ".join((out + err).split())
    assert not any((run / f).exists() for f in ("next.csv", "next.json", "next.png"))


def test_next_computes_missing_features(case: Case, run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose feature cache is gone (another machine, a cleared cache): computed, then the picks."""
    fresh = tmp_path / "cache"
    monkeypatch.setenv("URSA_CACHE_DIR", str(fresh))
    run = _run_copy(case, tmp_path)
    code, out, err = run_cli("next", run, "--pool", case.pool, "--n", "3")
    assert code == 0, err
    assert len(_rows(run / "next.csv")) == 3
    assert len(list(fresh.rglob("*.npy"))) >= 2  # the dataset's features and the pool's, cached apart


def test_next_on_a_folder_that_is_not_a_run(case: Case, run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("next", tmp_path, "--pool", case.pool)
    assert code == 2 and "not a finished training run" in err


def test_learner_next_batch(tmp_path: Path) -> None:
    from ursa import ImageDataLoaders, vision_learner

    root = make_dataset(tmp_path / "data", per_class=6)
    pool = _make_pool(tmp_path / "pool", root)
    dls = ImageDataLoaders.from_folder(root, valid_pct=0.25, seed=0, size=64, bs=8)
    learn = vision_learner(dls, "efficientnet_lite0", path=tmp_path, progress=False)
    learn.fit_lbfgs()
    rows = learn.next_batch(pool, n=4)
    assert len(rows) == 4 and all(Path(r["name"]).is_file() and r["guess"] in learn.classes for r in rows)
    assert rows == learn.next_batch(pool, n=4)
    assert not (tmp_path / "next.csv").exists()


# ---- ursa next RUN --plan ----------------------------------------------------------------------------


def test_plan_writes_the_curve_and_what_to_collect(case: Case, run_cli, tmp_path: Path) -> None:
    import json

    run = _run_copy(case, tmp_path)
    code, out, err = run_cli("next", run, "--plan", "--target", "0.01")
    assert code == 0, err
    plan = json.loads((run / "plan.json").read_text())
    assert [p["fraction"] for p in plan["curve"]] == [0.25, 0.5, 0.75, 1.0]
    assert plan["curve"][0]["n_train"] < plan["curve"][-1]["n_train"]
    assert plan["target_error"] == 0.01 and [c["label"] for c in plan["classes"]] == list(PLANTED_CLASSES)
    assert all(c["add"] >= 0 and c["have"] > 0 for c in plan["classes"])
    assert "learning curve" in out and "what to collect per class" in out and "target error 0.0100 (given)" in out


def test_interp_plan_from_a_run(case: Case, tmp_path: Path) -> None:
    from ursa import ClassificationInterpretation

    run = _run_copy(case, tmp_path)
    plan = ClassificationInterpretation.from_run(run).plan()
    assert len(plan.curve) == 4 and plan.target_error == pytest.approx(plan.current_error / 2)
    assert (run / "plan.json").is_file()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--plan", "--download"], "pip install ddgs"),
        (["--download"], "--download goes with --plan"),
        (["--plan", "--target", "1.5"], "--target"),
        (["--plan", "--pool", "."], "not both"),
    ],
)
def test_plan_bad_input_exits_2(case: Case, run_cli, tmp_path: Path, args: list[str], match: str) -> None:
    if args == ["--plan", "--download"]:
        try:
            import ddgs  # noqa: F401

            pytest.skip("ddgs is installed: the missing-package message cannot be seen")
        except ImportError:
            pass
    run = _run_copy(case, tmp_path)
    code, out, err = run_cli("next", run, *args)
    assert code == 2 and match in " ".join(err.split()), (out, err)
    assert not (run / "plan.json").exists()
