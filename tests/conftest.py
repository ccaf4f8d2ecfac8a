"""Shared fixtures: tiny generated image datasets, CLI runners, a dataset with planted problems and a run on it,
a tiny exported model, real servers on 127.0.0.1 (the apps, and one that misbehaves on request for the collect
tests), and tiny encoded images and folder helpers for the verify tests. No network, no shared data needed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
# no test downloads weights: the hub (and ursa.models' reachability check) read only the local caches
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Distinct colour and shape per class, so even a tiny model separates them.
_STYLES = [((220, 40, 40), "ellipse"), ((40, 160, 60), "rectangle"), ((40, 70, 220), "triangle"), ((230, 200, 40), "cross")]


def draw_example(cls: int, i: int, *, size: int = 64, seed: int = 0) -> Image.Image:
    """One generated image of class `cls` (variant `i`): a coloured shape on a noisy background."""
    rng = np.random.default_rng([seed, cls, i])
    bg = (rng.integers(0, 60, (size, size, 3)) + 100).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    color, shape = _STYLES[cls % len(_STYLES)]
    m = int(size * 0.15) + int(rng.integers(0, size // 8))
    box = (m, m, size - m, size - m)
    if shape == "ellipse":
        d.ellipse(box, fill=color)
    elif shape == "rectangle":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=color)
    else:
        w = size // 8
        d.rectangle((size // 2 - w, m, size // 2 + w, size - m), fill=color)
        d.rectangle((m, size // 2 - w, size - m, size // 2 + w), fill=color)
    return im


def make_dataset(root: Path, *, classes: int = 3, per_class: int = 8, size: int = 64, fmt: str = "png", seed: int = 0) -> Path:
    """root/<class_k>/<i>.<fmt> images; returns root."""
    names = ["bear", "cat", "dog", "eel"]
    for c in range(classes):
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_example(c, i, size=size, seed=seed).save(d / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """3 classes x 8 generated 64 px PNGs under tmp_path/data."""
    return make_dataset(tmp_path / "data")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `ursa ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from ursa.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def console_script(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """`console_script(*argv)`: run `ursa ARGV` as the console script does (`main()` reading sys.argv); returns
    (exit code, stdout, stderr with its line breaks folded, so a message wrapped to the terminal still matches)."""
    from ursa.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["ursa", *argv])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, " ".join(err.split())

    return run


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature caches of tests never land in the user's home; one per session keeps reruns fast."""
    if "URSA_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("URSA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ursa-cache"))
    monkeypatch.setenv("COLUMNS", "160")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and kept off the network (its background services would otherwise try to reach out).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium(*extra_args: str) -> Iterator[object]:
    """Debian's Chromium driven by Playwright, launched with CHROMIUM_ARGS and `extra_args`; skipped when absent,
    a failure when CI is set. For module-scoped fixtures (`browser` here, the studio's camera browser)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: apt-get install -y chromium (.ci/run does this).")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
        yield b
        b.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (see `chromium`)."""
    yield from chromium()


# ---- a dataset with planted problems, and one training run on it (interpret, issues and review tests) --------
# Three classes, each a coloured shape drawn at a random place, size and angle on a varied background (so images
# of one class differ as much as photos do, and only planted copies are near duplicates). Planted: flipped labels,
# an exact copy under another label, a re-encoded copy, and dark / blurry / tiny images.

PLANTED_CLASSES = ("circle", "square", "triangle")
_SHAPE_COLORS = {"circle": (220, 40, 40), "square": (40, 170, 60), "triangle": (40, 70, 230)}


def _draw_shape(cls: str, i: int, *, size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng([seed, PLANTED_CLASSES.index(cls), i])
    base = rng.integers(90, 170) + rng.integers(-20, 20, 3)  # greyish, tinted
    grad = np.linspace(0, 1, size)[None, :, None] * rng.integers(-60, 60, 3)
    noise = rng.integers(-6, 6, (size, size, 3))
    im = Image.fromarray(np.clip(base + grad + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):  # distractor strokes in random colours
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.integers(0, 255, 3)), width=int(rng.integers(1, 4)))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    color = _SHAPE_COLORS[cls]
    if cls == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif cls == "square":
        d.regular_polygon((cx, cy, r), 4, rotation=float(rng.uniform(0, 90)), fill=color)
    else:
        d.regular_polygon((cx, cy, r), 3, rotation=float(rng.uniform(0, 120)), fill=color)
    return im


