"""The download manifest: `<root>/.ursa/manifest.csv`, one row per (class, URL), the provenance of every image.

Columns (all text; empty when not known):

- `class`: the class folder under the root the URL was downloaded for
- `url`: the URL as listed (or the search result's image URL)
- `status`: `ok` (stored in `file`), `duplicate` (same bytes as `file`, stored once), `failed` (see `reason`),
  `skipped` (a list line that is not an http(s) URL), `quarantined` (moved away by `ursa verify`)
- `reason`: why it failed or was skipped, or what `ursa verify` changed
- `file`: the image's path relative to the root, with '/' separators
- `sha256`: hex sha256 of the stored bytes; `bytes`: their size
- `http_status`: the last HTTP status code received
- `query`: the search query that found the URL; `source`: the page it was found on, or the list file it came from
- `attempts`: requests made for it in the last run; `time`: when the row was last written (UTC, ISO 8601)

The file is always written whole and atomically, so a reader never sees half a row; `ManifestSaver` also
makes every file a saved manifest names durable first. This module has no network code, so `ursa.verify`
can update rows without importing httpx.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from pathlib import Path

from ursa._io import atomic_write_text, make_durable
from ursa.errors import CollectError

__all__ = ["MANIFEST_COLUMNS", "STATUSES", "META_DIR", "manifest_path", "Manifest", "ManifestSaver"]

MANIFEST_COLUMNS = (
    "class", "url", "status", "reason", "file", "sha256", "bytes",
    "http_status", "query", "source", "attempts", "time",
)  # fmt: skip
STATUSES = ("ok", "duplicate", "failed", "skipped", "quarantined")
META_DIR = ".ursa"  # hidden folder under the dataset root; data loaders ignore hidden folders


def manifest_path(root: str | os.PathLike[str]) -> Path:
    """`<root>/.ursa/manifest.csv`."""
    return Path(root) / META_DIR / "manifest.csv"


class Manifest:
    """Rows keyed by (class, url), in first-seen order. `load` reads the file if any; `save` rewrites it atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.path = manifest_path(self.root)
        self.rows: dict[tuple[str, str], dict[str, str]] = {}

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> Manifest:
        """Read `<root>/.ursa/manifest.csv`; an absent file gives an empty manifest."""
        m = cls(root)
        if not m.path.exists():
            return m
        try:
            text = m.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CollectError(
                f"Cannot read the manifest {str(m.path)!r}: {exc}. Move it aside to start a fresh manifest."
            ) from exc
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("url") is None or row.get("class") is None:
                continue
            clean = {c: (row.get(c) or "") for c in MANIFEST_COLUMNS}
            m.rows[(clean["class"], clean["url"])] = clean
        return m

    def get(self, cls: str, url: str) -> dict[str, str] | None:
        """The row for (cls, url), or None."""
        return self.rows.get((cls, url))

    def put(self, row: dict[str, object]) -> None:
        """Insert or replace the row for (row['class'], row['url']); missing columns become empty."""
        clean = {c: ("" if row.get(c) is None else str(row.get(c))) for c in MANIFEST_COLUMNS}
        self.rows[(clean["class"], clean["url"])] = clean

    def by_file(self) -> dict[str, list[dict[str, str]]]:
        """Rows grouped by their `file` (rows without a file are left out)."""
        out: dict[str, list[dict[str, str]]] = {}
        for row in self.rows.values():
            if row["file"]:
                out.setdefault(row["file"], []).append(row)
        return out

    def save(self) -> Path:
        """Write every row to `<root>/.ursa/manifest.csv` atomically."""
        return atomic_write_text(self.path, self.to_csv())

    def to_csv(self) -> str:
        """The manifest file's text: a header and every row."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        return buf.getvalue()


class ManifestSaver:
    """Saves a manifest so that every file it names is on disk first, from any thread.

    Downloaded files are written without an fsync each; before a manifest that names them is written,
    they are made durable together (`make_durable`: one syncfs on Linux). So after a crash or power cut
    a saved manifest never points at a file whose bytes were lost. `take` (on the thread that changes the
    rows) captures the rows and the files to sync; `write` (any thread) never replaces a newer save with
    an older one.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root, self.manifest = root, manifest
        self.pending: list[Path] = []  # written since the last `take`
        self.taken = self.saved = 0  # generations
        self.lock = threading.Lock()  # one write at a time
        self.pending_lock = threading.Lock()

    def written(self, path: Path) -> None:
        """Note a file written (not yet durable) that the next save must make durable first."""
        with self.pending_lock:
            self.pending.append(path)

    def take(self) -> tuple[int, list[Path], str]:
        """(generation, files to make durable, manifest text) of a save, for `write`."""
        with self.pending_lock:
            files, self.pending = self.pending, []
        self.taken += 1
        return self.taken, files, self.manifest.to_csv()

    def write(self, generation: int, files: list[Path], text: str) -> None:
        """Make `files` durable, then write `text` as the manifest, unless a newer generation is saved."""
        with self.lock:
            if generation <= self.saved:
                return
            try:
                make_durable(files, root=self.root)
                atomic_write_text(self.manifest.path, text)
            except BaseException:
                with self.pending_lock:
                    self.pending[:0] = files  # synced next time
                raise
            self.saved = generation

    def save(self) -> None:
        """`take` and `write` at once, on this thread."""
        self.write(*self.take())
