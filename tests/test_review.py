"""The review journal, apply / undo (byte for byte), the review web API and the `ursa review` command."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ursa.errors import ReviewError
from ursa.review import Review, ReviewConflict, dataset_labels
from ursa.web.review_app import create_review_app, image_id


def _csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["name"]: r["label"] for r in csv.DictReader(fh)}


def test_decisions_fold_latest_wins_and_undo(review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    rv = Review(root)
    rv.decide("square/001.png", "relabel", label="circle")
    rv.decide("square/001.png", "delete")
    assert rv.state().decision("square/001.png")["action"] == "delete"
    rv.undo()
    assert rv.state().decision("square/001.png")["label"] == "circle"
    rv.undo()
    assert rv.state().decision("square/001.png") is None
    with pytest.raises(ReviewError, match="nothing to undo"):
        rv.undo()
    assert len(rv.lines()) == 4  # append-only: two decisions, two undos


def test_stale_version_conflicts_and_changes_nothing(review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    rv = Review(root)
    rv.decide("square/001.png", "keep", expected_version=0)
    before = rv.journal.read_bytes()
    with pytest.raises(ReviewConflict, match="changed since"):
        rv.decide("square/001.png", "delete", expected_version=0)
    assert rv.journal.read_bytes() == before


def test_bad_decisions_are_refused(review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    rv = Review(root)
    with pytest.raises(ReviewError, match="unknown action"):
        rv.decide("square/001.png", "burn")
    with pytest.raises(ReviewError, match="not a class"):
        rv.decide("square/001.png", "relabel", label="whale", labels=["circle", "square"])
    with pytest.raises(ReviewError, match="inside the dataset"):
        rv.decide("../outside.png", "delete")
    assert rv.lines() == []


def test_apply_then_undo_restores_byte_for_byte(review_case, tree_digest) -> None:  # noqa: ANN001
    root, _ = review_case
    before = tree_digest(root)
    rv = Review(root)
    rv.decide("square/001.png", "relabel", label="circle")
    rv.decide("circle/copy.png", "delete")
    rv.decide("triangle/002.png", "keep")
    line = rv.apply()
    labels = _csv(root / "cleaned.csv")
    assert labels["square/001.png"] == "circle" and "circle/copy.png" not in labels and labels["triangle/002.png"] == "triangle"
    assert len(labels) == len(before) - 1
    assert not (root / "circle/copy.png").exists()
    assert (root / ".ursa/quarantine/circle/copy.png").is_file()
    assert line["counts"] == {"keep": 1, "relabel": 1, "delete": 1}
    assert rv.state().decisions() == {}
    # the next round starts from cleaned.csv
    assert dataset_labels(root)["square/001.png"] == "circle"
    rv.undo_apply()
    assert tree_digest(root) == before
    assert len(rv.state().decisions()) == 3  # the decisions are pending again
    ops = [json.loads(x)["op"] for x in rv.journal.read_text().splitlines()]
    assert ops == ["decide", "decide", "decide", "apply", "applied", "unapply"]  # the plan, its completion, its undo


def test_apply_keeps_a_users_cleaned_csv(review_case, tree_digest) -> None:  # noqa: ANN001
    root, _ = review_case
    labels = dataset_labels(root)
    user = "name,label\n" + "".join(f"{n},{lab}\n" for n, lab in labels.items())
    (root / "cleaned.csv").write_text(user)
    before = tree_digest(root)
    rv = Review(root)
    rv.decide("square/003.png", "delete")
    line = rv.apply()
    assert (root / line["csv"]["backup"]).read_text() == user
    rv.undo_apply()
    assert tree_digest(root) == before


def test_apply_and_undo_errors(review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    rv = Review(root)
    with pytest.raises(ReviewError, match="nothing to apply"):
        rv.apply()
    with pytest.raises(ReviewError, match="no applied review"):
        rv.undo_apply()
    rv.decide("square/003.png", "delete")
    rv.apply()
    (root / ".ursa/quarantine/square/003.png").write_bytes(b"changed")
    with pytest.raises(ReviewError, match="changed after"):
        rv.undo_apply()
    with pytest.raises(ReviewError, match="does not exist"):
        Review(root / "missing")


# ---- the web API -----------------------------------------------------------------------------------


@pytest.fixture
def client(review_case) -> TestClient:  # noqa: ANN001
    root, run = review_case
    return TestClient(create_review_app(root, run), base_url="http://127.0.0.1")  # a loopback Host, as the app requires


def test_state_groups_findings_by_kind(client: TestClient) -> None:
    s = client.get("/api/state").json()
    assert [k["kind"] for k in s["kinds"]] == ["label", "duplicate", "dark"]
    item = s["items"][image_id("square/001.png")]
    assert item["label"] == "square" and item["findings"][0]["suggested"] == "circle" and item["version"] == 0
    assert client.get("/").status_code == 200 and "review.js" in client.get("/").text
    assert client.get("/static/review.js").status_code == 200


def test_images_only_by_known_id_from_inside_the_root(client: TestClient, review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    r = client.get(f"/img/{image_id('square/001.png')}")
    assert r.status_code == 200 and r.content == (root / "square/001.png").read_bytes()
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "square%2F001.png", "ABCDEF012345"):
        r = client.get(f"/img/{bad}")
        assert r.status_code in (400, 404), bad
        assert "error" in r.json() or r.status_code == 404
    r = client.get("/img/0123456789ab")
    assert r.status_code == 404 and "unknown image id" in r.json()["error"]
    assert client.get("/img/../../etc/passwd").status_code == 404


def test_decide_errors_change_nothing(client: TestClient, review_case) -> None:  # noqa: ANN001
    root, _ = review_case
    iid = image_id("square/001.png")
    assert client.post("/api/decide", json={"id": "../../x", "action": "delete"}).status_code == 400
    assert client.post("/api/decide", json={"id": "0123456789ab", "action": "delete"}).status_code == 404
    assert client.post("/api/decide", json={"id": iid, "action": "burn"}).status_code == 400
    assert client.post("/api/decide", json={"id": iid, "action": "relabel", "label": "whale"}).status_code == 400
    assert client.post("/api/decide", content=b"not json", headers={"content-type": "application/json"}).status_code == 400
    assert not (root / ".ursa/journal.jsonl").exists() or (root / ".ursa/journal.jsonl").read_text() == ""
    r = client.post("/api/decide", json={"id": iid, "action": "relabel", "label": "circle", "version": 0})
    assert r.status_code == 200 and r.json()["item"]["version"] == 1
    # a second tab still showing version 0 loses the race, and nothing changes
    before = (root / ".ursa/journal.jsonl").read_bytes()
    r = client.post("/api/decide", json={"id": iid, "action": "delete", "version": 0})
    assert r.status_code == 409 and "Reload" in r.json()["error"]
    assert (root / ".ursa/journal.jsonl").read_bytes() == before
    assert client.post("/api/undo", json={}).status_code == 200
    assert client.post("/api/undo", json={}).status_code == 409
    assert client.post("/api/apply", json={}).status_code == 409


def test_review_cli_apply_undo(review_case, tree_digest, run_cli) -> None:  # noqa: ANN001
    root, run = review_case
    before = tree_digest(root)
    Review(root).decide("square/003.png", "delete")
    code, out, err = run_cli("review", root, "--apply")
    assert code == 0, err
    assert "cleaned.csv" in out and not (root / "square/003.png").exists()
    code, out, err = run_cli("review", root, "--undo")
    assert code == 0, err
    assert tree_digest(root) == before
    code, _, err = run_cli("review", root, "--undo")
    assert code == 2 and "nothing to undo" in err
    code, _, err = run_cli("review", root)
    assert code == 2 and "--run" in err


def test_review_cli_serves_the_page(review_case, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import ursa.web.server

    root, run = review_case
    seen = {}
    monkeypatch.setattr(ursa.web.server, "run", lambda app, **kw: seen.update(app=app, **kw))
    code, out, err = run_cli("review", root, "--run", run, "--no-browser", "--port", "8799")
    assert code == 0, err
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8799 and "http://127.0.0.1:8799/" in out


def test_cleaned_csv_defines_the_next_dataset(review_case) -> None:  # noqa: ANN001
    from ursa.config import DataConfig
    from ursa.data.split import build_split

    root, _ = review_case
    rv = Review(root)
    rv.decide("square/001.png", "relabel", label="circle")
    rv.decide("circle/copy.png", "delete")
    rv.apply()
    split = build_split(root, DataConfig(labels=str(root / "cleaned.csv"), valid_pct=0.25))
    items = {it.name: it.label for it in [*split.train, *split.valid]}
    assert items["square/001.png"] == "circle" and "circle/copy.png" not in items and split.how == "csv"


def test_apply_and_undo_wait_for_a_run_holding_the_dataset_lock(review_case, tree_digest) -> None:  # noqa: ANN001
    """A download or verify changing the folder holds its lock; an apply meanwhile would race it."""
    from ursa._io import dataset_lock
    from ursa.errors import CollectError

    root, _ = review_case
    rv = Review(root)
    rv.decide("square/001.png", "delete")
    before = tree_digest(root)
    (root / ".ursa").mkdir(exist_ok=True)
    with dataset_lock(root, "download", error=CollectError), pytest.raises(ReviewError, match="download"):
        rv.apply()
    assert tree_digest(root) == before
    rv.apply()
    assert not (root / "square/001.png").exists()
    with dataset_lock(root, "verify", error=CollectError), pytest.raises(ReviewError, match="verify"):
        rv.undo_apply()
    rv.undo_apply()
    assert (root / "square/001.png").is_file()


# ---- update_cleaned: cleaned.csv kept in step with the studio's class changes ----------------------------------


def test_update_cleaned_does_nothing_without_a_csv(review_case) -> None:  # noqa: ANN001
    from ursa.review import update_cleaned

    root, _ = review_case
    assert update_cleaned(root, add=[("circle/new.png", "circle")], drop_class="square") is None
    assert not (root / "cleaned.csv").exists()
    assert not any(ln["op"] == "cleaned" for ln in Review(root).lines())


def test_update_cleaned_adds_drops_and_renames_with_a_backup_and_a_journal_line(review_case) -> None:  # noqa: ANN001
    from ursa.review import update_cleaned

    root, _ = review_case
    (root / "cleaned.csv").write_text("name,label,split\ncircle/000.png,circle,train\nsquare/001.png,circle,valid\nsquare/002.png,square,train\ntriangle/000.png,triangle,train\n")
    before = (root / "cleaned.csv").read_bytes()
    line = update_cleaned(root, add=[("circle/new.png", "circle"), ("circle/000.png", "circle")])
    assert line["op"] == "cleaned" and line["added"] == [["circle/new.png", "circle"]]  # a listed name is not added twice
    assert (root / line["backup"]).read_bytes() == before
    rows = list(csv.reader(open(root / "cleaned.csv", newline="")))
    assert rows[0] == ["name", "label", "split"] and rows[-1] == ["circle/new.png", "circle", ""]  # other columns kept
    line = update_cleaned(root, rename_class=("square", "box"))
    assert line["renamed"] == 2 and line["rename"] == ["square", "box"]
    assert _csv(root / "cleaned.csv") == {"circle/000.png": "circle", "box/001.png": "circle", "box/002.png": "box", "triangle/000.png": "triangle", "circle/new.png": "circle"}
    line = update_cleaned(root, drop_class="circle")  # its folder's rows, and rows labelled with it
    assert sorted(map(tuple, line["dropped"])) == [("box/001.png", "circle"), ("circle/000.png", "circle"), ("circle/new.png", "circle")]
    assert _csv(root / "cleaned.csv") == {"box/002.png": "box", "triangle/000.png": "triangle"}
    assert line["sha256"] == hashlib.sha256((root / "cleaned.csv").read_bytes()).hexdigest()
    assert [ln["op"] for ln in Review(root).lines()] == ["cleaned"] * 3
    assert len(list((root / ".ursa/review/backups").iterdir())) == 3


def test_update_cleaned_refuses_when_pending_decisions_name_the_class(review_case) -> None:  # noqa: ANN001
    from ursa.review import check_class_change, update_cleaned

    root, _ = review_case
    (root / "cleaned.csv").write_text("name,label\nsquare/001.png,square\n")
    before = (root / "cleaned.csv").read_bytes()
    Review(root).decide("square/001.png", "keep")
    with pytest.raises(ReviewError, match=r"cannot remove class 'square': 1 pending review decisions name its images \(square/001.png\). Apply or undo them first"):
        update_cleaned(root, drop_class="square")
    Review(root).decide("circle/000.png", "relabel", label="triangle")  # a relabel *to* the class counts too
    with pytest.raises(ReviewError, match="cannot rename class 'triangle'"):
        update_cleaned(root, rename_class=("triangle", "tri"))
    with pytest.raises(ReviewError, match="cannot remove class 'square'"):
        check_class_change(root, "square", what="remove")  # refused with no cleaned.csv too: the decision would point nowhere
    assert (root / "cleaned.csv").read_bytes() == before
    update_cleaned(root, drop_class="eel")  # a class no decision names is fine


def test_update_cleaned_refuses_a_csv_it_cannot_read(review_case) -> None:  # noqa: ANN001
    from ursa.review import update_cleaned

    root, _ = review_case
    (root / "cleaned.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(ReviewError, match=r"has columns \['file', 'class'\]; it needs name and label"):
        update_cleaned(root, add=[("circle/000.png", "circle")])
    (root / "cleaned.csv").write_bytes(b"name,label\n\xff\xfe,x\n")
    with pytest.raises(ReviewError, match="cannot read .*cleaned.csv"):
        update_cleaned(root, add=[("circle/000.png", "circle")])
