"""Search providers and the query cache, with injected clients: no test touches the network."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from ursa.collect.search import DuckDuckGoProvider, SearchResult, cache_file, get_provider, search_images
from ursa.errors import CollectError


class FakeDDGS:
    """Stands in for ddgs.DDGS: answers `images` from a list, or raises what it is given."""

    def __init__(self, n: int = 5, error: BaseException | None = None) -> None:
        self.n = n
        self.error = error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def images(self, query: str, **options: Any) -> list[dict[str, Any]]:
        self.calls.append((query, options))
        if self.error is not None:
            raise self.error
        items = [{"image": f"https://img.test/{i}.jpg", "url": f"https://page.test/{i}", "title": f"bear {i}",
                  "width": "640", "height": 480} for i in range(self.n)]  # fmt: skip
        return [{"image": "", "url": "https://page.test/no-image"}, *items[: options["max_results"]]]


def test_provider_maps_results_and_provenance() -> None:
    client = FakeDDGS(n=3)
    results = DuckDuckGoProvider(client=client).search("grizzly bear", max_results=10)
    assert results[0] == SearchResult("https://img.test/0.jpg", "https://page.test/0", "bear 0", 640, 480)
    assert len(results) == 3
    query, options = client.calls[0]
    assert query == "grizzly bear" and options["max_results"] == 10 and options["backend"] == "duckduckgo"


def test_results_are_cached_on_disk(tmp_path: Path) -> None:
    client = FakeDDGS(n=50)
    provider = DuckDuckGoProvider(client=client)
    first = search_images("Grizzly  Bear", provider=provider, max_results=10, cache_dir=tmp_path)
    again = search_images("grizzly bear", provider=provider, max_results=5, cache_dir=tmp_path)
    assert again == first[:5] and len(client.calls) == 1
    assert cache_file(tmp_path, "duckduckgo", "grizzly bear").is_file()
    search_images("grizzly bear", provider=provider, max_results=20, cache_dir=tmp_path)  # wants more than cached
    search_images("grizzly bear", provider=provider, max_results=5, cache_dir=tmp_path, refresh=True)
    assert len(client.calls) == 3


def test_a_short_answer_is_all_there_is_and_is_reused(tmp_path: Path) -> None:
    client = FakeDDGS(n=3)
    provider = DuckDuckGoProvider(client=client)
    search_images("rare bear", provider=provider, max_results=100, cache_dir=tmp_path)
    assert len(search_images("rare bear", provider=provider, max_results=100, cache_dir=tmp_path)) == 3
    assert len(client.calls) == 1


def test_a_corrupt_cache_is_replaced(tmp_path: Path) -> None:
    provider = DuckDuckGoProvider(client=FakeDDGS())
    cache_file(tmp_path, "duckduckgo", "bear").write_text("{not json")
    assert len(search_images("bear", provider=provider, max_results=3, cache_dir=tmp_path)) == 3


def test_missing_library_says_how_to_install_and_suggests_url_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ddgs", None)  # import ddgs -> ImportError
    with pytest.raises(CollectError, match="pip install ddgs") as info:
        DuckDuckGoProvider().search("bear", max_results=5)
    assert "ursa download urls.txt" in str(info.value)


@pytest.mark.parametrize(("error", "message"), [(OSError("network is unreachable"), "offline"), (TimeoutError("slow"), "timed out")])
def test_offline_is_a_clear_error(error: BaseException, message: str) -> None:
    with pytest.raises(CollectError, match=message) as info:
        DuckDuckGoProvider(client=FakeDDGS(error=error)).search("bear", max_results=5)
    assert "ursa download" in str(info.value)


def test_rate_limit_is_a_clear_error() -> None:
    exceptions = pytest.importorskip("ddgs.exceptions")
    client = FakeDDGS(error=exceptions.RatelimitException("202 Ratelimit"))
    with pytest.raises(CollectError, match="rate-limited"):
        DuckDuckGoProvider(client=client).search("bear", max_results=5)


def test_library_errors_are_clear_errors() -> None:
    exceptions = pytest.importorskip("ddgs.exceptions")
    client = FakeDDGS(error=exceptions.DDGSException("No results found."))
    with pytest.raises(CollectError, match="failed: No results found"):
        DuckDuckGoProvider(client=client).search("bear", max_results=5)


def test_no_results_and_bad_input_are_clear_errors(tmp_path: Path) -> None:
    provider = DuckDuckGoProvider(client=FakeDDGS(n=0))
    with pytest.raises(CollectError, match="found no images"):
        search_images("nothing", provider=provider, max_results=5, cache_dir=tmp_path)
    with pytest.raises(CollectError, match="empty"):
        search_images("  ", provider=provider)
    with pytest.raises(CollectError, match="at least 1"):
        search_images("bear", provider=provider, max_results=0)
    with pytest.raises(CollectError, match="Unknown search provider"):
        get_provider("altavista")
    assert isinstance(get_provider("DuckDuckGo"), DuckDuckGoProvider)
