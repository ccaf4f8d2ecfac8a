"""Every line of the README's Python blocks, run in order as a reader would type them into one notebook.

The blocks run in one namespace (a later block uses the `learn` an earlier one made), in a scratch folder
holding what the README's prose and commands say is there: `urls_teddys.txt` and `urls_black.txt` listing
images on a local HTTP server (127.0.0.1), an image search whose answer is already in the search cache (so
no request leaves the machine), and, made the moment a block first names them, `runs/bears` (`ursa train`),
`models/bears` (`ursa export`), `data/bears/cleaned.csv` (`ursa review --apply`), `photo.jpg` and
`data/unsorted` (photos for `ursa next --pool`). The only
edit to the text is the input side: `size=224` runs as `size=64`, so the whole README runs in seconds.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import draw_example

README = Path(__file__).resolve().parents[1] / "README.md"
SUBSTITUTIONS = {"size=224": "size=64"}  # the only change made to the README's lines (speed)
CLASSES = {"teddy": 0, "black": 1, "grizzly": 2}  # class -> the generated picture's style


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, in order."""
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server over tmp_path/web holding 10 generated JPEGs per class; yields its base URL."""
    root = tmp_path / "web"
    root.mkdir()
    for cls, style in CLASSES.items():
        for i in range(10):
            draw_example(style, i, size=96, seed=7).save(root / f"{cls}-{i}.jpg", quality=90)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def _seed_search_cache(root: Path, query: str, urls: list[str]) -> None:
    """Store the answer of an image search in the dataset's search cache, as an earlier search would have."""
    from ursa.collect.search import DuckDuckGoProvider, cache_file

    path = cache_file(root / ".ursa" / "search", DuckDuckGoProvider.name, query)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = [{"url": u, "source": "", "title": query, "width": 96, "height": 96} for u in urls]
    path.write_text(json.dumps({"provider": DuckDuckGoProvider.name, "query": query, "asked": 150, "exhausted": True, "results": results}))


def _makers(work: Path) -> dict[str, tuple[Path, Callable[[], None]]]:
    """name in a block -> (the file it is, what makes it): what the README's commands would have made before
    a block names it, each made on first mention."""
    from ursa.config import DataConfig, TrainConfig

    def run() -> None:  # ursa train data/bears --out runs/bears
        from ursa.train.recipe import train_run

        train_run(work / "data/bears", work / "runs/bears", data=DataConfig(seed=0), train=TrainConfig(size=64, epochs=2, views=1), progress=False)

    def model() -> None:  # ursa export runs/bears --out models/bears
        from ursa.export import export_run

        export_run(work / "runs/bears", work / "models/bears")

    def cleaned() -> None:  # a "keep" on the review page, then ursa review data/bears --apply
        from ursa.review import Review

        review = Review(work / "data/bears")
        review.decide("black/" + min(p.name for p in (work / "data/bears/black").iterdir()), "keep")
        review.apply()

    def unsorted() -> None:  # a folder of unlabelled photos (`ursa next --pool`)
        (work / "data/unsorted").mkdir(parents=True)
        for cls, style in CLASSES.items():
            for i in range(12):
                draw_example(style, 40 + i, size=96, seed=11).save(work / f"data/unsorted/{cls}-{i}.jpg", quality=90)

    def photo() -> None:  # a photo of class "black" bigger than the model's input
        draw_example(CLASSES["black"], 99, size=300, seed=7).save(work / "photo.jpg", quality=90)

    return {
        "runs/bears": (work / "runs/bears", run),
        "models/bears": (work / "models/bears", model),
        "cleaned.csv": (work / "data/bears/cleaned.csv", cleaned),
        "photo.jpg": (work / "photo.jpg", photo),
        "data/unsorted": (work / "data/unsorted", unsorted),
    }


def test_python_blocks_parse() -> None:
    """The README has Python blocks, each valid Python, and each substitution still finds its text."""
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    for block in blocks:
        compile(block, "README.md", "exec")
    text = "\n".join(blocks)
    for old in SUBSTITUTIONS:
        assert old in text, f"{old!r} is no longer in the README's Python blocks: update SUBSTITUTIONS"


@pytest.mark.slow
@pytest.mark.timeout(900)  # the whole README in one test (training, lr_find on the network, export, ursa next): a hang guard, not a speed target
def test_every_readme_python_line_runs(tmp_path: Path, web: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for cls in ("teddys", "black"):  # the lists the README downloads, as the browser snippet saves them
        style = "teddy" if cls == "teddys" else cls
        (work / f"urls_{cls}.txt").write_text("\n".join(f"{web}/{style}-{i}.jpg" for i in range(10)) + "\n")
    _seed_search_cache(work / "data/bears", "grizzly bear", [f"{web}/grizzly-{i}.jpg" for i in range(10)])
    makers = _makers(work)

    namespace: dict[str, Any] = {"__name__": "__readme__"}
    blocks = python_blocks(README.read_text())
    for n, block in enumerate(blocks, start=1):
        for old, new in SUBSTITUTIONS.items():
            block = block.replace(old, new)
        for name, (made, make) in makers.items():
            if name in block and not made.exists():
                make()
        try:
            exec(compile(block, f"README.md python block {n}", "exec"), namespace)  # noqa: S102  # the README's own text
        finally:
            plt.close("all")

    # What the blocks made is what the README says they make.
    assert {p.name for p in (work / "data/bears").iterdir() if p.is_dir() and not p.name.startswith(".")} == set(CLASSES)
    assert (work / "data/bears/cleaned.csv").is_file() and (work / "models/bears-notebook/model.json").is_file()
    learn = namespace["learn"]
    assert learn.recorder.path == "network"  # the last fit ran after unfreeze()
    assert {r["path"] for r in learn.recorder.rows} == {"cached-features", "network"}  # both speeds ran
    assert (work / "models" / "stage-2.safetensors").is_file()
    assert namespace["pred_class"] in [*learn.classes, "none of these"]
    assert len(namespace["dls"].classes) == 3
