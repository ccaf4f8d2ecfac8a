"""The review page in headless Chromium (Debian's `chromium`, driven by Playwright): relabel, delete, reload,
undo, apply; then cleaned.csv, the quarantine and the journal are checked. Saves a screenshot under tmp_path
(and into $URSA_SCREENSHOTS when set)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

@pytest.fixture
def served(review_case, app_server):  # noqa: ANN001
    from ursa.web.review_app import create_review_app

    root, run = review_case
    with app_server(create_review_app(root, run)) as url:
        yield root, url + "/"


def test_review_page_relabel_delete_reload_undo_apply(browser, served, tmp_path: Path) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    root, url = served
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda d: d.accept())
    page.goto(url)
    label_card = page.locator(".grid[data-kind=label] .card").first
    copy_card = page.locator(".grid[data-kind=duplicate] .card", has_text="circle/copy.png")
    expect(label_card).to_contain_text("suggested: circle")
    expect(page.locator("h2")).to_have_count(3)

    # relabel with the keyboard: the first card has focus; `a` accepts the suggested label
    page.keyboard.press("a")
    expect(label_card).to_have_class(re.compile(r"\bd-relabel\b"))
    expect(label_card.locator(".decision")).to_have_text("relabel → circle")
    # delete with a button
    copy_card.get_by_role("button", name="Delete").click()
    expect(copy_card).to_have_class(re.compile(r"\bd-delete\b"))
    expect(page.locator("#progress")).to_contain_text("2 pending")

    # a reload loses nothing
    page.reload()
    expect(label_card).to_have_class(re.compile(r"\bd-relabel\b"))
    expect(copy_card).to_have_class(re.compile(r"\bd-delete\b"))

    # undo takes back the latest decision (the delete); then delete again with the keyboard
    page.get_by_role("button", name="Undo").click()
    expect(copy_card).not_to_have_class(re.compile(r"\bd-delete\b"))
    copy_card.locator("img").click()
    page.keyboard.press("x")
    expect(copy_card).to_have_class(re.compile(r"\bd-delete\b"))
    # keep the dark one with the keyboard
    page.locator(".grid[data-kind=dark] .card img").click()
    page.keyboard.press("s")
    expect(page.locator(".grid[data-kind=dark] .card")).to_have_class(re.compile(r"\bd-keep\b"))

    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#status")).to_contain_text("Applied: 1 relabelled, 1 moved to quarantine, 1 kept")
    expect(label_card.locator(".labels b").first).to_have_text("circle")  # the page shows the dataset as it now stands
    expect(copy_card.locator(".decision")).to_have_text("in quarantine (applied)")
    shot = tmp_path / "review.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    if os.environ.get("URSA_SCREENSHOTS"):
        Path(os.environ["URSA_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["URSA_SCREENSHOTS"]) / "review.png")
    assert not errors, errors

    with open(root / "cleaned.csv", newline="") as fh:
        labels = {r["name"]: r["label"] for r in csv.DictReader(fh)}
    assert labels["square/001.png"] == "circle"
    assert "circle/copy.png" not in labels and len(labels) == 12
    assert (root / ".ursa/quarantine/circle/copy.png").is_file() and not (root / "circle/copy.png").exists()
    ops = [json.loads(x) for x in (root / ".ursa/journal.jsonl").read_text().splitlines()]
    assert [o["op"] for o in ops] == ["decide", "decide", "undo", "decide", "decide", "apply", "applied"]
    assert ops[-2]["moves"][0]["name"] == "circle/copy.png"
