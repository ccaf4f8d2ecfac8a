"""ClassificationInterpretation (confusion matrix, most confused, top losses, per-class metrics), the run report and `ursa interpret`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ursa.errors import InterpretError
from ursa.interpret.analysis import ClassificationInterpretation


def _interp() -> ClassificationInterpretation:
    # 3 classes; actual a,a,a,b,b,c ; predicted a,b,b,b,b,a
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]])
    return ClassificationInterpretation(probs, np.array([0, 0, 0, 1, 1, 2]), ["a", "b", "c"])


def test_confusion_and_most_confused() -> None:
    it = _interp()
    assert it.confusion_matrix().tolist() == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]
    assert it.most_confused() == [("a", "b", 2), ("c", "a", 1)]
    assert it.most_confused(min_val=2) == [("a", "b", 2)]
    assert it.error_rate == pytest.approx(0.5)


def test_top_losses_and_per_class() -> None:
    it = _interp()
    losses, idx = it.top_losses(2)
    assert idx.tolist() == [5, 2] and losses[0] == pytest.approx(-np.log(0.05))
    m = {c.label: c for c in it.per_class()}
    assert m["a"].precision == pytest.approx(0.5) and m["a"].recall == pytest.approx(1 / 3) and m["b"].support == 2
    assert m["c"].f1 == 0.0


def test_plots_return_figures_and_write_png(tmp_path: Path) -> None:
    it = _interp()
    fig = it.plot_confusion_matrix(out=tmp_path / "cm.png")
    assert hasattr(fig, "savefig") and (tmp_path / "cm.png").stat().st_size > 1000
    fig = it.plot_confusion_matrix(normalize=True)  # inline (Jupyter): a figure, no file
    assert hasattr(fig, "savefig")
    with pytest.raises(InterpretError, match="from_run"):
        it.plot_top_losses(3)


def test_bad_shapes_and_missing_runs(tmp_path: Path) -> None:
    with pytest.raises(InterpretError, match="do not fit"):
        ClassificationInterpretation(np.zeros((2, 3)), np.zeros(3, int), ["a", "b", "c"])
    with pytest.raises(InterpretError, match="ursa train"):
        ClassificationInterpretation.from_run(tmp_path)


@pytest.fixture(scope="session")
def run(planted_run) -> Path:  # noqa: ANN001
    return planted_run[1]


def test_from_run_and_top_losses(run: Path, tmp_path: Path) -> None:
    it = ClassificationInterpretation.from_run(run)
    assert len(it.targets) == len(it.names) > 0 and it.classes == ["circle", "square", "triangle"]
    it.plot_top_losses(4, out=tmp_path / "tl.png")
    assert (tmp_path / "tl.png").stat().st_size > 1000


def test_interpret_cli(run: Path, run_cli) -> None:  # noqa: ANN001
    code, out, err = run_cli("interpret", run, "--top", "4")
    assert code == 0, err
    assert (run / "confusion.png").is_file() and (run / "top_losses.png").is_file()
    assert "per class" in out and "precision" in out and "most confused" in out
    code, _, err = run_cli("interpret", run.parent / "missing")
    assert code == 2 and "predictions.csv" in err


def test_report_is_self_contained(run: Path) -> None:
    from ursa.report import write_report

    html = write_report(run).read_text()
    assert html.count("data:image/png;base64,") >= 2
    assert "Per class" in html and ("Issues found" in html or "ursa issues" in html)
    assert "src='/" not in html and "src=\"/" not in html
