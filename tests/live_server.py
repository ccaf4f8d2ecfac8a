"""Real servers on 127.0.0.1 for the web tests: an app under Uvicorn (Ursa's configuration) in a thread of
the test process, or the `ursa serve` command as its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def app_server(app: Any, **options: Any) -> Iterator[str]:
    """`app` under `ursa.web.server.server_config` on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    from ursa.web.server import server_config

    port = free_port()
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


@contextmanager
def serve_process(model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m ursa serve MODEL --port P ARGS...` with stdout and stderr in `log`; yields (URL, process)."""
    port = free_port()
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
