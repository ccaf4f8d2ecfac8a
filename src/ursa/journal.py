"""The dataset journal: one append-only JSON-lines file, `<root>/.ursa/journal.jsonl`, holding every change made
to a dataset folder, in order: verify's repairs and quarantines, review's decisions, applies and undos.

Every line is a JSON object with `seq` (1, 2, ... in the order written), `at` (UTC time, ISO 8601) and `op`
(what happened), then the fields of that op: `quarantine` (`file`, `to`, `reason`), `repair` (`file`,
`new_file`, `original`, `reason`, hashes), `decide`, `undo`, `apply`, `applied`, `unapply`, `rollback` (see
`ursa.review`). A line is written, flushed and fsync'ed before the change it records is made, so a change is
never made without its line; readers fold the lines into the present state, and a change is undone by
reading its line back.

Lines written before the one journal are still read: verify's old lines in the same file (`time`, `stage`,
`action` instead of `at` and `op`; `op` and `at` are filled in from them) and review's lines in the old
`<root>/.ursa/review/journal.jsonl` (read first; nothing is written there any more).

A run killed mid-write leaves a torn last line: readers pass it over, and the next append first moves it
to `journal.jsonl.torn` beside the journal (kept, never deleted) so it cannot merge with the new line. Any
other damaged line stops the reader with an error naming the line (a decision or an apply silently dropped
could not be undone), except in verify's old lines, which ran on past their torn lines.

Appends hold `<root>/.ursa/journal.lock` (an flock on POSIX, so two processes, say a review page and a
verify, append in turn) and a lock per thread, re-entrant, so a caller can hold the lock across reading the
state and appending the line that follows from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ursa.errors import UrsaError

try:  # POSIX: a file lock also keeps two processes (two servers, a server and the CLI) in step
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock alone, one process at a time
    fcntl = None  # type: ignore[assignment]

__all__ = ["JOURNAL", "LEGACY_REVIEW_JOURNAL", "Journal", "journal_path"]

JOURNAL = Path(".ursa") / "journal.jsonl"  # relative to the dataset root
LEGACY_REVIEW_JOURNAL = Path(".ursa") / "review" / "journal.jsonl"  # review's lines before the one journal
_LOCK = Path(".ursa") / "journal.lock"


def journal_path(root: str | os.PathLike[str]) -> Path:
    """`<root>/.ursa/journal.jsonl`."""
    return Path(root) / JOURNAL


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _PathLock:
    """A re-entrant lock on one lock file: a thread lock, and an flock held while the outermost holder holds it.

    One per lock file per process (flock locks belong to an open file, so two of them in one process would
    wait on each other)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fh: Any = None

    def __enter__(self) -> None:
        self.thread_lock.acquire()
        try:
            if self.depth == 0 and fcntl is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(self.path, "a")  # held until the outermost exit
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                except BaseException:
                    fh.close()
                    raise
                self.fh = fh
        except BaseException:
            self.thread_lock.release()
            raise
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
        self.thread_lock.release()


_LOCKS: dict[str, _PathLock] = {}
_LOCKS_GUARD = threading.Lock()


def _path_lock(path: Path) -> _PathLock:
    key = os.path.abspath(path)
    with _LOCKS_GUARD:
        if key not in _LOCKS:
            _LOCKS[key] = _PathLock(Path(key))
        return _LOCKS[key]


def _normalise(line: dict[str, Any]) -> dict[str, Any]:
    """Verify's lines from before the one journal: `action` -> `op`, `time` -> `at`."""
    if "op" not in line and "action" in line:
        line = {**line, "op": line["action"]}
        if "time" in line and "at" not in line:
            line["at"] = line["time"]
    return line


class Journal:
    """The journal of one dataset root (see the module docstring); safe to share between threads and processes.

    `error` is the UrsaError subclass raised for a journal that cannot be read (the calling stage's own).
    """

    def __init__(self, root: str | os.PathLike[str], *, error: type[UrsaError] = UrsaError) -> None:
        self.root = Path(root)
        self.path = self.root / JOURNAL
        self.legacy = self.root / LEGACY_REVIEW_JOURNAL
        self.error = error
        self._lock = _path_lock(self.root / _LOCK)
        self._known: tuple[tuple[int, int, int] | None, tuple[int, int, int] | None, int] | None = None  # (stats, last seq) after our own append

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal's lock (threads and processes) for a read-then-append; re-entrant."""
        with self._lock:
            yield

    def lines(self) -> list[dict[str, Any]]:
        """Every line, oldest first (the old review journal's lines, then this file's), with `op` and `at`."""
        return self._read(self.legacy, legacy=True) + self._read(self.path, legacy=False)

    def append(self, op: str, **fields: Any) -> dict[str, Any]:
        """Write one line `{seq, at, op, **fields}` and put it on disk (fsync) before returning it."""
        with self._lock:
            seq = self._last_seq()
            line = {"seq": seq + 1, "at": _now(), "op": op, **fields}
            data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if created:
                _sync_dir(self.path.parent)  # the new file's name is durable too
            self._known = (_stat(self.legacy), _stat(self.path), seq + 1)
            return line

    # ---- reading -------------------------------------------------------------------------------------
    def _read(self, path: Path, *, legacy: bool) -> list[dict[str, Any]]:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                raw = fh.read().split("\n")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self.error(f"Cannot read the journal {str(path)!r}: {exc.strerror or exc}. Fix its permissions, then try again.") from None
        out: list[dict[str, Any]] = []
        numbered = legacy  # verify's old lines (no seq) ran on past torn lines; review's never did
        for i, text in enumerate(raw):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            if not isinstance(line, dict):
                if i >= len(raw) - 2 or not numbered:  # a torn last line, or verify's old lines: passed over
                    continue
                raise self.error(f"{path} line {i + 1} is damaged. Fix or remove that line; every other line is intact.")
            numbered = numbered or "seq" in line
            out.append(_normalise(line))
        return out

    def _last_seq(self) -> int:
        """The last seq written (under the lock). Re-reads the files only when someone else wrote since our own
        last append; sets a torn last line aside first, so the next line starts on a line of its own."""
        if self._known is not None and self._known[:2] == (_stat(self.legacy), _stat(self.path)):
            return self._known[2]
        self._set_aside_torn_tail()
        return max((int(ln.get("seq") or 0) for ln in self.lines()), default=0)

    def _set_aside_torn_tail(self) -> None:
        try:
            fh = open(self.path, "rb+")  # noqa: SIM115
        except FileNotFoundError:
            return
        with fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            start = size
            while start > 0:  # back to the byte after the last newline
                step = min(start, 1 << 16)
                fh.seek(start - step)
                cut = fh.read(step).rfind(b"\n")
                if cut >= 0:
                    start = start - step + cut + 1
                    break
                start -= step
            fh.seek(start)
            torn = fh.read()
            with open(self.path.with_name(self.path.name + ".torn"), "ab") as aside:
                aside.write(torn + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            fh.truncate(start)
            fh.flush()
            os.fsync(fh.fileno())


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _sync_dir(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows cannot open a folder
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
