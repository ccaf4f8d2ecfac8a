"""Throughput of `ursa serve` under load: 2,000 POST /predict at concurrency 8 on 127.0.0.1, in one run
with a baseline.

The server is the real command (`python -m ursa serve MODEL --port P --quiet`) in its own process with its
default workers. The load generator is an httpx AsyncClient with 8 workers on 8 keep-alive connections,
sending monkey10 validation JPEGs (read into memory once) as multipart uploads; it stops after the request
count or `--max-seconds`, whichever comes first, and talks to 127.0.0.1 only. 20 warm-up requests are not
counted. The baseline is the same server with `--backend torch` (PyTorch eager behind the same API), over
`--baseline-requests` requests.

Prints one JSON line: requests per second, median and p99 latency (ms), error count, for both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from _model import DATA, add_model_args, model_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m ursa serve MODEL --port P --quiet ARGS...` on 127.0.0.1 as its own process, once it answers
    /health: (process, url). Its stderr goes to `log` (a file: a full pipe would stall the server)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ursa", "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--quiet", *args]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, images: list[bytes], *, n: int, concurrency: int, max_seconds: float, server_pid: int) -> dict[str, object]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post("/predict", files={"file": (f"{i}.jpg", images[i % len(images)], "image/jpeg")})
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    return
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            lat.append((time.perf_counter() - t0) * 1e3)

        for i in range(20):  # warm-up, not counted
            await one(i)
        lat.clear()
        errors.clear()
        server_cpu0, client_cpu0 = cpu_seconds(server_pid), time.process_time()
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < n and time.perf_counter() < deadline:
                issued += 1
                await one(issued)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu0, time.process_time() - client_cpu0
    done = len(lat)
    per_req = (server_cpu + client_cpu) / max(1, done)
    return {
        "requests": issued,
        "ok": done,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(wall, 2),
        "req_per_s": round(done / wall, 1),
        "median_ms": round(float(np.median(lat)), 1) if lat else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
        "stopped_by_time": issued < n,
        # CPU spent per request, less sensitive to other load on the machine than the wall-clock rate:
        "server_cpu_ms_per_req": round(server_cpu * 1e3 / max(1, done), 2),
        "client_cpu_ms_per_req": round(client_cpu * 1e3 / max(1, done), 2),
        "cpu_bound_req_per_s_if_cores_were_idle": round((os.cpu_count() or 1) / per_req, 1) if per_req > 0 else None,
    }


def serve_and_load(model: Path, images: list[bytes], *, backend: str, n: int, concurrency: int, max_seconds: float) -> dict[str, object]:
    log = Path(tempfile.mkdtemp(prefix="ursa-serve-")) / f"serve-{backend}.log"
    with serving(model, log, "--backend", backend) as (proc, url):
        return asyncio.run(load(url, images, n=n, concurrency=concurrency, max_seconds=max_seconds, server_pid=proc.pid))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--baseline-requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=240.0)
    args = ap.parse_args()

    model = model_folder(args, Path(tempfile.mkdtemp(prefix="ursa-bench-")))
    if model is None:
        return 2
    images = [p.read_bytes() for p in sorted((DATA / "validation").rglob("*.jpg"))[:64]]
    ursa = serve_and_load(model, images, backend="onnx", n=args.requests, concurrency=args.concurrency, max_seconds=args.max_seconds)
    base = serve_and_load(model, images, backend="torch", n=args.baseline_requests, concurrency=args.concurrency, max_seconds=args.max_seconds / 2)
    out = {
        "benchmark": "serve_load",
        "concurrency": args.concurrency,
        "image": f"monkey10 validation JPEGs ({len(images)}, 250x250), multipart",
        "ursa_serve": ursa,
        "baseline_torch_backend": base,
        "speedup_req_per_s": round(float(ursa["req_per_s"]) / float(base["req_per_s"]), 2) if base["req_per_s"] else None,
        "target": {"req_per_s": 60, "errors": 0},
        "met": bool(float(ursa["req_per_s"]) >= 60 and ursa["errors"] == 0 and not ursa["stopped_by_time"]),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
