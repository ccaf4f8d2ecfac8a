"""Who may talk to the web apps (issue 12, item 1): other web sites cannot write through the review page,
a foreign Host (DNS rebinding) is refused on every route, and a server reachable from other machines
needs its token. Real servers on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from ursa.errors import ServeError
from ursa.review import Review
from ursa.web.predict_app import create_predict_app
from ursa.web.review_app import create_review_app, image_id
from ursa.web.security import resolve_token

EVIL = "http://evil.example"
TOKEN = "t0ken-for-the-tests-only"

if TYPE_CHECKING:
    from conftest import Built


def _dataset_state(root: Path, tree_digest: Callable[[Path], dict[str, str]]) -> tuple[dict[str, str], bytes, bool]:
    journal = root / ".ursa/journal.jsonl"
    return tree_digest(root), journal.read_bytes() if journal.exists() else b"", (root / ".ursa/quarantine").exists()


def test_other_sites_cannot_decide_apply_or_undo(review_case, tree_digest, app_server) -> None:  # noqa: ANN001
    root, run = review_case
    Review(root).decide("circle/copy.png", "delete")  # a pending decision: an apply would move a file
    before = _dataset_state(root, tree_digest)
    iid = image_id("circle/copy.png")
    with app_server(create_review_app(root, run)) as url, httpx.Client(base_url=url, timeout=10) as c:
        own = url  # the page's own origin
        refused = [
            # the reported attack: a cross-origin form POST
            c.post("/api/apply", content=b"x=1", headers={"origin": EVIL, "content-type": "application/x-www-form-urlencoded"}),
            # the same form where the browser sends no Origin, and text/plain bodies a form can also send
            c.post("/api/apply", content=b"x=1", headers={"content-type": "application/x-www-form-urlencoded"}),
            c.post("/api/decide", content=json.dumps({"id": iid, "action": "keep"}).encode(), headers={"content-type": "text/plain"}),
            c.post("/api/undo-apply", content=b"", headers={"content-type": "text/plain"}),
            c.post("/api/undo", content=b"--b--", headers={"content-type": "multipart/form-data; boundary=b"}),
            # JSON, but from another origin, or through a re-pointed name (DNS rebinding)
            c.post("/api/apply", json={}, headers={"origin": EVIL}),
            c.post("/api/apply", json={}, headers={"origin": "null"}),
            c.post("/api/apply", json={}, headers={"host": f"evil.example:{url.rsplit(':', 1)[1]}", "origin": f"http://evil.example:{url.rsplit(':', 1)[1]}"}),
            c.post("/api/decide", json={"id": iid, "action": "keep"}, headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"}),
            # reads too: a rebinding page must not read the state or the images
            c.get("/api/state", headers={"host": "evil.example"}),
            c.get(f"/img/{iid}", headers={"host": "attacker.test:80"}),
            c.get(f"/img/{iid}", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}),
        ]
        assert [r.status_code for r in refused] == [403, 415, 415, 415, 415, 403, 403, 403, 403, 403, 403, 403]
        assert all("error" in r.json() for r in refused)  # the review page's error field, with a message
        assert "JSON" in refused[1].json()["error"] and "cross-origin" in refused[0].json()["error"]
        assert _dataset_state(root, tree_digest) == before
        assert not (root / "cleaned.csv").exists()

        # the page's own requests pass: loopback names with the port, same-origin JSON, a navigation from a link
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert c.get("/api/state", headers={"host": host}).status_code == 200, host
        assert c.get("/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}).status_code == 200
        r = c.post("/api/apply", json={}, headers={"origin": own, "sec-fetch-site": "same-origin"})
        assert r.status_code == 200, r.text
    assert not (root / "circle/copy.png").exists() and (root / "cleaned.csv").is_file()


def test_prediction_server_checks_host_and_origin(built: Built, app_server) -> None:  # noqa: ANN001
    photo = built.photo.read_bytes()
    with app_server(create_predict_app(built.export)) as url, httpx.Client(base_url=url, timeout=30) as c:
        files = {"file": ("p.jpg", photo, "image/jpeg")}
        assert c.post("/predict", files=files, headers={"origin": EVIL}).status_code == 403
        assert c.post("/predict", files=files, headers={"host": "evil.example"}).status_code == 403
        assert c.get("/model", headers={"host": "rebound.example:80"}).status_code == 403
        r = c.get("/health", headers={"host": "evil.example"})
        assert "Host" in r.json()["detail"]
        # the page itself, the same origin, and API clients that send no Origin
        assert c.post("/predict", files=files, headers={"origin": url}).status_code == 200
        assert c.post("/predict", content=photo, headers={"content-type": "image/jpeg"}).status_code == 200


def test_a_non_loopback_bind_needs_a_token(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("URSA_TOKEN", raising=False)
    with pytest.raises(ServeError, match="token"):
        create_predict_app(built.export, host="0.0.0.0")
    with pytest.raises(ServeError, match="16 to 256"):
        create_predict_app(built.export, host="0.0.0.0", token="short")
    assert resolve_token("127.0.0.1") is None and resolve_token("::1") is None and resolve_token("localhost") is None
    made = resolve_token("0.0.0.0")
    assert made is not None and len(made) >= 24 and made != resolve_token("0.0.0.0")
    assert resolve_token("0.0.0.0", TOKEN) == TOKEN
    monkeypatch.setenv("URSA_TOKEN", TOKEN)
    assert resolve_token("0.0.0.0") == TOKEN and resolve_token("127.0.0.1") == TOKEN


def test_token_by_header_query_and_cookie(built: Built, app_server) -> None:  # noqa: ANN001
    with app_server(create_predict_app(built.export, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=30) as c:
        port = url.rsplit(":", 1)[1]
        assert c.get("/health").status_code == 403
        assert "token" in c.get("/").json()["detail"]
        assert c.get("/health", headers={"authorization": "Bearer wrong-token-of-good-length"}).status_code == 403
        assert c.get("/health", params={"token": TOKEN[:-1] + "x"}).status_code == 403
        assert c.get("/health", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = c.post("/predict", content=built.photo.read_bytes(), headers={"authorization": f"bearer {TOKEN}", "content-type": "image/jpeg"})
        assert r.status_code == 200
        # the printed address: the page swaps the token in its URL for a cookie its own requests carry
        r = c.get("/", params={"token": TOKEN, "x": "1"})
        assert r.status_code == 303 and r.headers["location"] == "/?x=1"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"ursa_token_{port}={TOKEN}") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert c.get("/?x=1").status_code == 200  # the client kept the cookie
        assert c.get("/static/predict.js").status_code == 200
        c.cookies.clear()
        assert c.get("/static/predict.js").status_code == 403
        # the token does not replace the Host and Origin checks
        assert c.get("/health", headers={"authorization": f"Bearer {TOKEN}", "origin": EVIL}).status_code == 403


def test_serve_cli_prints_a_token_off_loopback(run_cli, built: Built, monkeypatch: pytest.MonkeyPatch, free_port) -> None:  # noqa: ANN001
    import ursa.web.predict_app

    seen: dict = {}
    monkeypatch.setattr(ursa.web.predict_app, "serve", lambda model, **kw: seen.update(kw))
    monkeypatch.delenv("URSA_TOKEN", raising=False)
    port = free_port()
    code, out, err = run_cli("serve", built.export, "--host", "0.0.0.0", "--port", port)
    assert code == 0, err
    token = seen["token"]
    assert token and f"http://0.0.0.0:{port}/?token={token}" in out and "Bearer" in err.replace("\n", " ")
    code, out, _ = run_cli("serve", built.export, "--port", port)
    assert code == 0 and seen["token"] is None and "?token=" not in out
    monkeypatch.setenv("URSA_TOKEN", TOKEN)
    code, out, _ = run_cli("serve", built.export, "--host", "0.0.0.0", "--port", port)
    assert code == 0 and seen["token"] == TOKEN and f"?token={TOKEN}" in out
    code, _, err = run_cli("serve", built.export, "--host", "0.0.0.0", "--port", port, "--token", "short")
    assert code == 2 and "16 to 256" in err.replace("\n", " ")