@pytest.fixture
def draw_shape() -> Callable[..., Image.Image]:
    """`draw_shape(cls, i, *, size=64, seed=0)`: one image of class `cls` ("circle", "square", "triangle"), variant `i`."""
    return _draw_shape


@dataclass
class Planted:
    root: Path
    flipped: dict[str, str] = field(default_factory=dict)  # name -> true class
    exact_copy: tuple[str, str] = ("", "")  # (original, copy under another label)
    near_copy: tuple[str, str] = ("", "")  # (original, re-encoded copy, same label)
    dark: str = ""
    blurry: str = ""
    tiny: str = ""


def _make_planted(root: Path, *, per_class: int = 24, seed: int = 0) -> Planted:
    p = Planted(root)
    for cls in PLANTED_CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw_shape(cls, i, seed=seed).save(root / cls / f"{i:03d}.png")
    # flipped labels: a picture of one class filed under another
    for k, (true, wrong) in enumerate([("circle", "square"), ("square", "circle"), ("triangle", "circle")]):
        name = f"{wrong}/f{k}.png"
        _draw_shape(true, 100 + k, seed=seed).save(root / name)
        p.flipped[name] = true
    # the same picture under two labels (exact copy)
    shutil.copyfile(root / "square/005.png", root / "circle/copy_of_square005.png")
    p.exact_copy = ("square/005.png", "circle/copy_of_square005.png")
    # a re-encoded copy with the same label (near duplicate)
    Image.open(root / "triangle/007.png").convert("RGB").save(root / "triangle/near007.jpg", quality=95)
    p.near_copy = ("triangle/007.png", "triangle/near007.jpg")
    # quality problems
    dark = np.asarray(_draw_shape("circle", 200, seed=seed), np.float32) * 0.06
    Image.fromarray(dark.astype(np.uint8)).save(root / "circle/dark.png")
    p.dark = "circle/dark.png"
    _draw_shape("square", 201, seed=seed).filter(ImageFilter.GaussianBlur(8)).save(root / "square/blurry.png")
    p.blurry = "square/blurry.png"
    _draw_shape("triangle", 202, size=20, seed=seed).save(root / "triangle/tiny.png")
    p.tiny = "triangle/tiny.png"
    return p


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Planted, Path]:
    """(what was planted where, the run folder): the planted dataset and a run trained on it, once per session."""
    from ursa.config import DataConfig, TrainConfig
    from ursa.train.recipe import train_run

    base = tmp_path_factory.mktemp("planted")
    planted = _make_planted(base / "planted")
    res = train_run(planted.root, base / "runs" / "planted", data=DataConfig(seed=0), train=TrainConfig(size=64, epochs=3, views=2), progress=False)
    return planted, res.out


@pytest.fixture
def review_case(tmp_path: Path) -> tuple[Path, Path]:
    """(root, run): a small dataset under tmp_path/data and a run folder tmp_path/run holding only config.json and
    a hand-written issues.csv (no training): two label issues, a duplicate pair and a dark image."""
    import csv
    import json

    root = tmp_path / "data"
    for cls in PLANTED_CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            _draw_shape(cls, i).save(root / cls / f"{i:03d}.png")
    shutil.copyfile(root / "circle/000.png", root / "circle/copy.png")
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"root": str(root), "classes": list(PLANTED_CLASSES)}))
    rows = [
        ["label", "square/001.png", "square", "train", "circle", "0.97", "0.02", "", "model says circle"],
        ["label", "triangle/002.png", "triangle", "valid", "square", "0.88", "0.05", "", "model says square"],
        ["duplicate", "circle/000.png", "circle", "train", "", "", "1.0", "g1", "exact copies"],
        ["duplicate", "circle/copy.png", "circle", "train", "", "", "1.0", "g1", "exact copies"],
        ["dark", "square/003.png", "square", "train", "", "", "0.05", "", "mean brightness 0.05"],
    ]
    with open(run / "issues.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "name", "label", "split", "suggested", "confidence", "score", "group", "detail"])
        w.writerows(rows)
    return root, run


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and ".ursa" not in p.relative_to(root).parts}


