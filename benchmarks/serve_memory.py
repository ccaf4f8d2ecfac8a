"""Memory of `ursa serve` under hostile and under ordinary load: resident set size (RSS) idle, at its peak
and 10 s after, for 200 concurrent 10 MB uploads and for the 8-client load of serve_load.py.

The server is the real command (`python -m ursa serve MODEL --port P --quiet`) in its own process, on
127.0.0.1, with its default workers; its RSS is read from /proc every 20 ms (and its VmHWM high-water
mark). The uploads are monkey10 JPEGs padded to 10,000,000 bytes (Pillow ignores what follows the end of
the image, so each is a real prediction), sent as multipart on 200 connections at once. The ordinary load
is serve_load.py's generator (`--requests` at concurrency 8). With `--baseline-src SRC` (e.g. the src/
folder of an earlier commit, `git archive HEAD | tar -x -C /tmp/base`) the same measurements are made,
in the same run, on a server importing Ursa from SRC, serving the run exported by that Ursa (unless
`--model` is given: then both serve it).

Prints one JSON line. Targets: settled RSS after the uploads within 1.5x of idle, peak under 1 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _machine import cpu_flags
from _model import DATA, add_model_args, model_folder
from serve_load import load, serving

MB = 1e6


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """`field` of /proc/PID/status (VmRSS now, VmHWM the peak so far) in MB; 0.0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


class Sampler:
    """The highest RSS of process `pid` seen while the `with` block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def uploads(url: str, body: bytes, n: int) -> dict[str, Any]:
    """`n` multipart uploads of `body`, all at once on `n` connections; status counts and seconds."""
    outcomes: dict[str, int] = {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def one(i: int) -> None:
            try:
                r = await client.post("/predict", files={"file": (f"{i}.jpg", body, "image/jpeg")})
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
    return {"outcomes": outcomes, "seconds": round(time.perf_counter() - t0, 1)}


def export_with(src: str, run: Path, out: Path) -> Path:
    """`run` exported by the Ursa in `src` (export formats differ between versions)."""
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-m", "ursa", "export", str(run), "--out", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    return out


def measure(model: Path, src: str | None, images: list[bytes], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    log = tmp / f"serve-{'baseline' if src else 'ursa'}.log"
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    with serving(model, log, env=env) as (proc, url):
        for img in images[:8]:  # the model's first runs allocate its buffers: part of idle, not of the load
            httpx.post(url + "/predict", files={"file": ("w.jpg", img, "image/jpeg")}, timeout=60)
        time.sleep(2)
        idle = rss_mb(proc.pid)
        body = images[0] + b"\0" * (args.upload_bytes - len(images[0]))
        with Sampler(proc.pid) as s:
            up = asyncio.run(uploads(url, body, args.uploads))
        time.sleep(args.settle)
        up.update(peak_rss_mb=round(max(s.peak, rss_mb(proc.pid, "VmHWM")), 1), settled_rss_mb=round(rss_mb(proc.pid), 1))
        with Sampler(proc.pid) as s:
            ld = asyncio.run(load(url, images, n=args.requests, concurrency=args.concurrency, max_seconds=args.max_seconds, server_pid=proc.pid))
        time.sleep(args.settle)
        ld.update(peak_rss_mb=round(s.peak, 1), settled_rss_mb=round(rss_mb(proc.pid), 1))
        alive = httpx.get(url + "/health", timeout=5).status_code == 200
        lines = log.read_text(errors="replace").splitlines()
        return {
            "idle_rss_mb": round(idle, 1),
            "uploads": up,
            "load": {k: ld[k] for k in ("ok", "errors", "error_kinds", "req_per_s", "median_ms", "p99_ms", "server_cpu_ms_per_req", "peak_rss_mb", "settled_rss_mb")},
            "settled_over_idle": round(up["settled_rss_mb"] / idle, 2) if idle else None,
            "alive_after": alive,
            "log_lines": len(lines),
            "tracebacks": sum(line.startswith("Traceback") for line in lines),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--uploads", type=int, default=200, help="concurrent large uploads")
    ap.add_argument("--upload-bytes", type=int, default=10_000_000)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds to wait before the settled RSS")
    ap.add_argument("--requests", type=int, default=2000, help="requests of the ordinary load")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--baseline-src", help="also measure a server importing ursa from this src/ folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ursa-bench-"))
    model = model_folder(args, tmp)
    if model is None:
        return 2
    images = [p.read_bytes() for p in sorted((DATA / "validation").rglob("*.jpg"))[:64]]
    ursa = measure(model, None, images, args, tmp)
    out: dict[str, Any] = {
        "benchmark": "serve_memory",
        "uploads": f"{args.uploads} at once, {args.upload_bytes / MB:g} MB each (a monkey10 JPEG, padded), multipart",
        "load": f"{args.requests} requests at concurrency {args.concurrency} (serve_load.py)",
        "ursa_serve": ursa,
    }
    if args.baseline_src:
        base_model = args.model or export_with(args.baseline_src, args.run, tmp / "baseline-model")
        out["baseline"] = {"src": args.baseline_src, **measure(base_model, args.baseline_src, images, args, tmp)}
    up = ursa["uploads"]
    out["target"] = {"settled_over_idle": 1.5, "peak_rss_mb": 1000}
    out["met"] = bool(ursa["settled_over_idle"] is not None and ursa["settled_over_idle"] <= 1.5 and up["peak_rss_mb"] < 1000 and ursa["alive_after"])
    out.update(cpu_flags=cpu_flags(), cpus=os.cpu_count(), loadavg_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
