"""The prediction page in headless Chromium (Debian's `chromium`, driven by Playwright): choose a photo,
drop one, send a non-image; the answer and its bars appear. Saves screenshots under tmp_path."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Built

pytestmark = pytest.mark.browser

def playwright_expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


@pytest.fixture(scope="module")
def server_url(built: Built, app_server):  # noqa: ANN001
    """The app under a real Uvicorn on 127.0.0.1, in a thread of this process."""
    from ursa.web.predict_app import create_predict_app

    with app_server(create_predict_app(built.export)) as url:
        yield url + "/"


def test_upload_shows_the_prediction(browser, server_url: str, built: Built, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 900, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server_url)
    assert "tiny" in page.title() and "bear, cat, dog" in page.inner_text("header")
    page.set_input_files("#file", str(built.photo))
    # Locator waits, not wait_for_function: the page's CSP forbids the eval that one uses.
    playwright_expect(page.locator("#status")).to_have_text("Prediction", timeout=60_000)
    label = page.inner_text("#label")
    assert label in ("bear", "cat", "dog", "none of these")
    bars = page.locator("#bars li")
    assert bars.count() == 3
    assert page.locator("#bars li").first.inner_text().split()[0] in ("bear", "cat", "dog")
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 500
    shot = tmp_path / "predict_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("URSA_SCREENSHOT_DIR"):  # to look at it: URSA_SCREENSHOT_DIR=/tmp/shots pytest -m browser
        Path(os.environ["URSA_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["URSA_SCREENSHOT_DIR"]) / shot.name)
    assert not errors
    page.close()


def test_drop_and_non_image(browser, server_url: str, built: Built) -> None:
    page = browser.new_page()
    page.goto(server_url)
    b64 = base64.b64encode(built.photo.read_bytes()).decode()
    # A drop event carrying a file, as the browser makes when a photo is dragged onto the zone.
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""",
        b64,
    )
    # Locator waits, not wait_for_function: the page's CSP forbids the eval that one uses.
    playwright_expect(page.locator("#status")).to_have_text("Prediction", timeout=60_000)
    assert page.locator("#bars li").count() == 3
    # A text file with an image name: the server says 415 and the page shows its message.
    page.set_input_files("#file", files=[{"name": "fake.jpg", "mimeType": "image/jpeg", "buffer": b"not an image at all"}])
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "not an image" in page.inner_text("#error")
    page.close()
