"""Uvicorn, configured so that slow or idle clients cannot hold a connection: used by every Ursa web app.

Uvicorn's own keep-alive timer only runs between requests and stops at the first byte of the next one,
so a client that opens a connection and sends nothing, or half its headers, or a body one byte a minute,
would hold it (and, for an upload, a place in the prediction queue) for as long as it likes.
`TimedH11Protocol` checks each connection once a second and closes it when

- it has sent nothing for `IDLE_TIMEOUT_S` (a fresh or kept-alive connection with no request);
- a request's headers are not complete `HEADER_TIMEOUT_S` after its first byte (answered 408);
- a request body has stalled for `BODY_TIMEOUT_S`, or arrives slower than `MIN_BODY_RATE` bytes a
  second after its first `BODY_TIMEOUT_S` seconds (an honest 10 MiB upload at 1 KiB/s would take
  almost three hours).

While the app itself is not reading (Uvicorn has paused the socket), the client is not blamed. Each
such close is logged as one line. Headers are limited to `MAX_HEADER_BYTES`, connections plus running
requests to `limit_concurrency` (more get 503 at once).

`run` also asks glibc to map every buffer of `MMAP_THRESHOLD` bytes or more on its own, so the memory of
a 10 MB upload goes back to the system when it is freed. By default glibc raises that threshold to the
size of the largest buffer freed so far (up to 32 MiB) and from then on serves such buffers from its
per-thread heaps, which keep them: after a burst of large uploads the server stayed far above its idle
size (benchmarks/serve_memory.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ursa._malloc import M_MMAP_THRESHOLD, mallopt
from ursa.web.security import CLOSED_KEY

__all__ = ["TimedH11Protocol", "server_config", "run", "return_large_buffers", "IDLE_TIMEOUT_S", "HEADER_TIMEOUT_S", "BODY_TIMEOUT_S", "MIN_BODY_RATE", "MAX_HEADER_BYTES"]

IDLE_TIMEOUT_S = 5.0
HEADER_TIMEOUT_S = 5.0
BODY_TIMEOUT_S = 5.0
MIN_BODY_RATE = 1024  # bytes per second, averaged over the body so far
MAX_HEADER_BYTES = 16 * 1024
MMAP_THRESHOLD = 256 * 1024
_TICK_S = 1.0
_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\nconnection: close\r\n\r\nrequest headers took too long.\r\n"


class TimedH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol with the idle, header and body timeouts of the module docstring."""

    idle_timeout = IDLE_TIMEOUT_S
    header_timeout = HEADER_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    min_body_rate = MIN_BODY_RATE

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        self._last_rx = now
        self._state: Any = None
        self._observe(now)
        self._tick: asyncio.TimerHandle | None = self.loop.call_later(_TICK_S, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        self._last_rx = now
        before = self.conn.their_state
        super().data_received(data)
        self._observe(now, 0 if self.conn.their_state is not before else len(data))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._observe(self.loop.time())

    def _observe(self, now: float, received: int = 0) -> None:
        """Follow the client's side of the h11 state machine: when it changes, start the clocks afresh."""
        state = self.conn.their_state
        if state is not self._state:
            self._state, self._since, self._received, self._first_rx = state, now, 0, None
        elif received:
            self._received += received
            if self._first_rx is None:
                self._first_rx = now

    def _check(self) -> None:
        self._tick = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        self._observe(now)
        reason, quiet = self._overdue(now)
        if reason is None:
            self._tick = self.loop.call_later(_TICK_S, self._check)
            return
        if not quiet:
            client = "%s:%d" % self.client if self.client else "a client"
            self.logger.warning("%s - connection closed: %s.", client, reason)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[CLOSED_KEY] = reason  # type: ignore[literal-required]  # the app's side logs nothing more
        if self._state is h11.IDLE and self.conn.our_state is h11.IDLE and not quiet:
            self.transport.write(_TIMEOUT_408)
        self.transport.close()

    def _overdue(self, now: float) -> tuple[str | None, bool]:
        """(why to close, whether to close without a log line), or (None, False) to keep waiting."""
        if self._state is h11.IDLE:
            if self._first_rx is None:
                return ("idle", True) if now - self._since >= self.idle_timeout else (None, False)
            if now - self._first_rx >= self.header_timeout:
                return f"request headers incomplete after {self.header_timeout:g} s", False
        elif self._state is h11.SEND_BODY:
            if self.flow.read_paused:  # the app is not reading yet: not the client's fault
                self._last_rx, self._since, self._received = now, now, 0
                return None, False
            if now - self._last_rx >= self.body_timeout:
                return f"request body stalled (no data for {self.body_timeout:g} s)", False
            elapsed = now - self._since
            if elapsed >= self.body_timeout and self._received < self.min_body_rate * elapsed:
                return f"request body too slow ({self._received} bytes in {elapsed:.0f} s)", False
        return None, False


def server_config(app: Any, *, host: str, port: int, log_level: str = "info", access_log: bool = True, limit_concurrency: int = 256) -> uvicorn.Config:
    """The Uvicorn configuration every Ursa web app runs under (see the module docstring)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=TimedH11Protocol,
        ws="none",
        log_level=log_level,
        access_log=access_log,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=int(IDLE_TIMEOUT_S),
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        server_header=False,
    )


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` (see the module docstring); True when applied."""
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def run(app: Any, *, host: str, port: int, log_level: str = "info", access_log: bool = True, limit_concurrency: int = 256) -> None:
    """Serve `app` on host:port until interrupted (Ctrl-C)."""
    return_large_buffers()
    uvicorn.Server(server_config(app, host=host, port=port, log_level=log_level, access_log=access_log, limit_concurrency=limit_concurrency)).run()
