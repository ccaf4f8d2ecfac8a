"""A real HTTP server on 127.0.0.1 that misbehaves on request, shared by the collect tests (and checked here)."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

__all__ = ["FaultServer", "make_jpeg", "make_png", "bomb_png", "server"]


def make_jpeg(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A tiny JPEG whose pixels (and so bytes) depend on `seed`."""
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    img.putpixel((seed % size[0], 0), (255 - (seed % 256), 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_png(seed: int, size: tuple[int, int] = (20, 20), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size, (seed % 256, 100, 50) if mode == "RGB" else seed % 256)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (its data would decompress to gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultServer  # type: ignore[assignment]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        return

    def _send(self, status: int, body: bytes, ctype: str = "image/jpeg", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.hits[path] += 1
            hits = srv.hits[path]
            srv.agents.append(self.headers.get("User-Agent", ""))
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            if srv.delay:
                time.sleep(srv.delay)
            self._route(path, hits)
        finally:
            with srv.lock:
                srv.inflight -= 1

    def _route(self, path: str, hits: int) -> None:
        srv = self.server
        kind, _, arg = path.strip("/").partition("/")
        if kind == "img":  # /img/<n>[.ext][;junk]: a distinct JPEG per n
            self._send(200, make_jpeg(int(arg.split(".")[0].split(";")[0])))
        elif kind == "png":
            self._send(200, make_png(int(arg.split(".")[0])), "image/png")
        elif kind == "same":  # the same bytes under many URLs
            self._send(200, make_jpeg(999))
        elif kind == "status":
            self._send(int(arg), b"nope", "text/plain")
        elif kind == "flaky":  # 503 twice, then the image
            if hits <= 2:
                self._send(503, b"busy", "text/plain", {"Retry-After": "0"})
            else:
                self._send(200, make_jpeg(77))
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Sign in to see this image</body></html>", "text/html")
        elif kind == "empty":
            self._send(200, b"")
        elif kind == "bomb":
            self._send(200, bomb_png(), "image/png")
        elif kind == "big":
            self._send(200, make_jpeg(5) + b"\x00" * srv.big_bytes)
        elif kind == "bigstream":  # no Content-Length: the limit must apply while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(make_jpeg(6) + b"\x00" * srv.big_bytes)
            self.close_connection = True
        elif kind == "truncated":  # promises more bytes than it sends, then hangs up
            body = make_jpeg(8, (64, 64))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif kind == "truncfile":  # a complete response whose file is a truncated JPEG
            body = make_jpeg(9, (64, 64))
            self._send(200, body[: len(body) * 2 // 3])
        elif kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif kind == "hang":  # sends nothing until the client gives up
            time.sleep(srv.hang_s)
            self.close_connection = True
        elif kind == "drip":  # headers at once, then one byte at a time
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(int(srv.hang_s / 0.05)):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            self.close_connection = True
        elif kind == "loop":
            self._send(302, b"", "text/plain", {"Location": f"/loop/{arg}"})
        elif kind == "redirect":
            self._send(301, b"", "text/plain", {"Location": f"/img/{arg}"})
        elif kind == "toggle":  # 404 while srv.broken, then an image
            if srv.broken:
                self._send(404, b"not yet", "text/plain")
            else:
                self._send(200, make_jpeg(66))
        elif kind == "ua":  # refuses clients that do not look like a browser
            if "Mozilla/" in (self.headers.get("User-Agent") or ""):
                self._send(200, make_jpeg(55))
            else:
                self._send(403, b"forbidden", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")


class FaultServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server; `url(path)` gives the address of a route; `hits` counts requests per path."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.agents: list[str] = []
        self.delay = 0.0  # seconds added before every response
        self.hang_s = 3.0  # how long /hang and /drip keep a client waiting
        self.big_bytes = 3 * 2**20
        self.broken = True  # /toggle fails while True
        self.inflight = 0  # requests being answered now, and the most at once
        self.max_inflight = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path.lstrip('/')}"


@pytest.fixture
def server() -> Iterator[FaultServer]:
    srv = FaultServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_serves_images_and_faults(server: FaultServer) -> None:
    assert httpx.get(server.url("img/3.jpg")).content == make_jpeg(3)
    assert httpx.get(server.url("status/404")).status_code == 404
    with pytest.raises(httpx.TooManyRedirects):
        httpx.get(server.url("loop/x"), follow_redirects=True)


def test_bomb_png_claims_huge_size() -> None:
    with Image.open(io.BytesIO(bomb_png(50_000, 10))) as img:
        assert img.size == (50_000, 10)
