"""Labelling `ursa next`'s picks on the review page (`ursa review DATA --run RUN --pool DIR`): copies into the
class folders, journal lines, undo to the quarantine, cleaned.csv kept in step, the pool never changed."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import _draw_shape
from ursa.errors import ReviewError
from ursa.review import dataset_labels, label_from_pool, pool_status, undo_pool_image
from ursa.web.review_app import create_review_app, image_id

H = {"Content-Type": "application/json"}


def _pool(tmp_path: Path, run: Path) -> tuple[Path, list[Path]]:
    """tmp_path/pool with three photos, and run/next.csv picking them."""
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    files = [pool / "a.png", pool / "sub" / "b.png", pool / "c photo.png"]
    for i, f in enumerate(files):
        _draw_shape("circle", 70 + i, seed=3).save(f)
    with open(run / "next.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "guess", "confidence", "reason"])
        for f in files:
            w.writerow([str(f.resolve()), "circle", "0.55", "uncertain between circle and square (55% vs 40%)"])
    return pool, files


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def pool_case(review_case: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, Path, list[Path]]:
    root, run = review_case
    pool, files = _pool(tmp_path, run)
    return root, run, pool, files


def test_label_accept_pick_skip_undo_through_the_page(pool_case) -> None:
    root, run, pool, files = pool_case
    before = _digest(pool)
    client = TestClient(create_review_app(root, run, pool=pool), base_url="http://127.0.0.1")  # a loopback Host, as the app requires
    st = client.get("/api/state").json()
    assert st["pool"]["ids"] == [image_id(str(f.resolve())) for f in files]
    a, b, c = st["pool"]["ids"]
    assert st["pool"]["items"][a]["status"] == "open" and st["pool"]["items"][b]["name"] == "sub/b.png"
    assert st["kinds"]  # the findings of issues.csv are still there
    assert client.get(f"/img/{a}").content == files[0].read_bytes()

    r = client.post("/api/pool/label", json={"id": a, "label": "circle"}, headers=H)  # accept the guess
    assert r.status_code == 200, r.text
    item = r.json()["item"]
    assert item["status"] == "labelled" and item["label"] == "circle" and item["copy"].startswith("circle/pool-a-")
    assert (root / item["copy"]).read_bytes() == files[0].read_bytes()
    assert dataset_labels(root)[item["copy"]] == "circle"
    r = client.post("/api/pool/label", json={"id": b, "label": "square"}, headers=H)  # pick another class
    copy_b = r.json()["item"]["copy"]
    assert copy_b.startswith("square/pool-b-") and (root / copy_b).is_file()
    assert client.post("/api/pool/skip", json={"id": c}, headers=H).json()["item"]["status"] == "skipped"
    assert not list(root.rglob("pool-c*"))

    # refused: labelled twice, a label that is not a class, an unknown or malformed id
    assert client.post("/api/pool/label", json={"id": a, "label": "square"}, headers=H).status_code == 409
    assert client.post("/api/pool/label", json={"id": c, "label": "dragon"}, headers=H).status_code == 400
    assert client.post("/api/pool/label", json={"id": "0" * 12, "label": "circle"}, headers=H).status_code == 404
    assert client.post("/api/pool/skip", json={"id": "../x"}, headers=H).status_code == 400

    r = client.post("/api/pool/undo", json={"id": b}, headers=H)  # the copy goes to the quarantine
    assert r.json()["item"]["status"] == "open"
    assert not (root / copy_b).exists() and (root / ".ursa" / "quarantine" / copy_b).is_file()
    assert copy_b not in dataset_labels(root)
    assert client.post("/api/pool/undo", json={"id": b}, headers=H).status_code == 409  # nothing left to undo
    assert client.post("/api/pool/undo", json={"id": c}, headers=H).json()["item"]["status"] == "open"

    ops = [ln["op"] for ln in map(__import__("json").loads, (root / ".ursa" / "journal.jsonl").read_text().splitlines())]
    assert ops == ["pool_label", "pool_label", "pool_skip", "pool_undo", "pool_undo"]
    assert _digest(pool) == before  # the pool is never changed
    page = client.get("/").text
    assert "review.js" in page


def test_cleaned_csv_gets_and_loses_the_row(pool_case) -> None:
    root, run, pool, files = pool_case
    (root / "cleaned.csv").write_text("name,label\n" + "".join(f"{n},{lab}\n" for n, lab in dataset_labels(root).items()))
    line = label_from_pool(root, files[1], "triangle", labels=["circle", "square", "triangle"])
    rows = list(csv.DictReader(open(root / "cleaned.csv")))
    assert {"name": line["name"], "label": "triangle"} in rows
    assert dataset_labels(root)[line["name"]] == "triangle"
    undo_pool_image(root, files[1])
    rows = list(csv.DictReader(open(root / "cleaned.csv")))
    assert line["name"] not in {r["name"] for r in rows}
    assert pool_status(root)[str(files[1])].status == "open"
    # labelled again after the undo: a second copy, under a name of its own (the first is in the quarantine)
    again = label_from_pool(root, files[1], "triangle", labels=["circle", "square", "triangle"])
    assert (root / again["name"]).is_file()


def test_labelling_a_file_gone_from_the_pool_is_refused(pool_case) -> None:
    root, run, pool, files = pool_case
    files[0].rename(pool / "moved.png")
    with pytest.raises(ReviewError, match="not there any more"):
        label_from_pool(root, files[0], "circle", labels=["circle"])


def test_pool_page_needs_the_picks_of_that_pool(pool_case, tmp_path: Path, run_cli) -> None:
    root, run, pool, files = pool_case
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ReviewError, match="made for another pool"):
        create_review_app(root, run, pool=other)
    with pytest.raises(ReviewError, match="does not exist"):
        create_review_app(root, run, pool=tmp_path / "nope")
    (run / "next.csv").unlink()
    code, out, err = run_cli("review", root, "--run", run, "--pool", pool, "--no-browser")
    assert code == 2 and "ursa next" in err


@pytest.mark.browser
def test_pool_picks_in_the_browser(browser, pool_case, app_server) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    root, run, pool, files = pool_case
    with app_server(create_review_app(root, run, pool=pool)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        cards = page.locator(".grid[data-kind=pool] .card")
        expect(cards).to_have_count(3)
        expect(page.locator("#kind-pool")).to_have_text("Label next (3)")
        first = cards.nth(0)
        expect(first).to_contain_text("guess: circle")
        first.get_by_role("button", name="Accept: circle").click()
        expect(first.locator(".decision")).to_contain_text("labelled circle → circle/pool-a-")
        cards.nth(1).get_by_label("pick class").select_option("square")
        expect(cards.nth(1).locator(".decision")).to_contain_text("labelled square")
        cards.nth(2).get_by_role("button", name="Skip").click()
        expect(cards.nth(2).locator(".decision")).to_have_text("skipped")
        expect(page.locator("#pool-progress")).to_have_text("3 of 3 picks done · 2 copied into the dataset")
        page.reload()  # the journal is the state
        expect(cards.nth(1).locator(".decision")).to_contain_text("labelled square")
        cards.nth(1).get_by_role("button", name="Undo").click()
        expect(cards.nth(1).locator(".decision")).to_have_text("")
        expect(cards.nth(1).get_by_role("button", name="Skip")).to_be_enabled()
        assert len(list((root / "square").glob("pool-*"))) == 0 and len(list((root / "circle").glob("pool-*"))) == 1
        assert not errors, errors