@pytest.fixture(scope="session")
def tree_digest() -> Callable[[Path], dict[str, str]]:
    """`tree_digest(root)`: relative path -> sha256 of every file under `root` outside `.ursa/` (the dataset as a
    user sees it)."""
    return _tree_digest


# ---- one tiny trained run and its export (export and serving tests) ----------------------------------------


@dataclass
class Built:
    data: Path  # dataset root
    run: Path  # training run folder
    export: Path  # export folder (fp32)
    result: Any  # ursa.train.recipe.RunResult (the in-memory model)
    onnx_bytes: bytes  # model.onnx, for tests that re-export without converting again
    photo: Path  # a 500x375 JPEG of class 0 ("bear")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """efficientnet_lite0 trained at 64 px for 2 epochs on 3 classes x 8 generated images, and exported; once per session."""
    from ursa.config import DataConfig, TrainConfig
    from ursa.export import export_run
    from ursa.train.recipe import train_run

    base = tmp_path_factory.mktemp("export")
    data = make_dataset(base / "data", classes=3, per_class=8, size=64, fmt="jpg")
    res = train_run(data, base / "runs" / "tiny", data=DataConfig(seed=0), train=TrainConfig(arch="efficientnet_lite0", size=64, epochs=2, views=2), progress=False)
    exp = export_run(res.out, base / "models" / "tiny")
    photo = base / "photo.jpg"
    draw_example(0, 99, size=400).resize((500, 375)).save(photo, quality=90)
    return Built(data, res.out, exp.out, res, (exp.out / "model.onnx").read_bytes(), photo)


# ---- real servers on 127.0.0.1 (web tests) -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """`free_port()`: a TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_port


@contextmanager
def _app_server(app: Any, **options: Any) -> Iterator[str]:
    import uvicorn

    from ursa.web.server import server_config

    port = _free_port()
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def app_server() -> Callable[..., AbstractContextManager[str]]:
    """`with app_server(app, **options) as url`: `app` under `ursa.web.server.server_config` (Ursa's Uvicorn
    configuration) on 127.0.0.1, in a thread of the test process."""
    return _app_server


@contextmanager
def _serve_process(model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    import httpx

    port = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ursa", "serve", str(model), "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {env['URSA_TOKEN']}"} if env and env.get("URSA_TOKEN") else {}
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", headers=headers, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ursa serve did not start: {log.read_text(errors='replace')}")
        time.sleep(0.2)
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def serve_process() -> Callable[..., AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]]:
    """`with serve_process(model, log, *args, env=None) as (url, process)`: `python -m ursa serve MODEL --port P
    ARGS...` as its own process, stdout and stderr in `log`, once it answers /health."""
    return _serve_process


# ---- tiny encoded images (collect and verify tests) --------------------------------------------------------


