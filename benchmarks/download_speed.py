"""Download speed and manifest correctness of `ursa.collect.download` against a baseline, in one run.

A local HTTP server on 127.0.0.1 (its own process, so it does not share the GIL with the downloader) serves
2,000 image URLs spread over 16 ports, standing in for the many hosts of a real URL list. Each response is
delayed 20-100 ms. 10% of the URLs fail, 40 each: HTTP 404, HTTP 500, a server that never answers
(timeout), an HTML page instead of an image, and a connection reset.

Ursa runs with its default settings except a 1 s timeout (the server's slowest good answer takes 0.1 s);
by default it spreads the HTTP work over helper processes by CPU count (2 here), and its CPU figure
counts them too.
The baseline is fastai's `download_images` when fastai is importable, otherwise a sequential loop with the
same timeout that saves what it gets (as the lesson did); it runs over the first 200 URLs and its rate is
reported per image (200 x 60 ms sequentially already takes ~15 s).

Prints one JSON line: good images per second for both, the speed-up, and whether the manifest has exactly
one correct row per URL (status, failure kind, file present with the served bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

N_URLS = 2000
N_PORTS = 16
FAIL_KINDS = ("404", "500", "hang", "html", "reset")  # 40 URLs each: 10%
BASELINE_URLS = 200
TIMEOUT_S = 1.0
SEED = 0


def _base_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def image_bytes(base: bytes, i: int) -> bytes:
    """A distinct valid JPEG per URL: bytes after the end-of-image marker are ignored by decoders."""
    return base + struct.pack(">Q", i)


def _latency(path: str) -> float:
    return random.Random(path).uniform(0.020, 0.100)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, base: bytes) -> None:
    try:
        while True:
            request = await reader.readline()
            if not request:
                return
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split(b" ")[1].decode()
            await asyncio.sleep(_latency(path))
            kind, _, arg = path.strip("/").partition("/")
            if kind == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if kind == "hang":
                await asyncio.sleep(3600)
            status, ctype, body = "200 OK", "image/jpeg", b""
            if kind == "img":
                body = image_bytes(base, int(arg.split(".")[0]))
            elif kind == "html":
                ctype, body = "text/html", b"<!doctype html><html><body>Please enable JavaScript</body></html>"
            elif kind == "500":
                status, ctype, body = "500 Internal Server Error", "text/plain", b"oops"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"no such image"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError, IndexError, ValueError):
        pass
    finally:
        writer.close()


def _serve(ports: mp.Queue) -> None:  # type: ignore[type-arg]
    base = _base_jpeg()

    async def main() -> None:
        servers = [await asyncio.start_server(lambda r, w: _handle(r, w, base), "127.0.0.1", 0, backlog=1024)
                   for _ in range(N_PORTS)]  # fmt: skip
        ports.put([s.sockets[0].getsockname()[1] for s in servers])
        await asyncio.Event().wait()

    asyncio.run(main())


def make_urls(ports: list[int]) -> list[tuple[str, str]]:
    """(url, expected kind) for every URL: 'ok' or one of FAIL_KINDS, shuffled with a fixed seed."""
    kinds = ["ok"] * (N_URLS - 40 * len(FAIL_KINDS)) + [k for k in FAIL_KINDS for _ in range(40)]
    random.Random(SEED).shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        port = ports[i % len(ports)]
        path = f"img/{i}.jpg" if kind == "ok" else f"{kind}/{i}.jpg"
        out.append((f"http://127.0.0.1:{port}/{path}", kind))
    return out


_EXPECTED_REASON = {"404": "http 404", "500": "http 500", "hang": "timeout", "html": "not an image", "reset": "connection"}


def check_manifest(root: Path, urls: list[tuple[str, str]], base: bytes) -> dict[str, object]:
    from ursa.collect.manifest import Manifest

    rows = Manifest.load(root).rows
    wrong = []
    for i, (url, kind) in enumerate(urls):
        row = rows.get(("bench", url))
        if row is None:
            wrong.append((url, "no row"))
        elif kind == "ok":
            want = hashlib.sha256(image_bytes(base, i)).hexdigest()
            path = root / row["file"]
            if row["status"] != "ok" or row["sha256"] != want or not path.is_file() or path.read_bytes() != image_bytes(base, i):
                wrong.append((url, f"{row['status']} {row['reason']}"))
        elif row["status"] != "failed" or not row["reason"].startswith(_EXPECTED_REASON[kind]):
            wrong.append((url, f"{row['status']} {row['reason']}"))
    files = [p for p in (root / "bench").iterdir() if not p.name.startswith(".")]
    return {
        "rows": len(rows),
        "files": len(files),
        "wrong_rows": len(wrong),
        "examples": wrong[:3],
        "correct": not wrong and len(rows) == len(urls) and len(files) == sum(k == "ok" for _, k in urls),
    }


def run_ursa(urls: list[tuple[str, str]], root: Path) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds of this process and its fetch helpers, good images, fetch processes)."""
    from ursa.collect.download import Job, download
    from ursa.config import CollectConfig

    jobs = [Job(url, "bench", source="benchmark") for url, _ in urls]
    start, cpu = time.perf_counter(), _cpu_with_children()
    report = download(jobs, root, config=CollectConfig(timeout=TIMEOUT_S))
    return time.perf_counter() - start, _cpu_with_children() - cpu, report.progress.ok, report.processes


