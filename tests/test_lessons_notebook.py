"""notebooks/lesson2.ipynb: the lesson's lines in the lesson's order, saved with outputs that read well on a
code host, and running top to bottom with no network (as CI runs it)."""

from __future__ import annotations

import base64
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lesson2.ipynb"
IMAGE_TYPES = ("image/png", "image/jpeg")

# The lesson's lines, in the lesson's order (each must appear after the one before it).
LESSON_LINES = [
    "download_images(",
    "verify_images(",
    "ImageDataLoaders.from_folder(path, train=\".\"",
    "ds_tfms=aug_transforms(",
    "dls.show_batch(",
    "vision_learner(dls, \"efficientnet_lite0\", metrics=error_rate",
    "learn.fit_one_cycle(4)",
    "learn.save(\"stage-1\")",
    "learn.unfreeze()",
    "learn.lr_find(",
    "learn.recorder.plot()",
    "learn.fit_one_cycle(2, max_lr=slice(3e-5, 3e-4))",
    "learn.recorder.plot_losses()",
    "ClassificationInterpretation.from_learner(learn)",
    "interp.plot_confusion_matrix(",
    "interp.most_confused(",
    "interp.plot_top_losses(",
    "ImageCleaner(learn)",
    "ImageDataLoaders.from_csv(path, \"cleaned.csv\"",
    "learn.export(",
    "load_learner(",
    "learner.predict(",
    "predict_lesson(",
    "sgd_lesson(",
    "minibatch_lesson(",
    "lr_lesson(",
    "epochs_lesson(",
    "fit_lesson(",
]


def _code(nb: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _images(cells: list[dict[str, Any]]) -> list[str]:
    """Every image a cell shows, as its base64 text."""
    return [_text(o["data"][t]) for c in cells for o in c.get("outputs", []) for t in IMAGE_TYPES if t in o.get("data", {})]


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


@pytest.fixture(scope="module")
def saved() -> dict[str, Any]:
    return json.loads(NOTEBOOK.read_text())


def test_markdown_headings_render_as_headings(saved: dict[str, Any]) -> None:
    """A heading indented by spaces renders as a code block: every heading starts at column 0, and no markdown
    cell starts indented (the whole of an earlier section 3 was indented 4 spaces)."""
    for cell in saved["cells"]:
        source = _text(cell["source"])
        if cell["cell_type"] == "markdown":
            assert source[:1] not in (" ", "\t"), f"markdown cell starts indented: {source[:60]!r}"
            for line in source.splitlines():
                if line.lstrip().startswith("#"):
                    assert line.startswith("#"), f"indented heading: {line!r}"
        else:
            assert source[:1] not in (" ", "\t"), f"code cell starts indented: {source[:60]!r}"


def test_follows_the_lesson_with_its_names(saved: dict[str, Any]) -> None:
    source = "\n".join(_text(c["source"]) for c in _code(saved))
    at = 0
    for line in LESSON_LINES:
        found = source.find(line, at)
        assert found >= 0, f"{line!r} missing, or out of the lesson's order"
        at = found
    assert "from ursa import" in source
    for internal in ("train_run", "build_split", "write_digits"):  # the lesson's API, not the recipe's internals
        assert internal not in source


def test_saved_with_outputs_that_read_well(saved: dict[str, Any]) -> None:
    """Executed, in order, without errors; every plot shown once; small; no path of the machine that ran it."""
    code = _code(saved)
    counts = [c["execution_count"] for c in code]
    assert all(counts) and counts == sorted(counts), "save the notebook executed top to bottom"
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "warnings or tracebacks in the saved outputs"
    images = _images(code)
    assert len(images) >= 10  # show_batch, lr_find, losses, confusion, top losses, flagged images, five lessons
    assert not [k for k, n in Counter(images).items() if n > 1], "a figure is shown twice (end the plot line with ';')"
    assert len(base64.b64decode(max(images, key=len))) < 400_000
    assert NOTEBOOK.stat().st_size < 3_000_000
    text = json.dumps(saved)
    for leak in ("/tmp/", "/home/", "/work/", "/root/"):
        assert leak not in text, f"the saved notebook names a local path ({leak})"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lesson2_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("skimage")  # the notebook's photos are scikit-image's sample photos (the dev extra)

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
    client = nbclient.NotebookClient(nb, kernel_name="ursa-test", timeout=600, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    out = work / "runs" / "lesson2"
    for name in ("confusion.png", "top_losses.png", "predict.png", "sgd.gif", "sgd.html", "minibatch.png", "lr.png", "epochs.png", "fit.png",
                 "models/lesson2/model.json", "models/stage-1.safetensors", "models/stage-2.safetensors", "photos/cleaned.csv"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert list((out / "photos/.ursa/quarantine").rglob("*.jpg")), "verify_images quarantined nothing"
    cells = [c for c in nb.cells if c.cell_type == "code"]
    images = _images(cells)
    assert len(images) >= 10  # training curves, interpretation and every lesson's picture are displayed, not only written
    assert not [k for k, n in Counter(images).items() if n > 1]
    printed = "\n".join(_text(o.get("text", "")) + _text(o.get("data", {}).get("text/plain", "")) for c in cells for o in c.outputs)
    assert re.search(r"head\s+epoch\s+4/4", printed) and re.search(r"fine_tune\s+epoch\s+2/2", printed)  # both speeds ran
    assert "relabelled" in printed  # the cleaner found the photos filed under the wrong class
    assert any("text/html" in o.get("data", {}) for c in cells for o in c.outputs)
