"""The HTTP side of a download: one GET with its limits, the per-host connection pools, and what each
failure is called in the manifest.

`fetch_once` is the unit of work the scheduler (`ursa.collect.download`) and the fetch processes
(`ursa.collect._fetch_processes`) share: it returns (status, body, extension) or raises `Fail`, whose
`reason` becomes the manifest row's `reason` and whose `transient` says whether the scheduler retries.
Every exception a request can raise is named in one table, `REASONS`, the way httpx maps httpcore's
exceptions to its own (`HTTPCORE_EXC_MAP` in httpx/_transports/default.py).
"""

from __future__ import annotations

import asyncio
import select
import ssl
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from ursa.collect.urls import is_http_url
from ursa.config import CollectConfig
from ursa.errors import BadImageError
from ursa.imageio import sniff_image

__all__ = ["REASONS", "Fail", "Fetcher", "HostRouter", "fail_for", "fetch_once", "origin"]

_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524}


class Fail(Exception):
    """A failed fetch: `reason` for the manifest; `transient` failures are retried (after `wait` s, if given)."""

    def __init__(self, reason: str, *, transient: bool = False, status: int | None = None, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.status = status
        self.wait = wait


# (exceptions, manifest reason, transient): what each failure of one GET is called, and whether it is retried.
# An exception takes the row of the most specific class in its MRO (httpx.ConnectTimeout before
# httpx.TimeoutException). httpcore's classes stand beside httpx's of the same name because `HostRouter`
# passes its pools' exceptions on unchanged; a `transport=` given to `download` raises httpx's.
# Placeholders: {cfg} the CollectConfig, {exc} the exception's message, {detail} its message or, when it
# has none, its class name.
REASONS: tuple[tuple[tuple[type[Exception], ...], str, bool], ...] = (
    ((asyncio.TimeoutError,), "timeout: the response took longer than {cfg.total_timeout:g} s", False),
    ((httpx.ConnectTimeout, httpcore.ConnectTimeout), "timeout: could not connect within {cfg.timeout:g} s", True),
    ((httpx.TimeoutException, httpcore.TimeoutException), "timeout: no data for {cfg.timeout:g} s", False),
    ((httpx.UnsupportedProtocol, httpcore.UnsupportedProtocol, httpx.InvalidURL), "bad url: {exc}", False),
    ((httpx.RemoteProtocolError, httpcore.RemoteProtocolError), "connection: closed before the whole response arrived ({exc})", True),
    ((httpx.ConnectError, httpcore.ConnectError), "connection: cannot connect ({exc})", True),
    # reads and writes that broke off, proxies, the other protocol errors
    ((httpx.TransportError, httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError), "connection: {detail}", True),
    ((BadImageError,), "{exc}", False),  # the body is not an image we keep (sniffed from its header)
)  # fmt: skip
_BY_CLASS = {cls: (reason, transient) for classes, reason, transient in REASONS for cls in classes}
_MAPPED = tuple(_BY_CLASS)


def fail_for(exc: Exception, cfg: CollectConfig) -> Fail | None:
    """The `Fail` that `REASONS` gives `exc`, or None when the table does not name it (a bug: let it raise)."""
    for cls in type(exc).__mro__:
        row = _BY_CLASS.get(cls)
        if row is not None:
            reason, transient = row
            return Fail(reason.format(cfg=cfg, exc=exc, detail=str(exc) or type(exc).__name__), transient=transient)
    return None


def origin(url: str) -> str:
    """scheme://host[:port] of a URL, lower-cased: the unit of per-host limits and of connection pools."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return min(float(value.strip()), 30.0)
    return None


async def fetch_once(client: Fetcher, url: str, *, cfg: CollectConfig) -> tuple[int, bytes, str]:
    """(status, body, extension) of one GET, within `cfg.total_timeout`; every failure is a `Fail`."""
    try:
        if sys.version_info >= (3, 11):  # a deadline on this task; wait_for would start a task per request
            async with asyncio.timeout(cfg.total_timeout):
                status, body = await client.get(url)
        else:
            status, body = await asyncio.wait_for(client.get(url), cfg.total_timeout)
        ext = sniff_image(body, max_pixels=cfg.max_pixels)[0]
    except _MAPPED as exc:
        raise fail_for(exc, cfg) from exc  # type: ignore[misc]  # never None for a class of the table
    return status, body, ext


class Fetcher:
    """GET with redirects, a body-size limit and browser-like headers, straight on an httpx transport.

    httpx.AsyncClient's per-request machinery (cookies, auth, event hooks) is CPU a downloader does not
    need, and on a small machine CPU is what bounds it (benchmarks/download_speed.py measures the cost
    per URL). Errors are the transport's own exceptions (see `REASONS`), or `Fail` for HTTP-level failures.
    """

    def __init__(self, cfg: CollectConfig, transport: httpx.AsyncBaseTransport) -> None:
        self.cfg = cfg
        self.transport = transport
        self.headers = {
            "User-Agent": cfg.user_agent,
            "Accept": "image/avif,image/webp,image/apng,image/*,*/*;q=0.8",
            "Accept-Language": "en-US,en;q=0.9",
        }
        self.timeouts = {"connect": cfg.timeout, "read": cfg.timeout, "write": cfg.timeout, "pool": None}

    async def get(self, url: str) -> tuple[int, bytes]:
        """(status, body) of the final response; `Fail` for HTTP errors, too-large bodies and redirect loops."""
        for _ in range(self.cfg.max_redirects + 1):
            request = httpx.Request("GET", url, headers=self.headers, extensions={"timeout": self.timeouts})
            response = await self.transport.handle_async_request(request)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    url = str(request.url.join(location.strip()))
                    if not is_http_url(url):
                        raise Fail(f"bad url: redirected to {url[:80]!r}", status=response.status_code)
                    continue
                return await self._read(response)
            finally:
                await response.aclose()
        raise Fail(f"redirects: more than {self.cfg.max_redirects} (a redirect loop?)")

    async def _read(self, response: httpx.Response) -> tuple[int, bytes]:
        status, limit = response.status_code, self.cfg.max_bytes
        if status >= 300:
            raise Fail(f"http {status}: {response.reason_phrase}".rstrip(": "), status=status,
                       transient=status in _TRANSIENT_STATUS, wait=_retry_after(response.headers.get("retry-after")))  # fmt: skip
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise Fail(f"too large: {_mib(int(length))} is over the limit of {_mib(limit)}", status=status)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise Fail(f"too large: more than the limit of {_mib(limit)}", status=status)
            chunks.append(chunk)
        return status, b"".join(chunks)


class HostRouter(httpx.AsyncBaseTransport):
    """One small httpcore connection pool per origin, sharing one TLS context and one network backend.

    httpcore's pool scans all its connections for every request it places (quadratic in their number),
    so one pool for a whole run's connections grows costly as the run widens; pools of `per_host`
    connections keep that cost flat and enforce the per-host limit on connections too. The pools are
    httpcore's own (what httpx.AsyncHTTPTransport wraps), built here so they can take `_Backend`.
    Requests and responses are translated to and from httpx's; exceptions pass through as httpcore's,
    which `REASONS` names beside httpx's, so no translation wraps every request and every chunk.
    """

    def __init__(self, *, per_host: int) -> None:
        self.ssl = httpx.create_ssl_context()
        self.per_host = per_host
        self.backend = _Backend()
        self.pools: dict[tuple[bytes, bytes, int | None], httpcore.AsyncConnectionPool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = httpcore.AsyncConnectionPool(
                ssl_context=self.ssl, max_connections=self.per_host, max_keepalive_connections=self.per_host,
                keepalive_expiry=5.0, network_backend=self.backend)  # fmt: skip
        req = httpcore.Request(method=request.method, url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
                               headers=request.headers.raw, content=request.stream, extensions=request.extensions)  # fmt: skip
        resp = await pool.handle_async_request(req)
        return httpx.Response(status_code=resp.status, headers=resp.headers, stream=_Body(resp.stream), extensions=resp.extensions)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


class _Body(httpx.AsyncByteStream):
    """An httpcore response stream as the httpx byte stream httpx.Response reads."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.stream:
            yield part

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Stream(httpcore.AsyncNetworkStream):
    """httpcore's AnyIO stream, with the raw socket looked up once.

    httpcore asks every idle connection "is your socket readable?" before it places each request; the
    AnyIO stream answers by rebuilding its attribute table (a getpeername() system call included) every
    time, a cost paid per request and per idle connection. The answer itself is one poll() here.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self.inner = inner
        self.sock = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self.inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self.inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self.sock
        if info == "is_readable":
            fd = -1 if self.sock is None else self.sock.fileno()
            if fd < 0:
                return True  # gone: the next read returns b"", as httpcore expects
            if not hasattr(select, "poll"):  # Windows
                return bool(select.select([fd], [], [], 0)[0])
            poll = select.poll()  # not select(): it fails for descriptors over 1023
            poll.register(fd, select.POLLIN)
            return bool(poll.poll(0))
        return self.inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's AnyIO backend, handing out `_Stream`s."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        return _Stream(await self.inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self.inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
