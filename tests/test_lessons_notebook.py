"""notebooks/lesson2.ipynb runs top to bottom on the embedded default, as CI runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lesson2.ipynb"


@pytest.mark.slow
def test_lesson2_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # A kernelspec for *this* interpreter, so the notebook runs in the environment under test whatever
    # kernels the machine has installed (a clean CI machine may have none; a laptop may have many).
    spec = tmp_path / "jupyter" / "kernels" / "ursa-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "ursa test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # leave the user's profile alone

    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="ursa-test", timeout=300, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    out = work / "runs" / "lesson2"
    for name in ("confusion.png", "top_losses.png", "predict.png", "sgd.html", "minibatch.png", "lr.png", "epochs.png", "fit.png"):
        assert (out / name).stat().st_size > 0, name
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= 8  # training curves, interpretation and every lesson's picture are displayed, not only written
    assert any("text/html" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
