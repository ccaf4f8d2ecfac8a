"""URL lists: lines and CSV, what is skipped and counted, bad files, class names from file names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ursa.collect.urls import class_name_for_list, expand_list_paths, parse_url_text, read_url_list
from ursa.errors import CollectError

SHARED_URLFILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "urlfiles"


def test_lines_skip_blanks_duplicates_and_non_http() -> None:
    text = "\ufeffhttps://a.com/1.jpg\n\n  http://b.org/x?y=1&z=2  \r\nhttps://a.com/1.jpg\ndata:image/png;base64,AAAA\nx-raw-image:///abc\nnot a url\n\"https://c.net/q.ashx\""
    result = parse_url_text(text, source="t.txt")
    assert result.urls == ["https://a.com/1.jpg", "http://b.org/x?y=1&z=2", "https://c.net/q.ashx"]
    assert (result.blank, result.duplicates, len(result.not_urls)) == (1, 1, 3)
    assert result.skipped_by_kind == {"data": 1, "x-raw-image": 1, "other": 1}
    assert "3 URLs" in result.summary() and "1 repeated" in result.summary()


def test_csv_with_url_column_and_other_columns() -> None:
    text = "title,URL,width\nbear,https://a.com/1.jpg,100\n\"b, c\",https://a.com/2.png,20\nempty,,3\n"
    result = parse_url_text(text)
    assert result.urls == ["https://a.com/1.jpg", "https://a.com/2.png"]
    assert result.blank == 1


def test_csv_without_header_is_one_url_per_line() -> None:
    # what the lesson's console snippet saved as download.csv: no header, one URL a line
    assert parse_url_text("https://a.com/1.jpg\nhttps://a.com/2.jpg").urls == ["https://a.com/1.jpg", "https://a.com/2.jpg"]


@given(st.lists(st.sampled_from(["https://h.com/a.jpg", "http://h.com/b", "", "data:x", "x-raw-image:///1", "junk"]), max_size=30))
def test_every_line_is_counted_once(lines: list[str]) -> None:
    result = parse_url_text("".join(line + "\n" for line in lines))
    assert len(result.urls) + result.blank + result.duplicates + len(result.not_urls) == len(lines)
    assert len(set(result.urls)) == len(result.urls)


def test_missing_list_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CollectError, match="does not exist"):
        read_url_list(tmp_path / "nope.txt")


def test_binary_list_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(CollectError, match="binary file"):
        read_url_list(path)


def test_folder_and_empty_lists_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CollectError, match="is a folder"):
        read_url_list(tmp_path)
    empty = tmp_path / "urls.txt"
    empty.write_text("\n\nx-raw-image:///1\n")
    with pytest.raises(CollectError, match="no http"):
        read_url_list(empty)


def test_latin1_list_is_read(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_bytes("https://a.com/b\xe4r.jpg\n".encode("latin-1"))
    assert read_url_list(path).urls == ["https://a.com/bär.jpg"]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("urls_teddys.txt", "teddys"), ("urls-black.csv", "black"), ("grizzly.txt", "grizzly"),
     ("polar_urls.txt", "polar"), ("urls.txt", "urls"), ("Brown Bear.txt", "Brown Bear")],
)  # fmt: skip
def test_class_name_for_list(name: str, cls: str) -> None:
    assert class_name_for_list(Path("x") / name) == cls


def test_expand_list_paths_expands_quoted_globs(tmp_path: Path) -> None:
    for n in ("urls_b.txt", "urls_a.txt"):
        (tmp_path / n).write_text("https://a.com/1.jpg\n")
    got = expand_list_paths([str(tmp_path / "urls_*.txt"), tmp_path / "urls_a.txt", str(tmp_path / "none_*.txt")])
    assert got == [tmp_path / "urls_a.txt", tmp_path / "urls_b.txt", tmp_path / "none_*.txt"]


@pytest.mark.skipif(not SHARED_URLFILES.is_dir(), reason="../shared/data/urlfiles is not beside the repository")
def test_parses_real_lesson_url_lists() -> None:
    files = sorted(SHARED_URLFILES.glob("*.txt"))
    assert files
    for path in files:
        result = read_url_list(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(result.urls) + result.blank + result.duplicates + len(result.not_urls) == len(lines)
        assert all(u.startswith(("http://", "https://")) for u in result.urls)
        assert class_name_for_list(path) in ("black", "grizzly", "teddys")
    black = read_url_list(SHARED_URLFILES / "urls_black.txt")
    assert black.skipped_by_kind.get("x-raw-image") == 5
