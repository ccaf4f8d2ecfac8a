"""Who may talk to an Ursa web app: one ASGI middleware that every app (predict, review) wraps itself in.

A server on 127.0.0.1 is reachable by every web page the user's browser opens, so "local" is not a
permission. `WebGuard` refuses, before the app sees the request:

- a `Host` header that is not this server (loopback binds): a page on `evil.example` whose name was
  re-pointed at 127.0.0.1 (DNS rebinding) sends `Host: evil.example:8000`, and gets 403;
- an `Origin` header that is not this server's own origin, on every route (a cross-site form or fetch);
- a cross-site subresource (`Sec-Fetch-Site: cross-site` or `same-site` on anything but a top-level
  navigation): another page may link to ours but not embed its images or call its API;
- a state-changing request (POST/PUT/PATCH/DELETE) without `Content-Type: application/json`, except on
  the paths that take raw uploads (the prediction API, the studio's image uploads): an HTML form cannot
  send JSON, and a cross-site fetch that does needs a CORS preflight, which these apps never grant (415);
  those paths are given exactly ("/predict") or as templates whose `{param}` segments match one
  non-empty path segment each ("/api/classes/{name}/images");
- when the app has a token (always on a non-loopback bind): any request without it (403). The token is
  accepted as `Authorization: Bearer TOKEN`, as a cookie, or as `?token=TOKEN`; a page opened with
  `?token=` is redirected to itself without it, with the token in an HttpOnly, SameSite=Strict cookie so
  the page's own requests carry it and the address bar does not.

Refusals are JSON (`{"detail": ...}` or, for the review app, `{"error": ...}`) that say what to do.
A client that goes away in the middle of its upload is logged as one line, not a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import ClientDisconnect

from ursa.errors import ServeError

__all__ = ["LOOPBACK_NAMES", "TOKEN_ENV", "WebGuard", "check_token", "is_loopback", "protect", "raw_path_matcher", "resolve_token"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "URSA_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as they appear in a Host header
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")
CLOSED_KEY = "ursa.closed"  # set in the scope by ursa.web.server when it drops a stalled request

log = logging.getLogger("uvicorn.error")


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> str:
    """`token` if it can travel in a header, a cookie and a URL unchanged; ServeError otherwise."""
    if not _TOKEN_CHARS.match(token):
        raise ServeError(
            "the token must be 16 to 256 letters, digits or '-._~' (it travels in a URL and a cookie). "
            f"Pick a longer one, or leave --token and {TOKEN_ENV} unset and one is generated."
        )
    return token


def resolve_token(host: str, token: str | None = None) -> str | None:
    """The token a server bound to `host` requires: `token`, else $URSA_TOKEN, else a fresh random one
    when `host` is not loopback (other machines can reach it), else None (no token on loopback)."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        return check_token(token)
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def _check_bind(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        raise ServeError(f"serving on {host} (reachable from other machines) needs a token: pass --token or set {TOKEN_ENV}.")
    if token is not None:
        check_token(token)


def protect(app: Any, *, host: str, token: str | None, raw_body_paths: Collection[str] = (), error_key: str = "detail") -> None:
    """Put `WebGuard` in front of every route of the Starlette/FastAPI `app`; ServeError at once (not at
    the first request) when `token` is missing on a non-loopback `host` or malformed."""
    _check_bind(host, token)
    app.add_middleware(WebGuard, host=host, token=token, raw_body_paths=raw_body_paths, error_key=error_key)


_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")


def raw_path_matcher(paths: Collection[str]) -> Callable[[str], bool]:
    """A test `f(path) -> bool` for the request paths that `paths` names.

    Each entry is an exact path ("/predict") or a template whose `{param}` segments each match exactly one
    non-empty segment of the request path ("/api/classes/{name}/images" matches "/api/classes/cats/images",
    not "/api/classes/images" nor "/api/classes/a/b/images"). A segment mixing text and a parameter
    ("/x/{a}.zip") is taken literally: the guard only needs whole segments. ServeError for an entry that
    does not start with '/'.
    """
    exact: set[str] = set()
    templates: list[tuple[str, ...]] = []
    for path in paths:
        if not path.startswith("/"):
            raise ServeError(f"raw body path {path!r} must start with '/' (a path such as /predict or /api/classes/{{name}}/images).")
        parts = tuple(path.split("/"))
        if any(_PARAM.match(p) for p in parts):
            templates.append(parts)
        else:
            exact.add(path)

    def matches(path: str) -> bool:
        if path in exact:
            return True
        if not templates:
            return False
        got = path.split("/")
        return any(len(got) == len(t) and all(bool(g) if _PARAM.match(want) else g == want for g, want in zip(got, t)) for t in templates)

    return matches


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


class WebGuard:
    """ASGI middleware: Host, Origin, fetch-metadata, JSON and token checks (see the module docstring).

    `host` is the address the server binds; `raw_body_paths` are the paths whose POST takes a non-JSON
    body (uploads), exact or as templates with `{param}` segments (see `raw_path_matcher`); `error_key`
    names the field of the refusal's JSON body.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        raw_body_paths: Collection[str] = (),
        error_key: str = "detail",
    ) -> None:
        _check_bind(host, token)
        self.app = app
        self.loopback = is_loopback(host)
        self.token = token
        self.raw_body_paths = frozenset(raw_body_paths)
        self.is_raw_body_path = raw_path_matcher(raw_body_paths)
        self.error_key = error_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; these apps have no websockets
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await self._refuse(send, *refusal)
            return
        cookie = None
        if self.token is not None:
            given = self._token_given(scope, headers)
            if given is None:
                await self._refuse(send, 403, "this server needs its token: open the address `ursa` printed (it ends in ?token=...), or send the header 'Authorization: Bearer TOKEN'.")
                return
            if given == "query":
                cookie = self._cookie_header(scope)
                if scope["method"] in ("GET", "HEAD") and scope["path"] == "/":
                    await self._redirect_without_token(scope, send, cookie)
                    return
        await self._call_app(scope, receive, self._with_cookie(send, cookie) if cookie else send)

    # -- the checks -------------------------------------------------------------------------------------

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "").strip().lower()
        if self.loopback and not self._is_own_loopback_host(host, scope):
            server = scope.get("server")
            port = f":{server[1]}" if server and len(server) > 1 and server[1] else ""
            return 403, (f"unexpected Host header {host[:100]!r}: this server answers to 127.0.0.1{port}, localhost{port} or [::1]{port} only "
                         "(a tunnel must keep the port). Open the address `ursa` printed.")  # fmt: skip
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower() not in (f"http://{host}", f"https://{host}"):
            return 403, f"cross-origin request from {origin[:100]!r} refused: only this server's own pages may call it."
        site = headers.get("sec-fetch-site")
        if site not in (None, "same-origin", "none"):
            navigation = scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
            if not navigation:
                return 403, f"{site} request refused: only this server's own pages may call it."
        if scope["method"] in _UNSAFE and not self.is_raw_body_path(scope["path"]):
            ctype = _media_type(headers.get("content-type", ""))
            if ctype != "application/json":
                return 415, f"this request needs a JSON body (Content-Type: application/json), not {ctype or 'no content type'}."
        return None

    def _is_own_loopback_host(self, host: str, scope: Scope) -> bool:
        server = scope.get("server")
        port = server[1] if server and len(server) > 1 else None
        name, sep, given_port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not sep:
            name, given_port = host, ""
        if name not in LOOPBACK_NAMES:
            return False
        if port is None:  # a Unix socket: no port to compare
            return True
        default = 443 if scope.get("scheme") == "https" else 80
        return given_port == str(port) or (given_port == "" and port == default)

    def _token_given(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """How the request carries the right token ("header", "cookie", "query"), or None."""
        want = (self.token or "").encode()
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), want):
            return "header"
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self._cookie_name(scope) and hmac.compare_digest(value.encode(), want):
                return "cookie"
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if name == "token" and hmac.compare_digest(value.encode(), want):
                return "query"
        return None

    # -- responses ----------------------------------------------------------------------------------------

    @staticmethod
    def _cookie_name(scope: Scope) -> str:
        # Cookies ignore ports: one name per port keeps two Ursa servers on one host from overwriting
        # each other's token.
        server = scope.get("server")
        return f"ursa_token_{server[1] if server and len(server) > 1 and server[1] else 0}"

    def _cookie_header(self, scope: Scope) -> tuple[bytes, bytes]:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        return b"set-cookie", f"{self._cookie_name(scope)}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}".encode("latin-1")

    async def _redirect_without_token(self, scope: Scope, send: Send, cookie: tuple[bytes, bytes]) -> None:
        rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True) if k != "token"]
        location = (scope.get("root_path", "") + scope["path"]) + (f"?{urlencode(rest)}" if rest else "")
        headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0"), (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"), cookie]
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _with_cookie(send: Send, cookie: tuple[bytes, bytes]) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), cookie]}
            await send(message)

        return wrapped

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        body = json.dumps({self.error_key: message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counting, send)
        except ClientDisconnect:
            if not scope.get(CLOSED_KEY):  # the server already logged why it dropped the connection
                client = scope.get("client")
                who = f"{client[0]}:{client[1]}" if client else "a client"
                log.warning('%s - "%s %s": the client went away after %d bytes of the request body; nothing was done.', who, scope["method"], scope["path"], received)