def _cpu_with_children() -> float:
    """CPU seconds of this process plus its finished children (the downloader joins its helpers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_baseline(urls: list[tuple[str, str]], root: Path) -> tuple[str, float, int]:
    """(name, seconds, good images) over the first BASELINE_URLS URLs."""
    subset = [u for u, _ in urls[:BASELINE_URLS]]
    try:
        from fastai.vision.utils import download_images  # type: ignore[import-not-found]
    except ImportError:
        download_images = None
    dest = root / "baseline"
    dest.mkdir(parents=True)
    start = time.perf_counter()
    if download_images is not None:
        download_images(dest, urls=subset, timeout=TIMEOUT_S)
        name = "fastai.download_images"
    else:
        import httpx

        name = "sequential httpx loop"
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=True) as client:
            for i, url in enumerate(subset):
                try:
                    resp = client.get(url)
                except httpx.HTTPError:
                    continue
                if resp.status_code == 200:
                    (dest / f"{i:08d}.jpg").write_bytes(resp.content)
    seconds = time.perf_counter() - start
    good = sum(1 for p in dest.iterdir() if p.read_bytes()[:3] == b"\xff\xd8\xff")
    return name, seconds, good


def main() -> int:
    ctx = mp.get_context("spawn")
    ports_q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports_q,), daemon=True)
    server.start()
    try:
        ports = ports_q.get(timeout=60)
        urls = make_urls(ports)
        base = _base_jpeg()
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "ursa"
            seconds, cpu, good, processes = run_ursa(urls, root)
            manifest = check_manifest(root, urls, base)
            name, b_seconds, b_good = run_baseline(urls, Path(tmp))
    finally:
        server.terminate()
    ursa_rate = good / seconds
    base_rate = b_good / b_seconds
    result = {
        "benchmark": "download_speed",
        "urls": N_URLS,
        "failing": 40 * len(FAIL_KINDS),
        "latency_ms": [20, 100],
        "hosts": N_PORTS,
        "timeout_s": TIMEOUT_S,
        "ursa": {"seconds": round(seconds, 2), "good_images": good, "images_per_s": round(ursa_rate, 1),
                 "fetch_processes": processes, "cpu_ms_per_url": round(1000 * cpu / N_URLS, 2), "manifest": manifest},  # fmt: skip
        "baseline": {"name": name, "urls": BASELINE_URLS, "seconds": round(b_seconds, 2), "good_images": b_good,
                     "images_per_s": round(base_rate, 1)},  # fmt: skip
        "speedup": round(ursa_rate / base_rate, 1),
        "targets_met": ursa_rate >= 300 and ursa_rate >= 3 * base_rate and bool(manifest["correct"]),
    }
    # Other work on a small machine slows both runs; the load average says how busy it was.
    result["load_average_1min"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(json.dumps(result))
    # A slow machine is reported, not failed; a wrong manifest is a bug.
    return 0 if manifest["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
