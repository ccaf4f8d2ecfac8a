"""The in-notebook cleaner (`ursa.interpret.widgets.ImageCleaner`), driven through its widget objects (no
browser): every click is a line of the review journal, undo / apply / undo apply are the review page's, a
stale card is refused with a message, and bad sources are clear errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("ipywidgets")

from ursa.errors import InterpretError  # noqa: E402
from ursa.interpret.issues import Issue, IssueReport  # noqa: E402
from ursa.interpret.widgets import CLEANER_KINDS, ImageCleaner, thumbnail_jpeg  # noqa: E402
from ursa.review import Review  # noqa: E402


def _csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["name"]: r["label"] for r in csv.DictReader(fh)}


def _decisions(root: Path) -> list[dict]:
    return [ln for ln in Review(root).lines() if ln["op"] == "decide"]


def test_shows_the_runs_findings_grouped_by_kind(review_case) -> None:  # noqa: ANN001
    root, run = review_case
    cl = ImageCleaner(run)
    assert cl.root == root and cl.kinds == ["label", "duplicate", "dark"]
    assert [v for _, v in cl.kind_menu.options] == cl.kinds and cl.kind_menu.options[0][0] == "Likely label errors (2)"
    assert [c.name for c in cl.cards] == ["square/001.png", "triangle/002.png"]
    card = cl.card("square/001.png")
    assert "suggested: <b>circle</b> 97%" in card.info.value and "label: <b>square</b>" in card.info.value
    assert "predictions.csv is missing" in cl.notes_html.value  # what could not be shown, and why
    assert card.accept_button is not None and card.accept_button.description == "→ circle"
    assert [o[1] for o in card.relabel.options] == ["", "circle", "square", "triangle"]
    img = card.image.value
    assert card.image.format == "jpeg" and img[:2] == b"\xff\xd8"  # JPEG thumbnail bytes
    assert cl.progress.value.startswith("0 of 5 flagged images decided")
    cl.kind_menu.value = "duplicate"  # what picking it in the menu does
    assert [c.name for c in cl.cards] == ["circle/000.png", "circle/copy.png"]
    assert cl.card("circle/copy.png").accept_button is None  # no suggestion, no accept button


def test_buttons_write_the_journal_and_undo_takes_back(review_case) -> None:  # noqa: ANN001
    root, run = review_case
    cl = ImageCleaner(run)
    a, b = cl.card("square/001.png"), cl.card("triangle/002.png")
    a.accept_button.click()
    assert Review(root).state().decision("square/001.png")["label"] == "circle"
    assert "relabel → circle" in a.decision.value and "1 pending" in cl.progress.value
    b.relabel.value = "circle"  # picking a class in the card's menu
    assert b.relabel.value == ""  # the menu resets; the card shows the decision
    assert Review(root).state().decision("triangle/002.png")["label"] == "circle"
    b.delete_button.click()
    b.keep_button.click()
    lines = _decisions(root)
    assert [(ln["name"], ln["action"], ln["label"], ln["from"]) for ln in lines] == [
        ("square/001.png", "relabel", "circle", "square"),
        ("triangle/002.png", "relabel", "circle", "triangle"),
        ("triangle/002.png", "delete", None, "triangle"),
        ("triangle/002.png", "keep", None, "triangle"),
    ]
    cl.undo_button.click()
    assert Review(root).state().decision("triangle/002.png")["action"] == "delete"
    assert "delete" in b.decision.value and "undone" in cl.status.value
    for _ in range(3):
        cl.undo_button.click()
    assert Review(root).state().decisions() == {}
    cl.undo_button.click()  # nothing left: a message, no exception
    assert "nothing to undo" in cl.status.value


def test_apply_writes_cleaned_csv_and_quarantines_like_the_page(review_case, tree_digest) -> None:  # noqa: ANN001
    root, run = review_case
    before = tree_digest(root)
    cl = ImageCleaner(run)
    cl.card("square/001.png").accept_button.click()
    cl.show("duplicate")
    cl.card("circle/copy.png").delete_button.click()
    cl.card("circle/000.png").keep_button.click()
    cl.apply_button.click()
    labels = _csv(root / "cleaned.csv")
    assert labels["square/001.png"] == "circle" and "circle/copy.png" not in labels and len(labels) == len(before) - 1
    assert not (root / "circle/copy.png").exists() and (root / ".ursa/quarantine/circle/copy.png").is_file()
    assert "Applied: 1 relabelled, 1 moved to quarantine, 1 kept" in cl.status.value
    gone = cl.card("circle/copy.png")
    assert "in quarantine (applied)" in gone.decision.value and gone.keep_button.disabled and gone.image.value[:2] == b"\xff\xd8"
    ops = [ln["op"] for ln in Review(root).lines()]
    assert ops == ["decide", "decide", "decide", "apply", "applied"]  # the same journal the page and the CLI write
    cl.apply_button.click()  # nothing pending: a message, nothing written
    assert "nothing to apply" in cl.status.value and [ln["op"] for ln in Review(root).lines()] == ops
    cl.undo_apply_button.click()
    assert tree_digest(root) == before
    assert not cl.card("circle/copy.png").keep_button.disabled and len(cl.pending()) == 3


def test_a_stale_card_is_refused_with_a_message(review_case) -> None:  # noqa: ANN001
    root, run = review_case
    cl = ImageCleaner(run)
    card = cl.card("square/001.png")
    Review(root).decide("square/001.png", "delete", expected_version=0)  # the review page, in another tab, first
    before = Review(root).journal.read_bytes()
    card.keep_button.click()
    assert Review(root).journal.read_bytes() == before  # nothing written
    assert "decided elsewhere" in cl.status.value and "now: delete" in cl.status.value
    assert "delete" in card.decision.value  # the card now shows the latest
    card.keep_button.click()  # deciding again, knowingly, works
    assert Review(root).state().decision("square/001.png")["action"] == "keep"


def test_the_review_page_sees_the_widgets_decisions(review_case) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from ursa.web.review_app import create_review_app, image_id

    root, run = review_case
    cl = ImageCleaner(run)
    cl.card("square/001.png").delete_button.click()
    client = TestClient(create_review_app(root, run), base_url="http://127.0.0.1")
    item = client.get("/api/state").json()["items"][image_id("square/001.png")]
    assert item["decision"] == {"action": "delete", "label": None} and item["version"] == 1
    # and the widget sees the page's: its next render shows them
    client.post("/api/decide", json={"id": image_id("triangle/002.png"), "action": "keep", "version": 0})
    cl.show_page(0)
    assert "keep" in cl.card("triangle/002.png").decision.value


def test_paging_and_kind_choice(review_case) -> None:  # noqa: ANN001
    _, run = review_case
    cl = ImageCleaner(run, per_page=1)
    assert cl.page_label.value == "page 1 of 2" and cl.prev_button.disabled
    cl.next_button.click()
    assert [c.name for c in cl.cards] == ["triangle/002.png"] and cl.next_button.disabled
    only = ImageCleaner(run, kinds=["dark"])
    assert only.kinds == ["dark"] and [c.name for c in only.cards] == ["square/003.png"]
    capped = ImageCleaner(run, max_images=1)
    assert capped.groups["label"] == ["square/001.png"] and capped.groups["duplicate"] == ["circle/000.png"]


def test_a_run_without_issues_is_searched_first_and_its_predictions_give_top_losses(review_case, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import numpy as np

    import ursa.interpret.issues as issues

    root, run = review_case
    (run / "issues.csv").unlink()
    (run / "predictions.csv").write_text(
        "name,label,pred,prob,p_circle,p_square,p_triangle\n"
        "circle/001.png,circle,circle,0.9,0.9,0.05,0.05\n"
        "square/002.png,square,triangle,0.6,0.1,0.3,0.6\n"
        "triangle/001.png,triangle,triangle,0.5,0.2,0.3,0.5\n"
    )
    searched = []

    def fake_find_issues(run_dir, **kw):  # noqa: ANN001, ANN202
        searched.append(Path(run_dir))
        return IssueReport([Issue("dark", "square/003.png", "square", "train", "", None, 0.05, "", "mean brightness 0.05")], [], np.zeros(0, np.int64), np.zeros((0, 3)), ["circle", "square", "triangle"])

    monkeypatch.setattr(issues, "find_issues", fake_find_issues)
    cl = ImageCleaner(run)
    assert searched == [run] and cl.kinds == ["loss", "dark"]
    assert [c.name for c in cl.cards] == ["square/002.png", "triangle/001.png", "circle/001.png"]  # largest loss first
    assert "suggested: <b>triangle</b> 60%" in cl.card("square/002.png").info.value
    assert ImageCleaner(run, top_losses=1).groups["loss"] == ["square/002.png"]
    assert ImageCleaner(run, kinds=["dark"]).kinds == ["dark"]


def test_an_issue_report_is_a_source(review_case) -> None:  # noqa: ANN001
    import numpy as np

    root, _ = review_case
    report = IssueReport([Issue("label", "circle/001.png", "circle", "train", "square", 0.91, 0.03, "", "model says square")], ["circle/001.png"], np.zeros(1, np.int64), np.zeros((1, 3), np.float32), ["circle", "square", "triangle"])
    with pytest.raises(InterpretError, match="root=DATA"):
        ImageCleaner(report)
    cl = ImageCleaner(report, root=root)
    cl.card("circle/001.png").accept_button.click()
    assert Review(root).state().decision("circle/001.png")["label"] == "square"


def _fake_learner(root: Path) -> SimpleNamespace:
    """What ImageCleaner reads of a Learner: dls (split, classes, valid loader) and get_preds(dl)."""
    import torch

    from ursa.data.items import Item
    from ursa.data.split import Split

    classes = ["circle", "square", "triangle"]
    valid = [Item("circle/copy.png", "circle"), Item("square/000.png", "square"), Item("triangle/000.png", "triangle")]
    train = [Item(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.glob("*/*.png")) if p.relative_to(root).as_posix() not in {v.name for v in valid}]
    split = Split(root, train, valid, classes)
    valid_dl = SimpleNamespace(dataset=SimpleNamespace(items=valid, failed={}))
    dls = SimpleNamespace(split=split, classes=classes, valid=valid_dl)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # square/000 predicted circle
    calls = []

    def get_preds(dl=None):  # noqa: ANN001, ANN202
        calls.append(dl)
        return probs, torch.tensor([0, 1, 2])

    return SimpleNamespace(dls=dls, classes=classes, get_preds=get_preds, calls=calls)


def test_a_learner_is_a_source_top_losses_and_copies(review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    learn = _fake_learner(root)
    cl = ImageCleaner(learn)
    assert learn.calls == [None]  # predictions on its validation set
    assert cl.kinds[:3] == ["loss", "duplicate", "leak"]
    assert [c.name for c in cl.cards] == ["square/000.png", "triangle/000.png", "circle/copy.png"]  # largest loss first
    top = cl.card("square/000.png")
    assert "suggested: <b>circle</b> 70%" in top.info.value and "loss 1.61" in top.info.value
    assert cl.card("circle/copy.png").accept_button is None  # predicted right: nothing to suggest
    assert sorted(cl.groups["duplicate"]) == ["circle/000.png", "circle/copy.png"] == sorted(cl.groups["leak"])
    assert "feature cache (this learner has none)" in cl.notes_html.value  # says what it could not search
    top.accept_button.click()
    assert Review(root).state().decision("square/000.png")["label"] == "circle"
    with pytest.raises(InterpretError, match="cached features"):
        ImageCleaner(SimpleNamespace(dls=None, get_preds=lambda dl=None: None))


def test_a_learner_with_a_feature_cache_gets_the_whole_search(review_case, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """`learn.features()` (the cache its frozen fits train on) feeds the same search as `ursa issues`.
    (How well the search finds things is test_issues.py's business; 13 images are too few to judge it.)"""
    import numpy as np
    import torch

    import ursa.interpret.issues as issues
    from ursa.train.features import FeatureData

    seen = {}
    real = issues.search_issues

    def spy(root, names, labels, is_valid, views, classes, **kw):  # noqa: ANN001, ANN202
        seen.update(names=list(names), labels=list(labels), is_valid=list(is_valid), views=views, kw=kw)
        return real(root, names, labels, is_valid, views, classes, **kw)

    monkeypatch.setattr(issues, "search_issues", spy)
    root, _ = review_case
    learn = _fake_learner(root)
    split = learn.dls.split
    # a class is a direction; each picture its own point around it (same-class cosine about 0.5, far below
    # the near-copy threshold, so only the planted copy is a duplicate)
    centre = {c: np.eye(32, dtype=np.float32)[i] * 3 for i, c in enumerate(split.classes)}
    names = sorted(it.name for it in [*split.train, *split.valid])

    def feat(it) -> np.ndarray:  # noqa: ANN001
        if it.name == "circle/copy.png":
            return feat(split.train[0])  # circle/000.png: the same picture
        return centre[it.label] + np.random.default_rng([0, names.index(it.name)]).normal(0, 0.5, 32).astype(np.float32)

    assert split.train[0].name == "circle/000.png"
    index = {c: i for i, c in enumerate(split.classes)}
    x_tr = np.stack([feat(it) for it in split.train])
    x_va = np.stack([feat(it) for it in split.valid])
    y_tr = torch.tensor([index[it.label] for it in split.train])
    fd = FeatureData(  # two views (plain, mirror), stacked view-major as the cache gives them
        x_train=torch.from_numpy(np.concatenate([x_tr, x_tr + 0.01])), y_train=y_tr.repeat(2), train_names=[it.name for it in split.train],
        x_valid=[torch.from_numpy(x_va), torch.from_numpy(x_va + 0.01)], y_valid=torch.tensor([index[it.label] for it in split.valid]),
        valid_names=[it.name for it in split.valid], failed=[], views=[0, 1],
    )  # fmt: skip
    learn.features = lambda: fd
    cl = ImageCleaner(learn)
    tr, va = [it.name for it in split.train], [it.name for it in split.valid]
    assert seen["names"] == tr + va and seen["is_valid"] == [False] * len(tr) + [True] * len(va)
    assert seen["labels"] == [index[it.label] for it in [*split.train, *split.valid]]
    # each image's own views, plain first: both sides predict on plain + mirror
    assert np.array_equal(seen["views"][1][0], x_tr[1]) and np.allclose(seen["views"][1][1], x_tr[1] + 0.01)
    assert np.array_equal(seen["views"][-1][0], x_va[-1]) and len(seen["views"][-1]) == 2 and seen["kw"]["predict_views"] == 2
    assert sorted(cl.groups["duplicate"]) == ["circle/000.png", "circle/copy.png"] == sorted(cl.groups["leak"])
    assert all("model says" in f["detail"] for n in cl.groups["label"] for f in cl.items[n]["findings"] if f["kind"] == "label")
    assert cl.groups["loss"][0] == "square/000.png" and cl.notes_html.value == ""


def test_thumbnails_are_upright_jpegs_within_size(tmp_path: Path) -> None:
    im = Image.new("RGB", (400, 200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees
    path = tmp_path / "side.jpg"
    im.save(path, "JPEG", exif=exif)
    with Image.open(io.BytesIO(thumbnail_jpeg(path, size=100))) as th:
        assert th.format == "JPEG" and th.size == (50, 100)  # upright (portrait) and at most 100 px


def test_bad_sources_are_clear_errors(review_case, tmp_path: Path) -> None:  # noqa: ANN001
    root, run = review_case
    with pytest.raises(InterpretError, match="does not exist"):
        ImageCleaner(tmp_path / "nowhere")
    with pytest.raises(InterpretError, match="not a training run"):
        ImageCleaner(root)  # the dataset, not the run
    with pytest.raises(InterpretError, match="run folder .*IssueReport or a Learner; got int"):
        ImageCleaner(42)
    with pytest.raises(InterpretError, match="unknown kinds"):
        ImageCleaner(run, kinds=["label", "bogus"])
    with pytest.raises(InterpretError, match="per_page"):
        ImageCleaner(run, per_page=0)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "root": str(tmp_path / "moved")}))
    with pytest.raises(InterpretError, match="not there any more"):
        ImageCleaner(run)
    assert ImageCleaner(run, root=root).root == root  # its new place, passed
    assert Review(root).lines() == []  # no error wrote anything