def _make_jpeg(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    img.putpixel((seed % size[0], 0), (255 - (seed % 256), 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _make_png(seed: int, size: tuple[int, int] = (20, 20), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size, (seed % 256, 100, 50) if mode == "RGB" else seed % 256)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def make_jpeg() -> Callable[..., bytes]:
    """`make_jpeg(seed, size=(24, 16))`: a tiny JPEG whose pixels (and so bytes) depend on `seed`."""
    return _make_jpeg


@pytest.fixture(scope="session")
def make_png() -> Callable[..., bytes]:
    """`make_png(seed, size=(20, 20), mode="RGB")`: a tiny one-colour PNG whose colour depends on `seed`."""
    return _make_png


@pytest.fixture(scope="session")
def bomb_png() -> Callable[..., bytes]:
    """`bomb_png(width=40_000, height=40_000)`: a tiny PNG whose header claims width x height pixels (its data
    would decompress to gigabytes)."""
    return _bomb_png


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="session")
def encode() -> Callable[..., bytes]:
    """`encode(image, fmt, **options)`: the bytes of a PIL image saved as `fmt` ("JPEG", "PNG", ...) with PIL's
    save options."""
    return _encode


@pytest.fixture(scope="session")
def photo() -> Callable[..., Image.Image]:
    """`photo(w=40, h=30, seed=0)`: an RGB image of random pixels (each seed its own picture)."""
    return _photo


# ---- a dataset folder as verify sees it (verify tests) -----------------------------------------------------


def _write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _journal(root: Path) -> list[dict[str, Any]]:
    from ursa.journal import journal_path

    return [json.loads(line) for line in journal_path(root).read_text().splitlines()]


def _result_for(report: Any, rel: str) -> Any:
    return next(r for r in report.results if r.file == rel)


@pytest.fixture(scope="session")
def write() -> Callable[[Path, str, bytes], Path]:
    """`write(root, rel, data)`: `data` written to root/rel, its folders made; returns the path."""
    return _write


@pytest.fixture(scope="session")
def journal() -> Callable[[Path], list[dict[str, Any]]]:
    """`journal(root)`: the entries of the dataset's journal (root/.ursa/journal.jsonl), oldest first."""
    return _journal


@pytest.fixture(scope="session")
def result_for() -> Callable[[Any, str], Any]:
    """`result_for(report, rel)`: the result for file `rel` (relative to the root) in a verify report."""
    return _result_for


# ---- a real HTTP server on 127.0.0.1 that misbehaves on request (collect and verify tests) ----------------


class _FaultHandler(BaseHTTPRequestHandler):
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
            self._send(200, _make_jpeg(int(arg.split(".")[0].split(";")[0])))
        elif kind == "png":
            self._send(200, _make_png(int(arg.split(".")[0])), "image/png")
        elif kind == "same":  # the same bytes under many URLs
            self._send(200, _make_jpeg(999))
        elif kind == "status":
            self._send(int(arg), b"nope", "text/plain")
        elif kind == "flaky":  # 503 twice, then the image
            if hits <= 2:
                self._send(503, b"busy", "text/plain", {"Retry-After": "0"})
            else:
                self._send(200, _make_jpeg(77))
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Sign in to see this image</body></html>", "text/html")
        elif kind == "empty":
            self._send(200, b"")
        elif kind == "bomb":
            self._send(200, _bomb_png(), "image/png")
        elif kind == "big":
            self._send(200, _make_jpeg(5) + b"\x00" * srv.big_bytes)
        elif kind == "bigstream":  # no Content-Length: the limit must apply while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(_make_jpeg(6) + b"\x00" * srv.big_bytes)
            self.close_connection = True
        elif kind == "truncated":  # promises more bytes than it sends, then hangs up
            body = _make_jpeg(8, (64, 64))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif kind == "truncfile":  # a complete response whose file is a truncated JPEG
            body = _make_jpeg(9, (64, 64))
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
                self._send(200, _make_jpeg(66))
        elif kind == "ua":  # refuses clients that do not look like a browser
            if "Mozilla/" in (self.headers.get("User-Agent") or ""):
                self._send(200, _make_jpeg(55))
            else:
                self._send(403, b"forbidden", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")


class FaultServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server; `url(path)` gives the address of a route; `hits` counts requests per path.
    Routes: img/<n> and png/<n> (a distinct image per n), same/<x> (one image under many URLs), status/<code>,
    flaky (503 twice), html, empty, bomb, big, bigstream, truncated, truncfile, reset, hang, drip, loop,
    redirect/<n>, toggle (404 while `broken`), ua (403 unless the client looks like a browser)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FaultHandler)
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
    """A `FaultServer` on 127.0.0.1, in a thread of the test process; a fresh one (hits, settings) per test."""
    srv = FaultServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
