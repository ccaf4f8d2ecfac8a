"""The studio's JSON API (issue 15): every route, every refusal (bad class names, path traversal, non-images,
oversized uploads, wrong content types, foreign Origin/Host, missing token), and one run from an empty project
through upload, training, results, review, prediction and export to the zip. The guard's checks run against a
real server on 127.0.0.1; the rest through FastAPI's TestClient (which runs the app's lifespan: the job worker)."""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import draw_example
from fastapi.testclient import TestClient
from PIL import Image

from ursa.errors import ServeError, StudioError
from ursa.web.security import raw_path_matcher
from ursa.web.studio.app import create_studio_app

EVIL = "http://evil.example"
TOKEN = "studio-token-for-tests"
CLASSES = ("bear", "cat", "dog")


def _jpeg(cls: int, i: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    draw_example(cls, i, size=size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _noise_jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _files(*bodies: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in bodies]


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[TestClient]:
    """A TestClient on a fresh project tmp_path/proj (lifespan run: the job worker is started and stopped)."""
    app = create_studio_app(tmp_path / "proj")
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host, as the guard requires
        yield client


def _detail(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"], body
    return body["detail"]


# ---- the guard's path templates ----------------------------------------------------------------------------


def test_raw_body_path_templates_match_one_segment_per_parameter() -> None:
    match = raw_path_matcher(["/predict", "/api/classes/{name}/images"])
    assert match("/predict") and match("/api/classes/cats/images") and match("/api/classes/a b/images")
    for path in ("/predict/x", "/api/classes/images", "/api/classes//images", "/api/classes/a/b/images", "/api/classes/cats/images/", "/api/classes/{name}/urls", "/other"):
        assert not match(path), path
    assert not raw_path_matcher([])("/predict")
    with pytest.raises(ServeError, match="start with '/'"):
        raw_path_matcher(["api/x"])


# ---- project and classes -----------------------------------------------------------------------------------


def test_empty_project_answers_and_refuses_what_needs_data(studio: TestClient) -> None:
    r = studio.get("/api/project")
    assert r.status_code == 200
    p = r.json()
    assert p["classes"] == [] and p["runs"] == [] and p["latest_run"] is None and p["jobs"] == []
    assert p["predictor"] == {"run": None, "ready": False}
    root = Path(p["root"])
    assert (root / "runs").is_dir() and (root / "models").is_dir()
    assert studio.get("/api/runs").json() == []
    assert studio.get("/api/jobs").json() == []
    for path in ("/api/runs/latest", "/api/runs/run", "/api/review", "/api/exports/run.zip", "/api/runs/run/files/metrics.json"):
        r = studio.get(path)
        assert r.status_code == 404, (path, r.text)
        _detail(r)
    r = studio.post("/api/predict", files={"file": ("p.jpg", _jpeg(0, 0), "image/jpeg")})
    assert r.status_code == 409 and "train a model first" in _detail(r)
    assert studio.post("/api/export", json={}).status_code == 404
    r = studio.post("/api/train", json={})
    assert r.status_code == 409 and "at least 2 classes" in _detail(r)
    for path, status in (("/api/runs/.hidden", 400), ("/api/runs/..%2F..%2Fetc", 404), ("/api/exports/.x.zip", 400), ("/api/runs/run/files/..%2F..%2Fx.png", 404)):
        assert studio.get(path).status_code == status, path
    assert "openapi" in studio.get("/openapi.json").json() and studio.get("/docs").status_code == 200


def test_add_rename_remove_restore_classes(studio: TestClient) -> None:
    r = studio.post("/api/classes", json={"name": "cats"})
    assert r.status_code == 201 and r.json()["name"] == "cats" and r.json()["count"] == 0
    r = studio.post("/api/classes", json={"name": "cats"})
    assert r.status_code == 409 and "exists" in _detail(r)
    root = Path(studio.get("/api/project").json()["root"])
    assert (root / "cats").is_dir()

    assert studio.post("/api/classes/cats/rename", json={"to": "kittens"}).status_code == 200
    assert not (root / "cats").exists() and (root / "kittens").is_dir()
    studio.post("/api/classes", json={"name": "dogs"})
    assert studio.post("/api/classes/kittens/rename", json={"to": "dogs"}).status_code == 409
    assert studio.post("/api/classes/nope/rename", json={"to": "x"}).status_code == 404

    studio.post("/api/classes/kittens/images", files=_files(("a.jpg", _jpeg(1, 0))))
    r = studio.request("DELETE", "/api/classes/kittens", headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["removed"] == "kittens" and out["undo"] == "/api/classes/kittens/restore"
    assert not (root / "kittens").exists() and list((root / ".ursa" / "quarantine").rglob("*.jpg"))  # moved, not deleted
    assert [c["name"] for c in studio.get("/api/project").json()["removed"]] == ["kittens"]
    assert studio.post(out["undo"], json={}).status_code == 200
    assert (root / "kittens").is_dir() and len(list((root / "kittens").iterdir())) == 1
    assert studio.post(out["undo"], json={}).status_code in (404, 409)  # nothing left to restore
    assert studio.request("DELETE", "/api/classes/nope", headers={"content-type": "application/json"}).status_code == 404
    ops = [json.loads(line)["op"] for line in (root / ".ursa" / "journal.jsonl").read_text().splitlines()]
    assert {"rename_class", "remove_class", "restore_class"} <= set(ops)


@pytest.mark.parametrize("name", ["", " ", "a/b", "a\\b", "..", ".hidden", "runs", "MODELS", "train", "valid", "x" * 65, "tab\there", "nul\x00"])
def test_bad_class_names_are_refused(studio: TestClient, name: str) -> None:
    r = studio.post("/api/classes", json={"name": name})
    assert r.status_code == 400, (name, r.text)
    _detail(r)
    root = Path(studio.get("/api/project").json()["root"])
    assert {p.name for p in root.iterdir()} <= {".ursa", "models", "runs"}  # nothing made


def test_bad_json_bodies_are_400_with_a_reason(studio: TestClient) -> None:
    for body, needle in ((b"{not json", "JSON"), (b"[]", "body"), (b'{"name": 3}', "name"), (b'{"name": "a", "extra": 1}', "unknown option 'extra'")):
        r = studio.post("/api/classes", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and needle in _detail(r), (body, r.text)


# ---- images ------------------------------------------------------------------------------------------------


def test_upload_images_each_file_gets_a_row(studio: TestClient) -> None:
    studio.post("/api/classes", json={"name": "bear"})
    good = [_jpeg(0, i) for i in range(3)]
    truncated = good[0][: len(good[0]) // 2]
    r = studio.post(
        "/api/classes/bear/images",
        files=_files(("../../evil.jpg", good[0]), ("b.jpg", good[1]), ("again.jpg", good[0]), ("note.txt", b"hello, not an image"), ("half.jpg", truncated), ("c.png", good[2])),
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert [row["status"] for row in out["results"]] == ["ok", "ok", "duplicate", "refused", "refused", "ok"]
    assert out["count"] == 3
    assert out["results"][0]["given"] == "../../evil.jpg"  # echoed, never used as a path
    root = Path(studio.get("/api/project").json()["root"])
    stored = sorted(p.name for p in (root / "bear").iterdir())
    assert len(stored) == 3 and all(n.startswith("upload-") and n.endswith(".jpg") for n in stored)  # Ursa's names, content sniffed
    assert not (root.parent / "evil.jpg").exists()
    assert all(row["reason"] for row in out["results"] if row["status"] == "refused")

    r = studio.post("/api/classes/bear/images", files=_files(("frame.jpg", _jpeg(0, 7))), data={"source": "webcam"})
    assert r.status_code == 200 and r.json()["results"][0]["file"].startswith("bear/webcam-")
    classes = studio.get("/api/project").json()["classes"]
    assert classes[0]["name"] == "bear" and classes[0]["count"] == 4 and len(classes[0]["thumbs"]) == 4

    # the image and its thumbnail
    rel = out["results"][0]["file"]
    assert studio.get("/api/img", params={"name": rel}).content == good[0]
    t = studio.get("/api/thumb", params={"name": rel, "side": 32})
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg" and t.content[:2] == b"\xff\xd8"


def test_upload_refusals(tmp_path: Path) -> None:
    app = create_studio_app(tmp_path / "proj", max_files=3, max_request_bytes=60_000, max_file_bytes=5_000, max_predict_bytes=50_000)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.post("/api/classes", json={"name": "bear"})
        small = _jpeg(0, 0, size=32)
        assert len(small) < 5_000
        big = _noise_jpeg(160)  # noise does not compress: about 30 KB
        assert 5_000 < len(big) and 3 * len(big) > 60_000 + 4096 * 3
        r = c.post("/api/classes/bear/images", files=_files(("s.jpg", small), ("big.jpg", big)))
        assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == ["ok", "refused"]
        assert "limit" in r.json()["results"][1]["reason"]
        r = c.post("/api/classes/bear/images", files=_files(*[(f"{i}.jpg", _jpeg(0, 10 + i, size=32)) for i in range(4)]))
        assert r.status_code == 413 and "3 files" in _detail(r)
        r = c.post("/api/classes/bear/images", files=_files(*[(f"{i}.jpg", big) for i in range(3)]))
        assert r.status_code == 413 and "MiB" in _detail(r)
        refusals = [
            (c.post("/api/classes/bear/images", files=_files(("s.jpg", small)), data={"source": "camera"}), 400, "source"),
            (c.post("/api/classes/bear/images", data={"source": "upload"}, files={"other": ("x.jpg", small, "image/jpeg")}), 400, "no files"),
            (c.post("/api/classes/bear/images", content=small, headers={"content-type": "image/jpeg"}), 400, "multipart"),
            (c.post("/api/classes/nope/images", files=_files(("s.jpg", small))), 404, "no class"),
            (c.post("/api/classes/.ursa/images", files=_files(("s.jpg", small))), 400, "'.'"),
            (c.post("/api/classes/runs/images", files=_files(("s.jpg", small))), 400, "runs"),
        ]
        big_photo = _noise_jpeg(400)
        r = c.post("/api/predict", content=big_photo, headers={"content-type": "image/jpeg"})
        assert r.status_code == 413 and "limit" in _detail(r)  # before any model is needed
        for r, status, needle in refusals:
            assert r.status_code == status and needle in _detail(r), (status, r.text)
        # an encoded slash cannot reach another folder: no route matches it, and the guard wants JSON there
        r = c.post("/api/classes/..%2F..%2Fx/images", files=_files(("s.jpg", small)))
        assert r.status_code in (404, 415)
        root = Path(c.get("/api/project").json()["root"])
        assert sorted(p.name for p in (root / "bear").iterdir()) == [f"upload-{hashlib.sha256(small).hexdigest()[:12]}.jpg"]


def test_image_routes_stay_inside_the_project(studio: TestClient) -> None:
    studio.post("/api/classes", json={"name": "bear"})
    rel = studio.post("/api/classes/bear/images", files=_files(("a.jpg", _jpeg(0, 0)))).json()["results"][0]["file"]
    root = Path(studio.get("/api/project").json()["root"])
    (root.parent / "secret.jpg").write_bytes(_jpeg(1, 1))
    (root / "bear" / "notes.txt").write_text("private")
    cases = {
        "../secret.jpg": 400,
        "bear/../../secret.jpg": 400,
        "/etc/passwd": 400,
        "": 400,
        ".ursa/journal.jsonl": 403,
        "runs/x.png": 403,
        "bear/notes.txt": 403,
        "bear/missing.jpg": 404,
    }
    for name, status in cases.items():
        for route in ("/api/img", "/api/thumb"):
            r = studio.get(route, params={"name": name})
            assert r.status_code == status, (route, name, r.text)
            _detail(r)
    assert studio.get("/api/img", params={"name": rel}).status_code == 200
    assert studio.get("/api/thumb", params={"name": rel, "side": 4}).status_code == 400  # side out of range


# ---- training options, jobs --------------------------------------------------------------------------------


def _two_classes(client: TestClient, n: int = 2) -> None:
    for c, name in enumerate(("bear", "cat")):
        client.post("/api/classes", json={"name": name})
        client.post(f"/api/classes/{name}/images", files=_files(*[(f"{i}.jpg", _jpeg(c, i)) for i in range(n)]))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"epochz": 3}, "unknown option 'epochz'"),
        ({"arch": "resnet50"}, "arch"),
        ({"size": "64"}, "size"),
        ({"size": 8}, "size"),
        ({"size": 64.5}, "size"),
        ({"views": -1}, "views"),
        ({"valid_pct": 1.5}, "valid"),
        ({"aug": "wild"}, "aug"),
        ({"fine_tune": True}, "fine_tune"),
        ({"name": "../up"}, "run folder"),
        ({"then": ["issues", "deploy"]}, "then"),
        ({"then": "export"}, "then"),
    ],
)
def test_bad_training_options_are_400(studio: TestClient, options: dict[str, Any], needle: str) -> None:
    _two_classes(studio)
    r = studio.post("/api/train", json=options)
    assert r.status_code == 400 and needle in _detail(r), r.text
    assert studio.get("/api/jobs").json() == []


def test_training_needs_two_classes_with_two_images(studio: TestClient) -> None:
    _two_classes(studio, n=1)
    r = studio.post("/api/train", json={"size": 64})
    assert r.status_code == 409 and "bear (1)" in _detail(r)


def test_job_ids_are_checked(studio: TestClient) -> None:
    for jid in ("nope", "0123456789ab", "..", "0123456789AB"):
        for method, path in (("GET", f"/api/jobs/{jid}"), ("GET", f"/api/jobs/{jid}/events"), ("POST", f"/api/jobs/{jid}/cancel")):
            r = studio.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 404, (path, r.text)
    assert studio.get("/api/jobs", params={"limit": 0}).status_code == 400


def test_url_list_becomes_a_download_job(studio: TestClient, server: Any) -> None:
    studio.post("/api/classes", json={"name": "bear"})
    text = "\n".join([server.url("img/1"), server.url("img/2"), server.url("status/404"), "", server.url("img/1")])
    for body, ctype, status, needle in (
        (b"not a url\nftp://x/y", "text/plain", 400, "no http"),
        (b"", "text/plain", 400, "no http"),
        (b"\xff\xfe\x00bad", "text/plain", 400, "UTF-8"),
    ):
        r = studio.post("/api/classes/bear/urls", content=body, headers={"content-type": ctype})
        assert r.status_code == status and needle in _detail(r), r.text
    assert studio.post("/api/classes/nope/urls", content=text.encode(), headers={"content-type": "text/plain"}).status_code == 404
    assert studio.post("/api/classes/bear/urls?max=0", content=text.encode(), headers={"content-type": "text/plain"}).status_code == 400
    r = studio.post("/api/classes/bear/urls?max=5", content=text.encode(), headers={"content-type": "text/plain"})
    assert r.status_code == 202, r.text
    jid = r.json()["job"]
    job = studio.app.state.jobs.wait(jid, 120)
    assert job["kind"] == "download" and job["state"] == "done", job
    assert job["result"]["ok"] == 2 and job["result"]["failed"] == 1
    assert studio.get("/api/project").json()["classes"][0]["count"] == 2
    assert studio.get(f"/api/jobs/{jid}").json()["state"] == "done"
    r = studio.post(f"/api/jobs/{jid}/cancel", json={})
    assert r.status_code == 409  # finished: nothing to cancel
    # the event stream of a finished job: its final snapshot, then the end
    with studio.stream("GET", f"/api/jobs/{jid}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert [e["state"] for e in events] == ["done"]


def test_cancel_a_running_job(studio: TestClient, server: Any) -> None:
    server.hang_s = 60.0  # the download waits on this URL until cancelled
    studio.post("/api/classes", json={"name": "bear"})
    jid = studio.post("/api/classes/bear/urls", content=server.url("hang/1").encode(), headers={"content-type": "text/plain"}).json()["job"]
    deadline = time.monotonic() + 60
    while studio.get(f"/api/jobs/{jid}").json()["state"] != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    r = studio.post(f"/api/jobs/{jid}/cancel", json={})
    assert r.status_code == 200, r.text
    assert studio.app.state.jobs.wait(jid, 30)["state"] == "cancelled"
    assert studio.get("/api/jobs").json()[0]["state"] == "cancelled"
    assert studio.post(f"/api/jobs/{jid}/cancel", json={}).status_code == 409


# ---- the guard, on a real server ---------------------------------------------------------------------------


def test_other_sites_and_other_hosts_are_refused(tmp_path: Path, app_server: Any) -> None:
    with app_server(create_studio_app(tmp_path / "proj")) as url, httpx.Client(base_url=url, timeout=30) as c:
        port = url.rsplit(":", 1)[1]
        refused = [
            c.post("/api/classes", json={"name": "x"}, headers={"origin": EVIL}),
            c.post("/api/classes", content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}),
            c.post("/api/classes", content=b'{"name": "x"}', headers={"content-type": "text/plain"}),
            c.request("DELETE", "/api/classes/x"),  # no JSON content type
            c.post("/api/train", content=b"{}", headers={"content-type": "text/plain"}),
            c.post("/api/classes/x/images", files=_files(("a.jpg", _jpeg(0, 0))), headers={"origin": EVIL}),
            c.post("/api/predict", content=_jpeg(0, 0), headers={"content-type": "image/jpeg", "host": f"evil.example:{port}"}),
            c.get("/api/project", headers={"host": "evil.example"}),
            c.get("/api/img", params={"name": "x/a.jpg"}, headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}),
        ]
        assert [r.status_code for r in refused] == [403, 415, 415, 415, 415, 403, 403, 403, 403]
        assert all(r.json()["detail"] for r in refused)
        assert not (tmp_path / "proj" / "x").exists()
        # the page's own requests: same origin, JSON; uploads on the template paths pass without JSON
        assert c.post("/api/classes", json={"name": "x"}, headers={"origin": url}).status_code == 201
        r = c.post("/api/classes/x/images", files=_files(("a.jpg", _jpeg(0, 0))), headers={"origin": url})
        assert r.status_code == 200 and r.json()["count"] == 1
        r = c.post("/api/classes/x/urls", content=b"no urls", headers={"content-type": "text/plain", "origin": url})
        assert r.status_code == 400  # past the guard, refused by the route


def test_token_off_loopback(tmp_path: Path, app_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("URSA_TOKEN", raising=False)
    with pytest.raises(ServeError, match="token"):
        create_studio_app(tmp_path / "p1", host="0.0.0.0")
    with app_server(create_studio_app(tmp_path / "p2", token=TOKEN)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/api/project").status_code == 403 and "token" in c.get("/api/project").json()["detail"]
        assert c.post("/api/classes", json={"name": "x"}).status_code == 403
        assert c.get("/api/project", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.post("/api/classes", json={"name": "x"}, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 201
        r = c.get("/", params={"token": TOKEN})
        assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
        assert c.get("/api/project").status_code == 200  # the cookie from now on


def test_train_valid_layout_is_refused(tmp_path: Path) -> None:
    for side in ("train", "valid"):
        (tmp_path / "ds" / side / "bear").mkdir(parents=True)
    with pytest.raises(StudioError, match="one folder per class"):
        create_studio_app(tmp_path / "ds")


# ---- the page --------------------------------------------------------------------------------------------


def test_page_and_static_files(studio: TestClient) -> None:
    from ursa.web.studio import app as studio_app

    if not (studio_app.WEB / "templates" / "studio.html").is_file():
        pytest.skip("the studio page (templates/studio.html) is not there yet")
    r = studio.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "mediastream:" in csp
    assert studio.get("/static/studio.js").status_code == 200


# ---- the CLI --------------------------------------------------------------------------------------------------


def test_studio_cli(run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_port: Any) -> None:
    import webbrowser

    import ursa.web.server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ursa.web.server, "run", lambda app, **kw: seen.update(kw, app=app))
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url))
    monkeypatch.delenv("URSA_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    port = free_port()
    code, out, err = run_cli("studio", "--no-browser", "--port", port)
    assert code == 0, err
    assert (tmp_path / "ursa-project" / "runs").is_dir() and f"http://127.0.0.1:{port}/" in out and "?token=" not in out
    assert seen["host"] == "127.0.0.1" and seen["port"] == port and seen["app"].title == "Ursa studio"
    code, out, err = run_cli("studio", tmp_path / "other", "--host", "0.0.0.0", "--port", port, "--no-browser")
    assert code == 0 and "?token=" in out and (tmp_path / "other").is_dir()
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "valid" / "a").mkdir(parents=True)
    code, _, err = run_cli("studio", tmp_path / "split", "--no-browser", "--port", port)
    assert code == 2 and "one folder per class" in " ".join(err.split())
    code, _, err = run_cli("studio", "--port", "0")
    assert code == 2
    assert opened == []


# ---- end to end ------------------------------------------------------------------------------------------------


def _events(client: TestClient, jid: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"/api/jobs/{jid}/events") as s:
        return [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]


@pytest.mark.slow
def test_empty_project_to_trained_model_to_zip(studio: TestClient) -> None:
    """3 classes x 6 generated images uploaded (and one picture filed twice) -> train (tiny config) -> live events ->
    metrics -> findings, a relabel and its undo -> predict -> export -> zip."""
    jobs = studio.app.state.jobs
    for c, name in enumerate(CLASSES):
        assert studio.post("/api/classes", json={"name": name}).status_code == 201
        r = studio.post(f"/api/classes/{name}/images", files=_files(*[(f"{i}.jpg", _jpeg(c, i)) for i in range(6)]))
        assert [x["status"] for x in r.json()["results"]] == ["ok"] * 6
    # a planted problem the review must show: the same picture filed under two classes
    assert studio.post("/api/classes/cat/images", files=_files(("copy.jpg", _jpeg(0, 0)))).json()["results"][0]["status"] == "ok"
    r = studio.post("/api/train", json={"size": 64, "views": 2, "seed": 0})
    assert r.status_code == 202, r.text
    jid = r.json()["job"]
    events = _events(studio, jid)  # live, until the final state
    assert events[-1]["state"] == "done", events[-1]
    assert len(events) >= 2 and events[-1]["progress"] == pytest.approx(1.0)
    run = events[-1]["result"]["run"]

    p = studio.get("/api/project").json()
    assert p["latest_run"] == run and p["runs"][-1]["name"] == run
    assert any(j["id"] == jid for j in p["jobs"])
    d = studio.get("/api/runs/latest").json()
    assert d == studio.get(f"/api/runs/{run}").json()
    assert d["name"] == run and 0 <= d["metrics"]["error_rate"] <= 1
    assert d["confusion"]["classes"] == list(CLASSES) and len(d["confusion"]["matrix"]) == 3
    assert sum(map(sum, d["confusion"]["matrix"])) == sum(m["support"] for m in d["per_class"])
    assert {"name", "label", "predicted", "prob", "img"} <= set(d["top_losses"][0])
    assert studio.get(d["top_losses"][0]["img"]).status_code == 200
    for url in d["plots"].values():
        r = studio.get(url)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert studio.get(f"/api/runs/{run}/files/metrics.json").json() == d["metrics"]
    for bad, status in (("config.yaml", 400), ("..%2Fconfig.json", 404), ("%2E%2E", 400), (".hidden.png", 400), ("nothere.png", 404)):
        assert studio.get(f"/api/runs/{run}/files/{bad}").status_code == status, bad
    assert studio.get("/api/runs/nope").status_code == 404

    # the jobs queued after training: export, then issues
    for j in studio.get("/api/jobs").json():
        if j["kind"] in ("issues", "export"):
            done = jobs.wait(j["id"], 300)
            assert done["state"] == "done", done
    d = studio.get("/api/runs/latest").json()
    assert d["issues_ready"] and d["export"]["zip"] == f"/api/exports/{run}.zip"

    # review: the run's findings, a decision and its undo (the review page's logic)
    rv = studio.get("/api/review").json()
    assert rv["run"].endswith(run) and rv["pending"] == 0
    flagged = {it["name"] for it in rv["items"].values()}
    assert any(n.startswith("cat/upload-") for n in flagged), flagged
    iid, item = next((k, it) for k, it in rv["items"].items() if it["name"].startswith("cat/"))
    r = studio.post("/api/review/decide", json={"id": iid, "action": "relabel", "label": "bear", "version": item["version"]})
    assert r.status_code == 200 and r.json()["item"]["decision"] == {"action": "relabel", "label": "bear"} and r.json()["pending"] == 1
    r = studio.post("/api/review/decide", json={"id": iid, "action": "keep", "version": item["version"]})
    assert r.status_code == 409  # stale version: another tab decided first
    assert studio.post("/api/review/decide", json={"id": iid, "action": "relabel", "label": "whale"}).status_code == 400
    assert studio.post("/api/review/undo", json={}).json()["pending"] == 0
    assert studio.get("/api/review").json()["items"][iid]["decision"] is None
    assert studio.post("/api/review/decide", json={"id": "zz", "action": "keep"}).status_code == 400
    assert studio.post("/api/review/decide", json={"id": "0123456789ab", "action": "keep"}).status_code == 404
    assert studio.post("/api/review/undo", json={}).status_code == 409  # nothing to undo
    assert studio.post("/api/review/undo-apply", json={}).status_code == 409

    # try it: the newest export answers as `ursa serve` does
    r = studio.post("/api/predict", files={"file": ("p.jpg", _jpeg(1, 50), "image/jpeg")})
    assert r.status_code == 200, r.text
    pred = r.json()
    assert {"label", "index", "prob", "best", "rejected", "top", "ms", "threshold"} <= set(pred) and pred["best"] in CLASSES
    assert studio.post("/api/predict", content=_jpeg(2, 51), headers={"content-type": "image/jpeg"}).status_code == 200
    assert studio.post("/api/predict", content=b"<html>", headers={"content-type": "text/html"}).status_code == 415
    assert studio.get("/api/project").json()["predictor"] == {"run": run, "ready": True}

    # export again: the folder is there, the job links the zip
    r = studio.post("/api/export", json={"run": run})
    assert r.status_code == 202
    ex = jobs.wait(r.json()["job"], 120)
    assert ex["state"] == "done" and studio.get(f"/api/jobs/{ex['id']}").json()["result"]["zip"] == f"/api/exports/{run}.zip"
    assert studio.post("/api/export", json={"run": "nope"}).status_code == 404
    assert studio.post("/api/export", json={"run": "../x"}).status_code == 400
    r = studio.get(f"/api/exports/{run}.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        assert f"{run}/model.json" in names and json.loads(zf.read(f"{run}/model.json"))["classes"] == list(CLASSES)
