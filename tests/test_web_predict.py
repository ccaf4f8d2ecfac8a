"""The prediction API: good, non-image, damaged, oversized and bomb uploads; limits; concurrency; the real
`ursa serve` on 127.0.0.1; and that serving never imports the training code."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ursa.export import load_model
from ursa.web.predict_app import create_predict_app, default_workers

LOCAL = "http://127.0.0.1"  # the apps answer to loopback Host names only (DNS rebinding)

if TYPE_CHECKING:
    from conftest import Built


@pytest.fixture(scope="module")
def client(built: Built) -> TestClient:
    return TestClient(create_predict_app(built.export), base_url=LOCAL)


def png_bytes(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_health_model_and_page(client: TestClient, built: Built) -> None:
    h = client.get("/health").json()
    assert h == {"status": "ok", "model": "tiny", "classes": 3, "backend": "onnx", "precision": "fp32"}
    meta = client.get("/model").json()
    assert meta["classes"] == ["bear", "cat", "dog"] and "open_set" in meta and "files" in meta
    assert "source" not in meta  # no server paths
    page = client.get("/")
    assert page.status_code == 200 and "bear, cat, dog" in page.text and "static/predict.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/predict.js").status_code == 200 and client.get("/static/predict.css").status_code == 200


def test_predict_multipart_and_raw_body_agree_with_the_library(client: TestClient, built: Built) -> None:
    data = built.photo.read_bytes()
    a = client.post("/predict", files={"file": ("photo.jpg", data, "image/jpeg")})
    b = client.post("/predict?top_k=2", content=data, headers={"content-type": "image/jpeg"})
    c = client.post("/predict", content=data, headers={"content-type": "application/octet-stream"})
    assert a.status_code == b.status_code == c.status_code == 200
    ja, jb = a.json(), b.json()
    label, idx, probs = load_model(built.export).predict(built.photo)
    assert ja["label"] == jb["label"] == label and ja["index"] == idx
    assert abs(ja["prob"] - float(probs.max())) < 1e-5 and len(ja["top"]) == 3 and len(jb["top"]) == 2
    assert ja["top"][0]["label"] == ja["best"] and 0 < ja["threshold"] <= 1
    assert set(ja["ms"]) == {"decode", "preprocess", "model", "total"}


def test_non_image_is_415(client: TestClient) -> None:
    r = client.post("/predict", files={"file": ("notes.txt", b"just some text", "text/plain")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]


def test_damaged_image_is_422(client: TestClient, built: Built) -> None:
    r = client.post("/predict", content=built.photo.read_bytes()[:1500], headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and "damaged or truncated" in r.json()["detail"]


def test_missing_or_empty_upload_is_400(client: TestClient) -> None:
    r = client.post("/predict", files={"image": ("a.jpg", b"123", "image/jpeg")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = client.post("/predict", content=b"")
    assert r.status_code == 400 and "no image" in r.json()["detail"]
    assert client.post("/predict?top_k=0", content=b"x").status_code == 422


def test_oversized_upload_is_413(built: Built) -> None:
    small = TestClient(create_predict_app(built.export, max_upload_bytes=20_000), base_url=LOCAL)
    big = os.urandom(30_000)
    for kw in ({"content": big}, {"files": {"file": ("big.jpg", big, "image/jpeg")}}):
        r = small.post("/predict", **kw)
        assert r.status_code == 413 and "over the limit" in r.json()["detail"]


def test_decompression_bomb_is_413_before_decoding(client: TestClient, built: Built) -> None:
    bomb = png_bytes(12_000, 12_000)  # 144 megapixels of zeros: ~150 kB of PNG
    assert len(bomb) < 1_000_000
    t0 = time.perf_counter()
    r = client.post("/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "megapixels" in r.json()["detail"]
    assert time.perf_counter() - t0 < 2.0  # refused from the header, not after a 144 MB decode
    strict = TestClient(create_predict_app(built.export, max_pixels=1_000_000), base_url=LOCAL)
    r = strict.post("/predict", content=png_bytes(1200, 1000, "RGB"))
    assert r.status_code == 413 and "over the limit of 1" in r.json()["detail"]


def test_openapi_documents_the_upload(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert "image/*" in body and {"/health", "/model", "/predict"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def _slow_app(built: Built, *, concurrency: int, max_queue: int, delay: float):
    """An app whose predictor sleeps `delay` s per image and records the most predictions at once."""
    predictor = load_model(built.export)
    real = predictor.predict_image
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow(data, **kw):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(delay)
            return real(data, **kw)
        finally:
            with lock:
                state["now"] -= 1

    predictor.predict_image = slow
    return create_predict_app(predictor, concurrency=concurrency, max_queue=max_queue), state


def test_inference_is_bounded_and_off_the_event_loop(built: Built) -> None:
    app, state = _slow_app(built, concurrency=2, max_queue=64, delay=0.3)
    data = built.photo.read_bytes()

    async def main() -> tuple[list[int], float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as c:
            jobs = [asyncio.create_task(c.post("/predict", content=data)) for _ in range(6)]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            health = await c.get("/health")  # answered while predictions run in the thread pool
            health_s = time.perf_counter() - t0
            assert health.status_code == 200
            return [r.status_code for r in await asyncio.gather(*jobs)], health_s

    codes, health_s = asyncio.run(main())
    assert codes == [200] * 6 and state["most"] == 2
    assert health_s < 0.25


def test_a_full_queue_answers_503(built: Built) -> None:
    app, _ = _slow_app(built, concurrency=1, max_queue=0, delay=0.4)
    data = built.photo.read_bytes()

    async def main() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL) as c:
            return [r.status_code for r in await asyncio.gather(*[c.post("/predict", content=data) for _ in range(3)])]

    codes = asyncio.run(main())
    assert codes.count(200) == 1 and codes.count(503) == 2


def test_default_workers() -> None:
    assert default_workers(2) == (2, 1) and default_workers(16) == (4, 4) and default_workers(1) == (1, 1)


def test_serving_imports_neither_training_code_nor_torch(built: Built) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from ursa.web.predict_app import create_predict_app\n"
        f"c = TestClient(create_predict_app({str(built.export)!r}), base_url='http://127.0.0.1')\n"
        f"assert c.post('/predict', content=open({str(built.photo)!r}, 'rb').read()).status_code == 200\n"
        # ursa.imageio is the torch-free decode + geometry shared with training; nothing of ursa.data
        "bad = sorted(m for m in sys.modules if m.startswith(('ursa.train', 'ursa.data', 'torch', 'timm', 'onnx.')) or m == 'onnx')\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def live_server(built: Built, serve_process, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001
    """`ursa serve` as a real process on 127.0.0.1, with a 1 MiB upload limit."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(built.export, log, "--max-upload-mb", "1", "--quiet") as (url, _):
        yield url


def test_live_server_predicts_and_limits_streamed_bodies(live_server: str, built: Built) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        r = c.post("/predict", files={"file": ("photo.jpg", built.photo.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["label"] in ("bear", "cat", "dog", "none of these")

        def chunks():  # no Content-Length: the limit must hold while reading
            for _ in range(40):
                yield b"\0" * 65536

        r = c.post("/predict", content=chunks(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413
        assert c.get("/health").json()["status"] == "ok"


def test_serve_reports_a_taken_port(run_cli, built: Built) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, _, err = run_cli("serve", built.export, "--port", s.getsockname()[1])
    assert code == 2 and "another --port" in err.replace("\n", " ")


def test_serve_refuses_a_bad_folder(run_cli, tmp_path: Path, free_port) -> None:  # noqa: ANN001
    code, _, err = run_cli("serve", tmp_path / "nothing", "--port", free_port())
    assert code == 2 and "ursa export" in err
