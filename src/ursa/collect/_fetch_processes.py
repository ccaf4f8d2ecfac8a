"""Helper processes that share a download's HTTP work: `FetchProcesses` in the downloading process, and
the helper's own side (`main`, run as `python -m ursa.collect._fetch_processes <socket fd>`).

Why: parsing HTTP in Python (httpcore, h11, asyncio) costs CPU per image, so one event loop tops out
near one core; benchmarks/download_speed.py measures the CPU per URL and the rate with helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ursa.collect._http import Fail, Fetcher, HostRouter, fetch_once, origin
from ursa.config import CollectConfig

__all__ = ["FetchProcesses", "process_count"]

_MIN_URLS_PER_PROCESS = 200  # below this many URLs per extra process, starting it costs more than it saves
_MODULE = "ursa.collect._fetch_processes"  # what a helper runs, as `python -m`: see `main`
_STOPPED = "connection: the fetch process stopped"  # the reason of a URL whose helper died under it (retried here)


def process_count(cfg: CollectConfig, pending: int) -> int:
    """How many fetch processes a run of `pending` URLs gets: `cfg.processes`, or by CPU count and size."""
    if sys.platform == "win32":  # the helpers' pipes need a selector event loop
        return 1
    if cfg.processes is not None:
        return max(1, cfg.processes)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus, pending // _MIN_URLS_PER_PROCESS)) if cpus > 1 else 1


class FetchProcesses:
    """The HTTP work of a run spread over helper processes; everything else stays in this one.

    Each of the `n` helpers runs `fetch_once` for the URLs sent to it and returns (status, body,
    extension) or the failure; this process keeps the queue, the per-host limits, the retries, the files
    and the manifest, so resuming and the manifest's guarantees do not change. Hosts are dealt out in
    turn, two to each helper for one fetched here (this process also does the bookkeeping), and keep
    their place, so their connections stay in one pool; until a helper has started, its hosts are
    fetched here. A helper that dies fails its URLs as transient (retried here) and is named by
    `stopped()`; the helpers' stderr goes to `log` (kept only when not empty or one died); helpers exit
    when this process closes their pipe or dies, and ignore Ctrl-C (this process handles it).
    """

    def __init__(self, cfg: CollectConfig, n: int, *, local: Fetcher, log: Path | None = None) -> None:
        self.cfg, self.local = cfg, local
        self.loop = asyncio.get_running_loop()
        self.conns: list[Any] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ready: list[bool] = []
        self.lost: list[int] = []  # helpers whose pipe closed before close(): they crashed or were killed
        self.closing = False
        self.log = log
        self._log_file = open(log, "ab") if log is not None else None  # every helper's stderr; closed in join()
        self.waiting: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self.route: dict[str, int] = {}
        self.deal = [i for i in range(n) for _ in range(2)] + [-1]  # -1: this process
        self.next_id = 0
        try:
            for i in range(n):
                self._start(i)
        except BaseException:
            self.close()
            self.join()
            raise

    def _start(self, i: int) -> None:
        """Start helper i: a fresh interpreter that imports only this module and the HTTP one (not the
        caller's script, as multiprocessing's spawn would), in its own session so a Ctrl-C in the terminal
        reaches only this process; it talks over a socket pair and exits when this end closes."""
        mine, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen([sys.executable, "-m", _MODULE, str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=self._log_file or subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        conn = multiprocessing.connection.Connection(mine.detach())
        conn.send(self.cfg)
        self.conns.append(conn)
        self.procs.append(proc)
        self.ready.append(False)
        self.loop.add_reader(conn.fileno(), self._receive, i)

    async def fetch(self, url: str) -> tuple[int, bytes, str]:
        i = self.route.setdefault(origin(url), self.deal[len(self.route) % len(self.deal)])
        if i < 0 or not self.ready[i]:
            return await fetch_once(self.local, url, cfg=self.cfg)
        self.next_id += 1
        fid, fut = self.next_id, self.loop.create_future()
        self.waiting[fid] = (fut, i)
        try:
            self.conns[i].send((fid, url))
            kind, value = await fut
        except asyncio.CancelledError:
            self.waiting.pop(fid, None)
            with contextlib.suppress(OSError, ValueError):
                self.conns[i].send((-fid, ""))  # stop that request there too
            raise
        except (OSError, ValueError) as exc:  # the helper's pipe is gone: its hosts are fetched here from now on
            self.waiting.pop(fid, None)
            self._drop(i)
            raise Fail(_STOPPED, transient=True) from exc
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        reason, transient, status, wait = value
        raise Fail(reason, transient=transient, status=status, wait=wait)

    def _receive(self, i: int) -> None:
        try:
            fid, result = self.conns[i].recv()
        except (EOFError, OSError):  # the helper died: its URLs are retried here
            self._drop(i)
            return
        if fid == 0:
            self.ready[i] = True
            return
        fut, _ = self.waiting.pop(fid, (None, i))
        if fut is not None and not fut.done():
            fut.set_result(result)

    def _drop(self, i: int) -> None:
        if not self.closing and i not in self.lost:
            self.lost.append(i)
        self.ready[i] = False
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.conns[i].fileno())
        for fid, (fut, j) in list(self.waiting.items()):
            if j == i:
                del self.waiting[fid]
                if not fut.done():
                    fut.set_result(_failure(Fail(_STOPPED, transient=True, wait=0.0)))

    def close(self) -> None:
        """Tell the helpers to stop (they see the end of their pipe and exit); `join` waits for them."""
        self.closing = True
        for i, conn in enumerate(self.conns):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(conn.fileno())
            conn.close()
            self.ready[i] = False

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            if self.log is not None and not self.lost:
                with contextlib.suppress(OSError):
                    if self.log.stat().st_size == 0:
                        self.log.unlink()  # nothing was said: no empty log left behind

    def stopped(self) -> list[str]:
        """One line per helper that stopped before the end of the run (after `join`)."""
        where = f"; what it printed is in {self.log}" if self.log is not None else ""
        return [f"fetch process {i + 1} stopped early (exit code {self.procs[i].returncode}); its URLs were fetched by the main process{where}" for i in self.lost]


def _failure(fail: Fail) -> tuple[str, tuple[str, bool, int | None, float | None]]:
    """A `Fail` as a helper's answer; `FetchProcesses.fetch` raises it again from these fields."""
    return "failed", (fail.reason, fail.transient, fail.status, fail.wait)


