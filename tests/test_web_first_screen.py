"""Every page's first screen in headless Chromium (issue 12, item 15), and the page opened with the token
`ursa serve` prints (item 1). Screenshots go to tmp_path, and to $URSA_SCREENSHOT_DIR when set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Built

pytestmark = pytest.mark.browser

TOKEN = "t0ken-for-the-browser-test"


def _keep(shot: Path) -> None:
    if os.environ.get("URSA_SCREENSHOT_DIR"):
        Path(os.environ["URSA_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["URSA_SCREENSHOT_DIR"]) / shot.name)


def test_prediction_page_first_screen_has_no_empty_result_box(browser, built: Built, tmp_path: Path, app_server) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    from ursa.web.predict_app import create_predict_app

    with app_server(create_predict_app(built.export)) as url:
        page = browser.new_page(viewport={"width": 900, "height": 700})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        expect(page.locator("#drop")).to_be_visible()
        # the reported bug: a broken-image box reading "the photo you sent" before any photo was chosen
        expect(page.locator("#result")).to_be_hidden()
        expect(page.locator("#preview")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()
        assert page.locator("#result").bounding_box() is None
        shot = tmp_path / "predict_first_screen.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        # and once there is a photo, the box appears with it
        page.set_input_files("#file", str(built.photo))
        expect(page.locator("#status")).to_have_text("Prediction", timeout=60_000)
        expect(page.locator("#preview")).to_be_visible()
        assert not errors, errors
        page.close()


def test_review_page_first_screen(browser, tmp_path: Path, review_case, app_server) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    from ursa.web.review_app import create_review_app

    root, run = review_case
    with app_server(create_review_app(root, run)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        expect(page.locator(".grid[data-kind=label] .card").first).to_be_visible()
        expect(page.locator("#status")).to_be_hidden()
        expect(page.locator("#progress")).not_to_have_text("loading…")
        shot = tmp_path / "review_first_screen.png"
        page.screenshot(path=str(shot))
        _keep(shot)
        assert not errors, errors
        page.close()


def test_the_printed_token_address_opens_a_working_page(browser, built: Built, tmp_path: Path, app_server) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    from ursa.web.predict_app import create_predict_app

    with app_server(create_predict_app(built.export, token=TOKEN)) as url:
        page = browser.new_page()
        assert page.goto(url + "/").status == 403  # no token, no page
        page.goto(f"{url}/?token={TOKEN}")
        assert page.url == url + "/"  # the token left the address bar for an HttpOnly cookie
        cookies = {c["name"]: c for c in page.context.cookies()}
        cookie = cookies[f"ursa_token_{url.rsplit(':', 1)[1]}"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # not readable by scripts
        page.set_input_files("#file", str(built.photo))  # the page's own POST carries the cookie
        expect(page.locator("#status")).to_have_text("Prediction", timeout=60_000)
        page.close()
