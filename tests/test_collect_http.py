"""The one exception -> manifest reason table of `ursa.collect._http`, and `fetch_once` applying it."""

from __future__ import annotations

import asyncio

import httpcore
import httpx
import pytest

from ursa.collect._http import Fail, Fetcher, fail_for, fetch_once
from ursa.config import CollectConfig
from ursa.errors import ImageTooLargeError, NotAnImageError

CFG = CollectConfig(timeout=0.5, total_timeout=1.0)

# httpcore's exceptions that httpx maps to its own of the same name (every httpcore exception but
# ConnectionNotAvailable, which httpcore retries itself and httpx does not map either)
HTTPCORE_MAPPED = sorted(
    name for name, value in vars(httpcore).items()
    if isinstance(value, type) and issubclass(value, Exception) and name != "ConnectionNotAvailable"
)  # fmt: skip


@pytest.mark.parametrize("name", HTTPCORE_MAPPED)
def test_an_httpcore_exception_reads_as_httpxs_of_the_same_name(name: str) -> None:
    """The host router passes httpcore's exceptions on unchanged: each must get the reason httpx's twin gets."""
    for message in ("boom", ""):
        core, ours = fail_for(getattr(httpcore, name)(message), CFG), fail_for(getattr(httpx, name)(message), CFG)
        assert core is not None and ours is not None, name
        assert (core.reason, core.transient) == (ours.reason, ours.transient)


@pytest.mark.parametrize(
    ("exc", "reason", "transient"),
    [
        (asyncio.TimeoutError(), "timeout: the response took longer than 1 s", False),
        (httpx.ConnectTimeout("x"), "timeout: could not connect within 0.5 s", True),
        (httpx.ReadTimeout("x"), "timeout: no data for 0.5 s", False),
        (httpcore.PoolTimeout("x"), "timeout: no data for 0.5 s", False),
        (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."), "bad url: Request URL has an unsupported protocol 'ftp://'.", False),
        (httpx.InvalidURL("Invalid port: 'x'"), "bad url: Invalid port: 'x'", False),
        (httpx.RemoteProtocolError("peer closed"), "connection: closed before the whole response arrived (peer closed)", True),
        (httpcore.ConnectError("refused"), "connection: cannot connect (refused)", True),
        (httpx.ReadError("reset by peer"), "connection: reset by peer", True),
        (httpcore.ReadError(""), "connection: ReadError", True),
        (httpx.LocalProtocolError("bad header"), "connection: bad header", True),
        (NotAnImageError("not an image: an HTML page"), "not an image: an HTML page", False),
        (ImageTooLargeError("decompression bomb: 1 x 2"), "decompression bomb: 1 x 2", False),
    ],
)  # fmt: skip
def test_each_failure_has_its_manifest_reason(exc: Exception, reason: str, transient: bool) -> None:
    fail = fail_for(exc, CFG)
    assert fail is not None and (fail.reason, fail.transient) == (reason, transient)


def test_an_exception_the_table_does_not_name_is_not_turned_into_a_reason() -> None:
    """A bug in the downloader must surface, not become a row that reads like a network failure."""
    assert fail_for(RuntimeError("bug"), CFG) is None
    assert fail_for(httpcore.ConnectionNotAvailable(), CFG) is None


def _fetch(handler: object) -> tuple[int, bytes, str]:
    client = Fetcher(CFG, httpx.MockTransport(handler))  # type: ignore[arg-type]
    return asyncio.run(fetch_once(client, "http://example.test/x.jpg", cfg=CFG))


@pytest.mark.parametrize(
    ("raised", "reason"),
    [(httpcore.ReadError("reset"), "connection: reset"), (httpx.ConnectError("refused"), "connection: cannot connect (refused)")],
)  # fmt: skip
def test_fetch_once_fails_with_the_tables_reason(raised: Exception, reason: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    with pytest.raises(Fail) as info:
        _fetch(handler)
    assert info.value.reason == reason and info.value.transient and info.value.__cause__ is raised


def test_fetch_once_names_a_body_that_is_not_an_image() -> None:
    with pytest.raises(Fail, match="not an image: an HTML page") as info:
        _fetch(lambda request: httpx.Response(200, content=b"<!doctype html><p>hi"))
    assert not info.value.transient


def test_fetch_once_lets_a_bug_raise() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        _fetch(handler)