def test_every_kind_has_a_title() -> None:
    from ursa.interpret.widgets import KIND_TITLES

    assert set(KIND_TITLES) == set(CLEANER_KINDS)


def test_cli_and_servers_do_not_import_ipywidgets() -> None:
    code = "import sys, ursa, ursa.cli, ursa.web.review_app, ursa.web.predict_app, ursa.interpret.issues, ursa.interpret.analysis; print('ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ---- once in headless Chromium: the widget in a live kernel, served by Voila ------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.slow
def test_in_headless_chromium_a_click_reaches_the_journal(review_case, browser, tmp_path: Path) -> None:  # noqa: ANN001
    """A notebook cell showing ImageCleaner(run), rendered by Voila (a real kernel and the real widget
    front end), in Chromium: the cards show, and clicking Keep writes the journal line."""
    import os
    import socket
    import time

    pytest.importorskip("voila")
    nbformat = pytest.importorskip("nbformat")
    root, run = review_case
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"from ursa.interpret.widgets import ImageCleaner\nImageCleaner({str(run)!r})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "clean.ipynb"
    nbformat.write(nb, path)
    port = _free_port()
    log = open(tmp_path / "voila.log", "wb")  # noqa: SIM115
    env = {**os.environ, "JUPYTER_PLATFORM_DIRS": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", str(path), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1", "--show_tracebacks=True"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    break  # listening: the page request below starts the kernel and runs the cell
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("voila did not start:\n" + (tmp_path / "voila.log").read_text(errors="replace")[-3000:])
                time.sleep(0.3)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        try:
            page.goto(url, timeout=90_000)
            page.get_by_role("button", name="Keep").first.wait_for(timeout=90_000)
            page.wait_for_function("() => Array.from(document.images).filter(i => i.src.startsWith('blob:') || i.src.startsWith('data:')).every(i => i.complete && i.naturalWidth > 0)", timeout=20_000)
            page.screenshot(path=str(tmp_path / "cleaner.png"), full_page=True)
            assert page.get_by_text("Likely label errors (2)").count() >= 1
            assert page.get_by_text("suggested:").count() == 2
            page.get_by_role("button", name="Keep").first.click()
            page.get_by_text("1 of 5 flagged images decided").wait_for(timeout=20_000)
            page.screenshot(path=str(tmp_path / "cleaner-after.png"), full_page=True)
        finally:
            page.close()
        d = Review(root).state().decision("square/001.png")
        assert d is not None and d["action"] == "keep"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
