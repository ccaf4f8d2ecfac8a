"""The prediction server under hostile load (issue 12, items 5 and 6): oversized and surplus uploads are
refused before their bodies are read, slow and idle connections are dropped within seconds, an abandoned
upload is one log line, and serving does not inherit the training allocator tuning. Real servers on
127.0.0.1 and raw sockets."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from ursa.export import load_model
from ursa.web.predict_app import create_predict_app
from ursa.web.server import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, IDLE_TIMEOUT_S

if TYPE_CHECKING:
    from conftest import Built


@pytest.fixture(scope="module")
def live(built: Built, tmp_path_factory: pytest.TempPathFactory, serve_process):  # noqa: ANN001
    """`ursa serve` as a real process with a 1 MiB upload limit; yields (URL, log file)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(built.export, log, "--max-upload-mb", "1") as (url, _):
        yield url, log


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _head(url: str, path: str, length: int, ctype: str = "image/jpeg") -> bytes:
    host, port = _addr(url)
    return f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n".encode()


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    sock.settimeout(limit_s)
    t0, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return got, time.monotonic() - t0


def _read_response(sock: socket.socket, limit_s: float) -> bytes:
    """One response (headers and a Content-Length body), without waiting for the connection to close."""
    sock.settimeout(limit_s)
    got = b""
    while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(re.search(rb"content-length: (\d+)", got.lower()).group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_declared_oversize_is_refused_before_the_body(live) -> None:  # noqa: ANN001
    url, _ = live
    with socket.create_connection(_addr(url)) as s:
        s.sendall(_head(url, "/predict", 50_000_000))  # 50 MB announced, not one byte of it sent
        got, seconds = _read_until_closed(s, 10)
    assert got.startswith(b"HTTP/1.1 413") and b"over the limit of 1 MiB" in got
    assert b"connection: close" in got.lower() and seconds < 3  # answered at once, then closed: no body read


def test_a_busy_server_answers_503_without_reading_the_body(built: Built, app_server) -> None:  # noqa: ANN001
    predictor = load_model(built.export)
    real, started = predictor.predict_image, threading.Event()

    def slow(data, **kw):  # noqa: ANN001, ANN003, ANN202
        started.set()
        time.sleep(1.5)
        return real(data, **kw)

    predictor.predict_image = slow
    app = create_predict_app(predictor, concurrency=1, max_queue=0)
    with app_server(app) as url:
        first: list[int] = []
        t = threading.Thread(target=lambda: first.append(httpx.post(url + "/predict", content=built.photo.read_bytes(), timeout=30).status_code))
        t.start()
        assert started.wait(20)
        with socket.create_connection(_addr(url)) as s:
            s.sendall(_head(url, "/predict", 900_000))  # under the limit; the body never comes
            t0 = time.monotonic()
            got = _read_response(s, 3)
        assert got.startswith(b"HTTP/1.1 503") and b"busy" in got and time.monotonic() - t0 < 1.0
        t.join(30)
        assert first == [200]
        # once the slot is free again, the next upload is served
        assert httpx.post(url + "/predict", content=built.photo.read_bytes(), timeout=30).status_code == 200


def test_slow_and_idle_connections_are_dropped_and_logged_in_one_line(live) -> None:  # noqa: ANN001
    url, log = live
    host, port = _addr(url)
    cases = {
        "idle": b"",
        "partial headers": f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Ag".encode(),
        "partial body": _head(url, "/predict", 500_000) + b"\xff\xd8\xff" + b"\0" * 1000,
        "trickled headers": f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n".encode(),
    }
    results: dict[str, tuple[bytes, float]] = {}

    def run(name: str, data: bytes) -> None:
        with socket.create_connection((host, port)) as s:
            s.sendall(data)
            if name == "trickled headers":  # a header line every second: never idle, never complete
                s.settimeout(0.2)
                for i in range(20):
                    try:
                        s.sendall(f"X-{i}: a\r\n".encode())
                        if s.recv(65536) == b"":
                            break
                    except TimeoutError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    time.sleep(0.8)
            results[name] = _read_until_closed(s, 30)

    threads = [threading.Thread(target=run, args=item) for item in cases.items()]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    limit = max(IDLE_TIMEOUT_S, HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 2.5
    assert time.monotonic() - t0 < limit + 1
    assert set(results) == set(cases)
    assert results["partial headers"][0].startswith(b"HTTP/1.1 408")
    assert results["idle"][0] == b"" and results["partial body"][0] == b""

    # an upload abandoned half-way by its client
    with socket.create_connection((host, port)) as s:
        s.sendall(_head(url, "/predict", 500_000) + b"\0" * 100_000)
        time.sleep(0.3)
    time.sleep(1.0)
    assert httpx.get(url + "/health", timeout=5).status_code == 200  # the server carries on
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI application" not in text
    assert text.count("connection closed: request headers incomplete") == 2  # the partial and the trickled headers
    assert text.count("connection closed: request body stalled") == 1
    assert len(re.findall(r"the client went away after \d+ bytes of the request body", text)) == 1


def test_a_normal_keep_alive_client_is_not_dropped_while_it_waits_for_an_answer(built: Built, app_server) -> None:  # noqa: ANN001
    predictor = load_model(built.export)
    real = predictor.predict_image

    def slow(data, **kw):  # noqa: ANN001, ANN003, ANN202
        time.sleep(BODY_TIMEOUT_S + 1.5)  # longer than any timeout: the server is slow, not the client
        return real(data, **kw)

    predictor.predict_image = slow
    with app_server(create_predict_app(predictor)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/predict", content=built.photo.read_bytes()).status_code == 200


def test_only_training_commands_tune_the_allocator(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    import ursa.train.runtime

    calls: list[int] = []
    monkeypatch.setattr(ursa.train.runtime, "tune_allocator", lambda: calls.append(1) or True)
    for args in (("serve", tmp_path / "none"), ("review", tmp_path / "none", "--apply"), ("predict", tmp_path / "none", tmp_path / "x.jpg")):
        run_cli(*args)
    assert calls == []
    run_cli("train", tmp_path / "none")
    assert calls == [1]
    if sys.platform.startswith("linux"):  # the server's own setting: large buffers go back when freed
        from ursa.web.server import return_large_buffers

        assert return_large_buffers()
