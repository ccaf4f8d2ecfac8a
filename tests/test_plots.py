"""ursa.interpret.plots: a plot is shown once in a notebook, returned elsewhere, written when asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ursa.interpret import plots


def _cm() -> np.ndarray:
    return np.array([[5, 1], [2, 7]])


def test_outside_a_notebook_the_figure_is_returned_and_kept_open() -> None:
    fig = plots.plot_confusion(_cm(), ["a", "b"], figsize=(3, 2))
    assert tuple(fig.get_size_inches()) == (3, 2)
    assert plots.plt.fignum_exists(fig.number)
    plots.plt.close(fig)


def test_with_out_the_png_is_written_and_the_figure_closed(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cm.png"
    fig = plots.image_grid([np.zeros((8, 8, 3))] * 3, ["x", "y", "z"], out=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plots.plt.fignum_exists(fig.number)


def test_in_a_notebook_each_plot_is_shown_once_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A returned Figure would be shown again as the cell's value; several plots in a cell would pile up."""
    import IPython.display

    shown = []
    monkeypatch.setattr(plots, "_inline", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda fig: shown.append(fig))
    assert plots.plot_confusion(_cm(), ["a", "b"]) is None
    assert plots.image_grid([np.zeros((8, 8, 3))], ["x"], out=tmp_path / "g.png") is None
    assert len(shown) == 2 and (tmp_path / "g.png").is_file()
    assert not any(plots.plt.fignum_exists(f.number) for f in shown)
