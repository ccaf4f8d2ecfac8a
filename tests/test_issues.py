"""Issue search: unit tests on small arrays and images, and an end-to-end search of a planted dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ursa.errors import InterpretError
from ursa.interpret.issues import (
    ISSUE_COLUMNS,
    duplicate_groups,
    find_issues,
    image_quality,
    label_issues,
    out_of_sample_probs,
    outlier_scores,
    quality_flags,
    read_issues,
)


def _blobs(n_per: int = 30, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (3, d))
    y = np.repeat(np.arange(3), n_per)
    return centers[y] + rng.normal(0, 1, (len(y), d)), y


def test_label_issues_ranks_flipped_labels_from_probabilities() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    probs = np.full((120, 3), 0.05)
    probs[np.arange(120), y] = 0.9
    flipped = [3, 50, 100]
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    probs += rng.uniform(0, 0.02, probs.shape)
    probs /= probs.sum(1, keepdims=True)
    found = label_issues(noisy, probs)
    assert set(found.tolist()) == set(flipped)


def test_label_issues_rejects_mismatched_shapes() -> None:
    with pytest.raises(InterpretError, match="do not fit"):
        label_issues(np.zeros(4, int), np.zeros((3, 2)))


def test_out_of_sample_probs_are_probabilities_and_find_flips() -> None:
    x, y = _blobs()
    noisy = y.copy()
    noisy[[0, 31, 62]] = [1, 2, 0]
    p = out_of_sample_probs([[row] for row in x], noisy, n_classes=3, folds=5, seed=0)
    assert p.shape == (90, 3)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == y).mean() > 0.95  # out of sample: flipped items are predicted as their true class
    assert set(label_issues(noisy, p).tolist()) >= {0, 31, 62}


def test_out_of_sample_probs_too_few_items() -> None:
    with pytest.raises(InterpretError, match="too few"):
        out_of_sample_probs([[np.zeros(4)]] * 5, np.array([0, 1, 0, 1, 0]), n_classes=2, folds=5)


def test_duplicate_groups_exact_and_near() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(6, 32))
    emb[3] = emb[1] + rng.normal(0, 0.01, 32)  # near copy of 1
    groups = duplicate_groups(emb, hashes=["a", "b", "c", "d", "e", "a"], threshold=0.95)
    members = [g["members"] for g in groups]
    assert [0, 5] in members and [1, 3] in members and len(groups) == 2
    exact = {tuple(g["members"]): g["exact"] for g in groups}
    assert exact[(0, 5)] and not exact[(1, 3)]


def test_outlier_scores_single_out_the_far_point() -> None:
    x, _ = _blobs(n_per=20)
    x = np.vstack([x, -x.mean(0) * 10 + 50])
    s = outlier_scores(x)
    assert int(np.argmax(s)) == len(x) - 1


def test_quality_flags_on_images(tmp_path: Path, draw_shape) -> None:  # noqa: ANN001
    ok = draw_shape("circle", 0, size=64)
    ok.save(tmp_path / "ok.png")
    Image.fromarray((np.asarray(ok, np.float32) * 0.05).astype(np.uint8)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(tmp_path / "bright.png")
    ok.filter(ImageFilter.GaussianBlur(8)).save(tmp_path / "blurry.png")
    ok.resize((16, 16)).save(tmp_path / "tiny.png")
    kinds = {n: {k for k, _, _ in quality_flags(image_quality(tmp_path / f"{n}.png"))} for n in ("ok", "dark", "bright", "blurry", "tiny")}
    assert kinds["ok"] == set()
    assert "dark" in kinds["dark"] and "bright" in kinds["bright"] and "blurry" in kinds["blurry"] and "tiny" in kinds["tiny"]


def test_an_image_that_cannot_be_measured_is_unreadable_not_tiny(tmp_path: Path, draw_shape) -> None:  # noqa: ANN001
    """Regression: a file the quality pass could not open was reported as kind "tiny" with score 0."""
    from ursa.interpret.issues import KINDS, search_issues
    from ursa.interpret.issues import KIND_TITLES

    x, y = _blobs(n_per=4, d=8)
    names = []
    for i in range(len(y)):
        draw_shape("circle", i, size=64).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not an image any more")
    rep = search_issues(tmp_path, names, y, [i % 4 == 0 for i in range(len(y))], [[row] for row in x], ["a", "b", "c"], folds=2, seed=0)
    bad = [it for it in rep.issues if it.name == "3.png" and it.kind in ("tiny", "unreadable")]
    assert [(it.kind, it.score) for it in bad] == [("unreadable", None)] and "could not be opened" in bad[0].detail
    assert rep.summary["counts"]["unreadable"] == 1 and rep.summary["counts"]["tiny"] == 0
    assert set(KIND_TITLES) == set(KINDS)  # the review page has a title for every kind


@pytest.fixture(scope="session")
def searched(planted_run):  # noqa: ANN001, ANN201
    planted, run = planted_run
    return planted, run, find_issues(run)


def test_end_to_end_finds_planted_problems(searched) -> None:  # noqa: ANN001
    planted, run, rep = searched
    labels = {it.name: it for it in rep.of_kind("label")}
    for name, true in planted.flipped.items():
        assert name in labels, f"flipped {name} not flagged; flagged: {list(labels)}"
        assert labels[name].suggested == true
        assert labels[name].confidence is not None and labels[name].confidence > 0.5
    # every planted flip ranks above every image that was not planted
    dups = {}
    for it in rep.of_kind("duplicate"):
        dups.setdefault(it.group, set()).add(it.name)
    assert set(planted.exact_copy) in dups.values()
    assert set(planted.near_copy) in dups.values()
    exact_rows = [it for it in rep.of_kind("duplicate") if it.name == planted.exact_copy[1]]
    assert "labels differ" in exact_rows[0].detail
    assert planted.dark in {it.name for it in rep.of_kind("dark")}
    assert planted.blurry in {it.name for it in rep.of_kind("blurry")}
    assert planted.tiny in {it.name for it in rep.of_kind("tiny")}
    rows = read_issues(run)
    assert list(rows[0]) == list(ISSUE_COLUMNS) and len(rows) == len(rep.issues)
    summary = json.loads((run / "issues.json").read_text())
    assert summary["counts"]["label"] == len(labels)
    assert 0.0 <= summary["error_rate_without_leaks"] <= 1.0
    assert summary["n_valid_without_leaks"] == summary["n_valid"] - summary["n_leaked_valid"]


def test_leaks_are_pairs_across_the_split(searched) -> None:  # noqa: ANN001
    _, run, rep = searched
    by_group: dict[str, set[str]] = {}
    for it in rep.of_kind("leak"):
        by_group.setdefault(it.group, set()).add(it.split)
    assert all(sides == {"train", "valid"} for sides in by_group.values())


def test_issues_cli_writes_csv_and_report(searched, run_cli) -> None:  # noqa: ANN001
    _, run, _ = searched
    code, out, err = run_cli("issues", run, "--folds", "3")
    assert code == 0, err
    assert "label" in out and (run / "issues.csv").is_file()
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Issues found" in html
    assert "src='http" not in html and 'src="http' not in html  # self-contained


def test_find_issues_reads_a_run_written_before_the_typed_train_settings(searched, tmp_path: Path) -> None:  # noqa: ANN001
    """Runs written before TrainConfig's typed fields kept ten settings under "extra"; they still search."""
    import shutil

    _, run, rep = searched
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    cfg = json.loads((old / "config.json").read_text())
    for name in ("view_budget", "num_workers", "dropout", "head_batch_size", "wd", "label_smoothing", "fine_tune_label_smoothing", "fine_tune_size", "device", "precision", "channels_last"):
        cfg["train"].pop(name)
    cfg["train"]["extra"] = {"device": "cpu", "num_workers": 0}
    (old / "config.json").write_text(json.dumps(cfg))
    again = find_issues(old)
    assert again.to_csv() == rep.to_csv()


def test_find_issues_errors(tmp_path: Path, run_cli) -> None:  # noqa: ANN001
    with pytest.raises(InterpretError, match="not a training run"):
        find_issues(tmp_path)
    code, _, err = run_cli("issues", tmp_path / "nope")
    assert code == 2 and "ursa train" in err
    with pytest.raises(InterpretError, match="ursa issues"):
        read_issues(tmp_path)


def test_too_few_distinct_pictures_for_the_folds_is_a_clear_error() -> None:
    """Regression: sklearn's raw ValueError (n_splits greater than the number of groups) reached the user."""
    import numpy as np

    from ursa.errors import InterpretError
    from ursa.interpret.issues import out_of_sample_probs

    views = [[np.zeros(4, np.float32)] for _ in range(12)]
    labels = np.array([0, 1] * 6)
    with pytest.raises(InterpretError, match="only 3 distinct pictures"):
        out_of_sample_probs(views, labels, n_classes=2, groups=[i % 3 for i in range(12)], folds=5)
