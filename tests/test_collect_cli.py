"""The README's collect and verify commands, run through `ursa.cli.main`, against a local server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ursa.collect import search
from ursa.collect.manifest import Manifest
from ursa.collect.search import SearchResult

if TYPE_CHECKING:
    from conftest import FaultServer


class FakeProvider:
    name = "duckduckgo"

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def search(self, query: str, *, max_results: int) -> list[SearchResult]:
        return [SearchResult(u, source=f"https://page.test/{i}") for i, u in enumerate(self.urls)][:max_results]


@pytest.fixture
def lists(tmp_path: Path, server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> FaultServer:
    monkeypatch.chdir(tmp_path)
    Path("urls_teddys.txt").write_text("\n".join([*(server.url(f"img/{i}.jpg") for i in range(5)), server.url("toggle/t"), "x-raw-image:///1", ""]))
    Path("urls_black.txt").write_text("url,title\n" + "\n".join(f"{server.url(f'img/{i}')},b" for i in range(10, 14)))
    return server


def test_readme_commands(lists: FaultServer, console_script, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    code, out, err = console_script("download", "urls_teddys.txt", "--dest", "data/bears/teddy", "--max", "200")
    assert code == 0, err
    assert "teddy" in out and "http 404 1" in " ".join(out.split())
    assert "urls_teddys.txt: 6 URLs" in err
    rows = Manifest.load("data/bears").rows
    assert len(rows) == 7 and sum(r["status"] == "ok" for r in rows.values()) == 5

    code, out, err = console_script("download", "--lists", "urls_teddys.txt", "urls_black.txt", "--dest", "data/bears")
    assert code == 0, err
    assert len(list(Path("data/bears/teddys").iterdir())) == 5 and len(list(Path("data/bears/black").iterdir())) == 4

    monkeypatch.setitem(search.PROVIDERS, "duckduckgo", lambda: FakeProvider([lists.url(f"img/{i}") for i in range(20, 26)]))
    code, out, err = console_script("search", "grizzly bear", "--dest", "data/bears/grizzly", "--max", "150")
    assert code == 0, err
    grizzly = [r for r in Manifest.load("data/bears").rows.values() if r["class"] == "grizzly"]
    assert len(grizzly) == 6 and {r["query"] for r in grizzly} == {"grizzly bear"}
    assert grizzly[0]["source"].startswith("https://page.test/")
    assert list(Path("data/bears/.ursa/search").glob("duckduckgo-grizzly-bear-*.json"))

    code, out, err = console_script("verify", "data/bears", "--max-size", "500")
    assert code == 0, err
    assert "teddys" in out and "grizzly" in out and "quarantined" in out
    assert "same bytes (across classes)" in " ".join(out.split())  # teddy and teddys hold the same pictures

    lists.broken = False
    code, out, err = console_script("download", "urls_teddys.txt", "--dest", "data/bears/teddy", "--retry-failed")
    assert code == 0, err
    assert Manifest.load("data/bears").get("teddy", lists.url("toggle/t"))["status"] == "ok"  # type: ignore[index]


def test_quoted_glob_is_expanded(lists: FaultServer, console_script) -> None:  # noqa: ANN001
    code, _, err = console_script("download", "--lists", "urls_*.txt", "--dest", "data")
    assert code == 0, err
    assert sorted(p.name for p in Path("data").iterdir()) == [".ursa", "black", "teddys"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["download", "missing.txt", "--dest", "data/a"], "URL list 'missing.txt' does not exist"),
        (["download", "binary.txt", "--dest", "data/a"], "is a binary file"),
        (["download", "urls_teddys.txt", "--dest", "afile/a"], "dataset folder 'afile' is a file"),
        (["download", "--lists", "urls_teddys.txt", "--dest", "afile"], "is a file"),
        (["download", "urls_teddys.txt", "--dest", "data/a", "--max", "0"], "--max (CollectConfig.max_images) must be at least 1, got 0"),
        (["download", "urls_teddys.txt", "--dest", "data/a", "--timeout", "0"], "--timeout (CollectConfig.timeout) must be greater than 0"),
        (["download", "urls_teddys.txt", "--dest", "data/a", "--processes", "0"], "--processes (CollectConfig.processes) must be at least 1"),
        (["download", "urls_teddys.txt", "--dest", "data/a", "--per-host", "0"], "--per-host (CollectConfig.per_host) must be at least 1"),
        (["download", "urls_teddys.txt", "--dest", "data/a", "--concurrency", "0"], "--concurrency (CollectConfig.concurrency) must be"),
        (["download", "urls_teddys.txt", "--dest", "data/a", "--max-mb", "0"], "--max-mb must be greater than 0 MiB"),
        (["search", "bear", "--dest", "data/a", "--max", "0"], "--max (CollectConfig.max_images) must be at least 1"),
        (["verify", "data", "--max-size", "3"], "--max-size (VerifyConfig.max_size) must be at least 16"),
        (["verify", "nowhere"], "'nowhere' does not exist"),
        (["search", "bear", "--dest", "data/a", "--provider", "altavista"], "Unknown search provider"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv: list[str], message: str, lists: FaultServer, console_script) -> None:  # noqa: ANN001
    Path("binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    Path("afile").write_text("a file, not a folder")
    code, _, err = console_script(*argv)
    assert code == 2
    assert message in err


def test_search_without_the_library_suggests_url_lists(tmp_path: Path, console_script, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ddgs", None)
    code, _, err = console_script("search", "grizzly bear", "--dest", "data/bears/grizzly")
    assert code == 2
    assert "pip install ddgs" in err and "ursa download urls.txt" in err


def test_verify_no_repair_lists_what_it_would_fix(tmp_path: Path, console_script, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Path("data/a").mkdir(parents=True)
    Image.new("CMYK", (8, 8)).save("data/a/x.jpg")
    code, out, err = console_script("verify", "data", "--no-repair")
    assert code == 0, err
    assert "needs repair: a/x.jpg: CMYK -> RGB" in " ".join(out.split())
