"""The studio page in headless Chromium (Debian's `chromium`, driven by Playwright, with its fake camera):
the whole flow as a person clicks it (classes, photos from files and from a webcam burst, train, metrics,
a finding relabelled and undone, live webcam prediction, export and the zip), and the class controls with
their refusals. Screenshots go under tmp_path (and into $URSA_SCREENSHOTS when set, to look at them)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

# Chromium's fake camera (a moving test pattern) stands in for a webcam, and is allowed without a prompt.
MEDIA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def camera_browser() -> Iterator[Any]:
    """conftest's headless Chromium, with the fake camera; skipped when Chromium is absent."""
    from conftest import chromium

    yield from chromium(*MEDIA_ARGS)


@pytest.fixture
def studio(tmp_path: Path, app_server: Callable[..., Any]) -> Iterator[tuple[Path, str]]:
    """A new project folder under a real Uvicorn on 127.0.0.1 (the job worker runs in the app's lifespan)."""
    from ursa.web.studio.app import create_studio_app

    root = tmp_path / "project"
    with app_server(create_studio_app(root)) as url:
        yield root, url + "/"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def shot(page: Any, tmp_path: Path, name: str, *, full_page: bool = True) -> None:
    """A screenshot under tmp_path, copied to $URSA_SCREENSHOTS (or $URSA_SCREENSHOT_DIR) when set."""
    path = tmp_path / f"studio_{name}.png"
    if full_page:
        page.evaluate("window.scrollTo(0, 0)")  # else the sticky header is drawn where the view was
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 5_000
    target = os.environ.get("URSA_SCREENSHOTS") or os.environ.get("URSA_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def new_page(browser: Any) -> tuple[Any, list[str]]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # console errors too (a Content-Security-Policy violation is one), less the refusals the tests ask for
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    return page, errors


def add_class(page: Any, name: str) -> Any:
    from playwright.sync_api import expect

    page.fill("#new-class", name)
    page.get_by_role("button", name="Add class").click()
    card = page.locator(f".class-card[data-name='{name}']")
    expect(card).to_be_visible()
    return card


def journal_ops(root: Path) -> list[str]:
    path = root / ".ursa" / "journal.jsonl"
    return [json.loads(x)["op"] for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


@pytest.mark.timeout(600)
def test_studio_flow_from_empty_project_to_zip(camera_browser: Any, studio: tuple[Path, str], tmp_path: Path, draw_shape: Callable[..., Image.Image]) -> None:
    from playwright.sync_api import expect

    root, url = studio
    page, errors = new_page(camera_browser)
    page.goto(url)
    expect(page.locator("#next")).to_contain_text("add a class")

    # three classes; two get photos from the file input (one of them a very dark photo, which the issues job flags)
    cards = {name: add_class(page, name) for name in ("circle", "square", "camera")}
    dark = np.random.default_rng(0).integers(0, 10, (64, 64, 3)).astype(np.uint8)
    for cls in ("circle", "square"):
        files = [{"name": f"{cls}{i}.png", "mimeType": "image/png", "buffer": png(draw_shape(cls, i))} for i in range(8)]
        if cls == "circle":
            files.append({"name": "dark.png", "mimeType": "image/png", "buffer": png(Image.fromarray(dark))})
        files.append({"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not an image at all"})
        cards[cls].locator("input.files").set_input_files(files)
        expect(cards[cls].locator(".status")).to_contain_text(f"Added {9 if cls == 'circle' else 8} photos", timeout=30_000)
        expect(cards[cls].locator(".status")).to_contain_text("1 refused (notes.jpg: ")
    expect(cards["circle"].locator(".count")).to_have_text("9 photos")
    expect(cards["circle"].locator(".thumbs img")).to_have_count(8)

    # the third from the fake webcam: one snap, then a burst held down with the keyboard (~8 frames a second)
    cam = cards["camera"]
    cam.get_by_role("button", name="Webcam").click()
    expect(cam.locator(".status")).to_contain_text("Point the camera", timeout=15_000)
    cam.get_by_role("button", name="Snap").click()
    expect(cam.locator(".status")).to_have_text("Added 1 photo.", timeout=15_000)
    cam.locator(".hold").focus()
    page.keyboard.down(" ")
    expect(cam.locator(".status")).to_contain_text("Recording", timeout=5_000)
    time.sleep(1.5)
    page.keyboard.up(" ")
    expect(cam.locator(".status")).to_contain_text(re.compile(r"Added \d+ photos"), timeout=15_000)
    burst = int(re.search(r"Added (\d+)", cam.locator(".status").inner_text()).group(1))
    assert 6 <= burst <= 20, burst  # ~1.5 s at 8 frames a second, sent in batches while held
    cam.get_by_role("button", name="Close webcam").click()
    webcam_files = sorted(p.name for p in (root / "camera").iterdir())
    assert len(webcam_files) == 1 + burst and all(n.startswith("webcam-") and n.endswith(".jpg") for n in webcam_files)
    expect(page.locator("#next")).to_contain_text("Press Train")
    shot(page, tmp_path, "1_classes")

    # train with a tiny configuration from the advanced panel; a reload in the middle finds the job again
    page.locator("#advanced summary").click()
    page.fill("#opt-size", "64")
    page.fill("#opt-views", "2")
    page.get_by_role("button", name="Train").click()
    expect(page.locator("#train-progress")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel training")).to_be_visible()
    page.reload()
    expect(page.locator("#train-progress .stage")).not_to_be_empty()
    expect(page.locator("#train-progress .stage")).to_contain_text(re.compile(r"%|Done|Waiting"))
    page.locator("#train").evaluate("(e) => e.scrollIntoView()")
    shot(page, tmp_path, "2_training", full_page=False)
    expect(page.locator("#results-body")).to_be_visible(timeout=240_000)
    expect(page.locator("#train-progress .stage")).to_contain_text("Done: trained runs/run")
    expect(page.locator("#epochs tbody tr").first).to_be_visible()
    run = json.loads((root / "runs" / "run" / "metrics.json").read_text())
    expect(page.locator("#m-error")).to_have_text(f"{100 * run['error_rate']:.1f}%")
    expect(page.locator("#m-acc")).to_have_text(f"{100 * run['accuracy']:.1f}%")
    expect(page.locator("#m-valid")).to_have_text(str(run["n_valid"]))
    expect(page.locator("#confusion tbody tr")).to_have_count(3)
    expect(page.locator("#per-class tbody tr")).to_have_count(3)
    cells = [int(x) for x in page.locator("#confusion tbody td").all_inner_texts()]
    assert sum(cells) == run["n_valid"]
    shot(page, tmp_path, "3_trained")

    # findings (the issues job queued after training): relabel the dark photo, then undo that
    expect(page.locator("#findings")).to_be_visible(timeout=240_000)
    card = page.locator("#review-groups .review-grid[data-kind=dark] .card").first
    expect(card).to_contain_text("label: circle")
    card.locator("select").select_option("square")
    expect(card.locator(".decision")).to_have_text("relabel → square")
    expect(card).to_have_class(re.compile(r"\bd-relabel\b"))
    expect(page.locator("#review-progress")).to_contain_text("1 waiting for Apply fixes")
    page.get_by_role("button", name="Undo last decision").click()
    expect(card.locator(".decision")).to_have_text("")
    expect(page.locator("#review-progress")).to_contain_text("0 waiting for Apply fixes")
    assert journal_ops(root)[-2:] == ["decide", "undo"]
    page.locator("#results").scroll_into_view_if_needed()
    shot(page, tmp_path, "4_findings")

    # try it from the live webcam (the export job queued after issues makes the model it uses)
    page.get_by_role("button", name="Live webcam").click()
    expect(page.locator("#try-bars li")).to_have_count(3, timeout=240_000)
    expect(page.locator("#try-status")).to_contain_text("Live")
    assert page.locator("#try-label").inner_text() in ("circle", "square", "camera", "none of these")
    page.locator("#try").evaluate("(e) => e.scrollIntoView()")
    shot(page, tmp_path, "5_try", full_page=False)
    page.get_by_role("button", name="Stop webcam").click()

    # export: the button makes a job (done at once: the export exists), then the zip downloads
    expect(page.locator("#export-link")).to_be_visible(timeout=120_000)
    expect(page.locator("#export-btn")).to_be_enabled(timeout=120_000)  # while the export job runs, it waits
    expect(page.locator("#export-btn")).to_have_text("Export run again")
    page.locator("#export-btn").click()
    expect(page.locator("#jobs-table tbody tr[data-kind=export][data-state=done]")).to_have_count(2, timeout=120_000)
    with page.expect_download() as info:
        page.locator("#export-link").click()
    download = info.value
    assert download.suggested_filename == "run.zip"
    names = zipfile.ZipFile(download.path()).namelist()
    assert "run/model.json" in names and any(n.endswith((".onnx", ".safetensors")) for n in names)
    expect(page.locator("#next")).to_contain_text("Done")
    page.locator("#export").evaluate("(e) => e.scrollIntoView()")
    shot(page, tmp_path, "6_export", full_page=False)

    # a chosen photo too
    page.locator("#try-file").set_input_files([{"name": "c.png", "mimeType": "image/png", "buffer": png(draw_shape("circle", 50))}])
    expect(page.locator("#try-status")).to_have_text("Prediction")
    expect(page.locator("#try-bars li")).to_have_count(3)

    # delete the dark photo, apply, and take the apply back: the class count follows the folder
    dark_name = card.locator(".fname").inner_text()
    card.get_by_role("button", name="Delete").click()
    expect(card.locator(".decision")).to_have_text("delete")
    page.get_by_role("button", name="Apply fixes").click()
    expect(page.locator("#review-msg")).to_contain_text("Applied: 0 relabelled, 1 moved to quarantine, 0 kept")
    expect(card.locator(".decision")).to_have_text("in quarantine (applied)")
    expect(cards["circle"].locator(".count")).to_have_text("8 photos")
    assert not (root / dark_name).exists() and (root / "cleaned.csv").is_file()
    page.get_by_role("button", name="Undo apply").click()
    expect(page.locator("#review-msg")).to_contain_text("Undid the apply: 1 photo back")
    expect(cards["circle"].locator(".count")).to_have_text("9 photos")
    assert (root / dark_name).is_file()

    # a second tab (or a reload) shows the same state, from the API alone
    other, other_errors = new_page(camera_browser)
    other.goto(url)
    expect(other.locator(".class-card")).to_have_count(3)
    expect(other.locator("#m-error")).to_have_text(f"{100 * run['error_rate']:.1f}%")
    expect(other.locator("#jobs-table tbody tr[data-state=done]")).to_have_count(4)
    assert not errors and not other_errors, errors + other_errors


def test_studio_classes_rename_remove_undo_and_refusals(
    camera_browser: Any, studio: tuple[Path, str], tmp_path: Path, draw_shape: Callable[..., Image.Image]
) -> None:
    from playwright.sync_api import expect

    root, url = studio
    page, errors = new_page(camera_browser)
    page.goto(url)

    # names the studio refuses come back as the server's message, next to the form
    for bad in ("runs", ".hidden", "a/b"):
        page.fill("#new-class", bad)
        page.get_by_role("button", name="Add class").click()
        expect(page.locator("#add-class-msg")).to_have_class(re.compile(r"\bbad\b"))
        expect(page.locator("#add-class-msg")).not_to_be_empty()
    assert not any(p.is_dir() for p in root.iterdir() if p.name not in ("runs", "models", ".ursa"))
    card = add_class(page, "bears")
    page.fill("#new-class", "bears")
    page.get_by_role("button", name="Add class").click()
    expect(page.locator("#add-class-msg")).to_contain_text("bears")
    expect(page.locator(".class-card")).to_have_count(1)

    # training needs two classes with photos: the button says so instead of failing later
    card.locator("input.files").set_input_files([{"name": f"b{i}.png", "mimeType": "image/png", "buffer": png(draw_shape("circle", i))} for i in range(3)])
    expect(card.locator(".status")).to_contain_text("Added 3 photos")
    page.get_by_role("button", name="Train").click()
    expect(page.locator("#train-msg")).to_contain_text("at least 2 classes")
    expect(page.locator("#next")).to_contain_text("second class")

    # a whole folder (with a subfolder, and a file that is no image, which the page leaves out)
    folder = tmp_path / "holiday"
    (folder / "day2").mkdir(parents=True)
    for i, sub in enumerate(("", "", "day2")):
        draw_shape("circle", 10 + i).save(folder / sub / f"IMG_{i}.png")
    (folder / "notes.txt").write_text("not a photo")
    card.locator("input.folder").set_input_files(str(folder))
    expect(card.locator(".status")).to_have_text("Added 3 photos.")
    expect(card.locator(".count")).to_have_text("6 photos")

    # a photo dropped on the class, and one pasted while the class has focus (as the browser makes those events)
    make_event = """([target, kind, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "photo.png", { type: "image/png" }));
        const el = document.querySelector(target);
        el.focus();
        const ev = kind === "drop" ? new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true })
                                   : new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true });
        el.dispatchEvent(ev);
    }"""
    for i, kind in enumerate(("drop", "paste")):
        b64 = base64.b64encode(png(draw_shape("circle", 20 + i))).decode()
        page.evaluate(make_event, [".class-card[data-name=bears] .drop", kind, b64])
        expect(card.locator(".status")).to_have_text("Added 1 photo.")
        expect(card.locator(".count")).to_have_text(f"{7 + i} photos")
    assert len([p for p in (root / "bears").iterdir() if p.name.startswith("paste-")]) == 1

    # rename with the keyboard
    card.get_by_role("button", name="Rename class bears").click()
    page.keyboard.press("Control+A")
    page.keyboard.type("grizzly")
    page.keyboard.press("Enter")
    card = page.locator(".class-card[data-name=grizzly]")
    expect(card.locator(".name")).to_have_text("grizzly")
    expect(card.locator(".count")).to_have_text("8 photos")
    assert (root / "grizzly").is_dir() and not (root / "bears").exists()

    # remove: to the quarantine, with an Undo toast that brings it back
    card.get_by_role("button", name="Remove class grizzly").click()
    expect(page.locator("#toast")).to_be_visible()
    expect(page.locator("#toast")).to_contain_text("Removed class “grizzly”")
    expect(page.locator(".class-card")).to_have_count(0)
    assert not (root / "grizzly").exists()
    expect(page.locator("#removed")).to_contain_text("grizzly")
    shot(page, tmp_path, "removed", full_page=False)
    page.locator("#toast").get_by_role("button", name="Undo").click()
    expect(page.locator(".class-card[data-name=grizzly] .count")).to_have_text("8 photos")
    expect(page.locator("#toast")).to_be_hidden()
    assert len(list((root / "grizzly").iterdir())) == 8
    assert [op for op in journal_ops(root) if op.endswith("_class")] == ["add_class", "rename_class", "remove_class", "restore_class"]

    # an empty URL list is refused in the page; a list with no URLs by the server
    card = page.locator(".class-card[data-name=grizzly]")
    card.get_by_role("button", name="Paste URLs").click()
    card.locator("form.urls textarea").fill("just some words")
    card.locator("form.urls").get_by_role("button", name="Download").click()
    expect(card.locator(".status")).to_contain_text("no http(s) URLs")

    # Try it without a model says what to do first
    page.locator("#try-file").set_input_files([{"name": "x.png", "mimeType": "image/png", "buffer": png(draw_shape("square", 1))}])
    expect(page.locator("#try-status")).to_contain_text("train a model first")
    assert not errors, errors


def test_studio_url_list_download_job_and_cancel(camera_browser: Any, studio: tuple[Path, str], server: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    root, url = studio
    page, errors = new_page(camera_browser)
    page.goto(url)
    card = add_class(page, "bears")

    # a pasted list (3 images and a dead link, from a local server) becomes a job; the card shows its outcome
    card.get_by_role("button", name="Paste URLs").click()
    urls = [server.url(f"img/{i}.jpg") for i in (1, 2, 3)] + [server.url("status/404")]
    card.locator("form.urls textarea").fill("\n".join(urls))
    card.locator("form.urls").get_by_role("button", name="Download").click()
    expect(page.locator("#jobs-table tbody tr[data-kind=download]")).to_have_count(1)
    expect(card.locator(".status")).to_contain_text("Downloaded 3 photos", timeout=120_000)
    expect(card.locator(".status")).to_contain_text("1 failed")
    expect(card.locator(".count")).to_have_text("3 photos")
    expect(page.locator("#jobs-table tbody tr[data-kind=download][data-state=done]")).to_have_count(1)
    assert (root / ".ursa" / "manifest.csv").is_file()

    # a slow list, cancelled from the jobs table while it is queued or running
    server.delay = 1.0
    card.get_by_role("button", name="Paste URLs").click()
    card.locator("form.urls textarea").fill("\n".join(server.url(f"img/{i}.jpg") for i in range(10, 40)))
    card.locator("form.urls").get_by_role("button", name="Download").click()
    row = page.locator("#jobs-table tbody tr[data-kind=download]").first
    expect(row).to_have_attribute("data-state", re.compile("queued|running"), timeout=30_000)
    row.get_by_role("button", name=re.compile("Cancel")).click()
    expect(row).to_have_attribute("data-state", "cancelled", timeout=60_000)
    expect(card.locator(".status")).to_contain_text("cancelled")
    shot(page, tmp_path, "download", full_page=False)
    assert not errors, errors


def test_studio_page_works_with_a_token(camera_browser: Any, tmp_path: Path, app_server: Callable[..., Any], draw_shape: Callable[..., Image.Image]) -> None:
    """With a token (as off loopback) the printed ?token= address sets the cookie that the page's own
    requests (fetch, images) carry; without it the API refuses."""
    from playwright.sync_api import expect

    from ursa.web.studio.app import create_studio_app

    root = tmp_path / "project"
    token = "studio-token-0123456789"
    with app_server(create_studio_app(root, token=token)) as url:
        page, errors = new_page(camera_browser)
        resp = page.goto(f"{url}/api/project")
        assert resp is not None and resp.status == 403
        page.goto(f"{url}/?token={token}")
        assert "token" not in page.url
        expect(page.locator("#root")).to_have_text(str(root.resolve()))
        card = add_class(page, "otters")
        card.locator("input.files").set_input_files([{"name": "o.png", "mimeType": "image/png", "buffer": png(draw_shape("square", 3))}])
        expect(card.locator(".status")).to_have_text("Added 1 photo.")
        expect(card.locator(".thumbs img")).to_have_count(1)
        deadline = time.monotonic() + 10  # the thumbnail loads with the cookie, or stays broken (naturalWidth 0)
        while not card.locator(".thumbs img").evaluate("(img) => img.complete && img.naturalWidth") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert card.locator(".thumbs img").evaluate("(img) => img.naturalWidth") > 0
        assert not errors, errors