def main() -> None:
    """Entry point of a `FetchProcesses` helper: argv[1] is its socket; the first message is the config."""
    conn = multiprocessing.connection.Connection(int(sys.argv[1]))
    try:
        cfg = conn.recv()
    except EOFError:
        return
    asyncio.run(_serve_fetches(conn, cfg))


async def _serve_fetches(conn: Any, cfg: CollectConfig) -> None:
    loop = asyncio.get_running_loop()
    client = Fetcher(cfg, HostRouter(per_host=cfg.per_host))
    tasks: dict[int, asyncio.Task[None]] = {}
    closed = loop.create_future()

    def send(message: object) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError):  # the parent is gone
            if not closed.done():
                closed.set_result(None)

    async def one(fid: int, url: str) -> None:
        try:
            result: tuple[str, object] = ("ok", await fetch_once(client, url, cfg=cfg))
        except Fail as fail:
            result = _failure(fail)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one URL, not the helper
            result = _failure(Fail(f"internal: {type(exc).__name__}: {exc}"))
        tasks.pop(fid, None)
        send((fid, result))

    def receive() -> None:
        try:
            fid, url = conn.recv()
        except (EOFError, OSError):
            if not closed.done():
                closed.set_result(None)
            return
        if fid < 0:
            task = tasks.pop(-fid, None)
            if task is not None:
                task.cancel()
            return
        tasks[fid] = loop.create_task(one(fid, url))

    loop.add_reader(conn.fileno(), receive)
    send((0, None))  # ready
    try:
        await closed
    finally:
        loop.remove_reader(conn.fileno())
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await client.transport.aclose()


if __name__ == "__main__":
    main()
