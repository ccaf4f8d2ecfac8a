"""Read lists of image URLs: one URL per line (as a browser-console snippet saves them) or a CSV with a url column.

Lines that are not http(s) URLs (`data:` thumbnails, `x-raw-image:` placeholders, stray text), blank lines
and repeated URLs are skipped and counted, never fatal. A list that does not exist, is not text, or holds
no URL at all raises `CollectError`.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ursa.errors import CollectError

__all__ = ["UrlList", "is_http_url", "parse_url_text", "read_url_list", "class_name_for_list", "expand_list_paths"]

# Header names accepted for the URL column of a CSV, in order of preference (compared case-insensitively).
URL_COLUMNS = ("url", "image_url", "image", "src", "href")
# Class names drop these decorations of a list's file name: urls_teddys.txt, teddys_urls.csv -> teddys.
_NAME_DECORATION = re.compile(r"^(?:urls?|links?|images?)[_\-. ]+|[_\-. ]+(?:urls?|links?|images?)$", re.IGNORECASE)
_SNIFF_BYTES = 8192


@dataclass
class UrlList:
    """The URLs read from one list, in file order without repeats, and what was skipped.

    `not_urls` holds each skipped non-http line (shortened to 200 characters); `skipped_by_kind` counts
    them by scheme (`data`, `x-raw-image`, `other`).
    """

    source: str
    urls: list[str] = field(default_factory=list)
    blank: int = 0
    duplicates: int = 0
    not_urls: list[str] = field(default_factory=list)

    @property
    def skipped_by_kind(self) -> dict[str, int]:
        kinds: Counter[str] = Counter()
        for line in self.not_urls:
            scheme = line.split(":", 1)[0].lower() if ":" in line else ""
            kinds[scheme if scheme in ("data", "x-raw-image", "blob", "file") else "other"] += 1
        return dict(kinds)

    def summary(self) -> str:
        """One line for people: '397 URLs (5 not http: x-raw-image 5; 2 repeated; 1 blank)'."""
        parts = []
        if self.not_urls:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.skipped_by_kind.items()))
            parts.append(f"{len(self.not_urls)} not http: {kinds}")
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated")
        if self.blank:
            parts.append(f"{self.blank} blank")
        extra = f" ({'; '.join(parts)} skipped)" if parts else ""
        return f"{self.source}: {len(self.urls)} URLs{extra}"


def is_http_url(text: str) -> bool:
    """True for an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _csv_url_column(first_line: str) -> tuple[str, str] | None:
    """(delimiter, column name) when `first_line` is a CSV header with a URL column, else None."""
    for delimiter in (",", "\t", ";"):
        if delimiter not in first_line:
            continue
        header = [h.strip().strip('"').lower() for h in next(csv.reader([first_line], delimiter=delimiter))]
        for name in URL_COLUMNS:
            if name in header:
                return delimiter, name
    return None


def parse_url_text(text: str, *, source: str = "<text>") -> UrlList:
    """Parse the text of a URL list. Lines are URLs unless the first line is a CSV header naming a url column.

    Surrounding whitespace and quotes are stripped; the first occurrence of a URL wins.
    """
    result = UrlList(source=source)
    text = text.lstrip("\ufeff")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    header = _csv_url_column(first)
    if header is not None:
        delimiter, column = header
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        reader.fieldnames = [(f or "").strip().strip('"').lower() for f in (reader.fieldnames or [])]
        values = [(row.get(column) or "") for row in reader]
    else:
        values = lines
    seen: set[str] = set()
    for raw in values:
        value = raw.strip().strip("\"'").strip()
        if not value:
            result.blank += 1
        elif not is_http_url(value):
            result.not_urls.append(value if len(value) <= 200 else value[:199] + "…")
        elif value in seen:
            result.duplicates += 1
        else:
            seen.add(value)
            result.urls.append(value)
    return result


def read_url_list(path: str | os.PathLike[str]) -> UrlList:
    """Read a URL list file (UTF-8 text). Raises `CollectError` if it is missing, binary or has no URL."""
    path = Path(path)
    hint = "Save one image URL per line (see 'Create your own dataset' in the README for a browser snippet)."
    if not path.exists():
        raise CollectError(f"URL list {str(path)!r} does not exist. Check the path. {hint}")
    if not path.is_file():
        raise CollectError(f"URL list {str(path)!r} is a folder, not a file. Name the .txt or .csv file itself.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CollectError(f"Cannot read URL list {str(path)!r}: {exc.strerror or exc}. Check its permissions.") from exc
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise CollectError(f"URL list {str(path)!r} is a binary file, not text. {hint}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError as exc:
            raise CollectError(f"URL list {str(path)!r} is not UTF-8 text. Save it as UTF-8; {hint}") from exc
    result = parse_url_text(text, source=path.name)
    if not result.urls:
        raise CollectError(
            f"URL list {str(path)!r} has no http(s) URL ({len(result.not_urls)} other lines, {result.blank} blank). {hint}"
        )
    return result


def class_name_for_list(path: str | os.PathLike[str]) -> str:
    """The class a list's images go to: its file name without extension and a `urls_` prefix or `_urls` suffix.

    urls_teddys.txt -> teddys; grizzly.csv -> grizzly; black_urls.txt -> black.
    """
    stem = Path(path).stem.strip()
    name = _NAME_DECORATION.sub("", stem).strip() or stem
    if name in ("", ".", "..") or name.startswith("."):
        raise CollectError(f"Cannot make a class name from list file {str(path)!r}. Rename it to urls_<class>.txt.")
    return name


def expand_list_paths(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Expand glob patterns the shell left alone (quoted, or on Windows), keeping order and dropping repeats.

    A pattern that matches nothing is kept as is, so `read_url_list` reports it as missing.
    """
    out: list[Path] = []
    for raw in paths:
        text = os.fspath(raw)
        matches = sorted(glob.glob(text)) if not Path(text).exists() and any(c in text for c in "*?[") else [text]
        for m in matches or [text]:
            p = Path(m)
            if p not in out:
                out.append(p)
    return out
