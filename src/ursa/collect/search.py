"""Image search providers and an on-disk query cache.

A provider turns a query into image URLs with their provenance. The one shipped uses DuckDuckGo image
search through the `ddgs` package (`pip install 'ursa[search]'`), imported only when a search runs. Search
services change and refuse requests without notice, so every failure becomes a `CollectError` that
suggests the route that always works: save URLs from a browser and run `ursa download`.

Results are cached in `<root>/.ursa/search/` (one JSON file per provider and query), so re-running a
command, or resuming an interrupted download, does not search again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from ursa._io import atomic_write_json
from ursa.errors import CollectError

__all__ = [
    "SearchResult",
    "SearchProvider",
    "DuckDuckGoProvider",
    "PROVIDERS",
    "get_provider",
    "search_images",
    "cache_file",
]

_URL_ROUTE = (
    "Instead, save image URLs from a search page in your browser (see 'Create your own dataset' in the "
    "README) and run: ursa download urls.txt --dest <root>/<class>"
)


@dataclass(frozen=True)
class SearchResult:
    """One image found by a search: its URL, the page it appeared on, and what the provider said about it."""

    url: str
    source: str = ""  # the web page showing the image
    title: str = ""
    width: int | None = None  # pixels, as reported by the provider
    height: int | None = None


class SearchProvider(Protocol):
    """Anything with a `name` and a `search` method; raise `CollectError` with a fix on any failure."""

    name: str

    def search(self, query: str, *, max_results: int) -> list[SearchResult]:
        """Up to `max_results` image results for `query`, best first."""
        ...


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class DuckDuckGoProvider:
    """DuckDuckGo image search through the `ddgs` package.

    `client` replaces the `ddgs.DDGS` instance (anything with `.images(query, **options)` returning dicts
    with `image`, `url`, `title`, `width`, `height`), which is how tests run without a network.
    """

    name = "duckduckgo"

    def __init__(self, *, client: Any | None = None, region: str = "us-en", safesearch: str = "moderate",
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.client = client
        self.region = region
        self.safesearch = safesearch
        self.timeout = timeout

    def _client(self) -> Any:
        if self.client is not None:
            return self.client
        try:
            from ddgs import DDGS
        except ImportError as exc:
            raise CollectError(
                "Image search needs the optional 'ddgs' package, which is not installed. "
                f"Install it with: pip install ddgs (or the project's 'search' extra). {_URL_ROUTE}"
            ) from exc
        return DDGS(timeout=int(max(1, self.timeout)))

    def search(self, query: str, *, max_results: int) -> list[SearchResult]:
        """Up to `max_results` results; `CollectError` when offline, rate-limited or the service changed."""
        client = self._client()
        rate_limited, timed_out, base = _ddgs_errors()
        try:
            raw = client.images(query, region=self.region, safesearch=self.safesearch,
                                max_results=max_results, backend="duckduckgo")  # fmt: skip
        except rate_limited as exc:
            raise CollectError(
                f"DuckDuckGo is refusing image searches from this machine for now (rate-limited: {exc}). "
                f"Wait a few minutes and try again. {_URL_ROUTE}"
            ) from exc
        except (timed_out, TimeoutError) as exc:
            raise CollectError(f"Image search for {query!r} timed out; you may be offline ({exc}). {_URL_ROUTE}") from exc
        except (base, OSError) as exc:
            raise CollectError(
                f"Image search for {query!r} failed: {exc or type(exc).__name__}. You may be offline, or the "
                f"search service may have changed (try: pip install -U ddgs). {_URL_ROUTE}"
            ) from exc
        results = []
        for item in raw or []:
            url = str(item.get("image") or "")
            if url:
                results.append(SearchResult(url=url, source=str(item.get("url") or ""),
                                            title=str(item.get("title") or ""),
                                            width=_int_or_none(item.get("width")),
                                            height=_int_or_none(item.get("height"))))  # fmt: skip
        return results[:max_results]


class _NeverRaised(Exception):
    """Stands in for ddgs's exception classes when ddgs is not installed (an injected client is in use)."""


def _ddgs_errors() -> tuple[type[BaseException], type[BaseException], type[BaseException]]:
    """(rate-limit, timeout, any) exception classes of ddgs, or placeholders without ddgs."""
    try:
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException
    except ImportError:
        return _NeverRaised, _NeverRaised, _NeverRaised
    return RatelimitException, TimeoutException, DDGSException


PROVIDERS: dict[str, type] = {"duckduckgo": DuckDuckGoProvider}


def get_provider(name: str) -> SearchProvider:
    """A provider by name (see `PROVIDERS`)."""
    cls = PROVIDERS.get(name.lower())
    if cls is None:
        raise CollectError(f"Unknown search provider {name!r}. Choose one of: {', '.join(sorted(PROVIDERS))}.")
    return cls()


def cache_file(cache_dir: str | os.PathLike[str], provider: str, query: str) -> Path:
    """`<cache_dir>/<provider>-<query slug>-<8 hex>.json`; the hash keeps distinct queries apart."""
    norm = " ".join(query.lower().split())
    slug = re.sub(r"[^a-z0-9]+", "-", norm).strip("-")[:60] or "query"
    digest = hashlib.sha256(f"{provider}\n{norm}".encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{provider}-{slug}-{digest}.json"


def search_images(
    query: str,
    *,
    provider: SearchProvider,
    max_results: int = 100,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
) -> list[SearchResult]:
    """Image results for `query`, from the cache in `cache_dir` when it holds enough, else from `provider`.

    A cached answer is used when it has at least `max_results` results, or when the provider returned
    fewer than were asked for (that was all it had). `refresh` ignores the cache.
    """
    query = query.strip()
    if not query:
        raise CollectError("The search query is empty. Give words to search for, e.g. ursa search \"grizzly bear\".")
    if max_results < 1:
        raise CollectError(f"--max must be at least 1 (got {max_results}).")
    path = cache_file(cache_dir, provider.name, query) if cache_dir is not None else None
    if path is not None and path.exists() and not refresh:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            results = [SearchResult(**r) for r in cached["results"]]
        except (OSError, ValueError, KeyError, TypeError):
            results, cached = [], {}  # unreadable cache: search again and overwrite it
        if results and (len(results) >= max_results or cached.get("exhausted")):
            return results[:max_results]
    results = provider.search(query, max_results=max_results)
    if not results:
        raise CollectError(f"The search for {query!r} found no images. Try other words. {_URL_ROUTE}")
    if path is not None:
        with contextlib.suppress(OSError):  # the cache only saves a search; failing to write it loses nothing
            atomic_write_json(path, {
                "provider": provider.name,
                "query": query,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "asked": max_results,
                "exhausted": len(results) < max_results,
                "results": [asdict(r) for r in results],
            })  # fmt: skip
    return results
