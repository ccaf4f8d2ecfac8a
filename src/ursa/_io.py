"""Small file helpers shared by every stage: atomic writes, content hashes and the dataset folder's lock."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ursa.errors import UrsaError

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "make_durable", "sha256_file",
    "file_mode", "dataset_lock", "LOCK_NAME",
]  # fmt: skip

# `<root>/.ursa/<LOCK_NAME>`: held by every run that changes a dataset folder (download, verify).
LOCK_NAME = "dataset.lock"
_META_DIR = ".ursa"  # ursa.collect.manifest.META_DIR (the collect layer sits above this module)


def file_mode(path: str | os.PathLike[str]) -> int | None:
    """The permission bits of the file at `path` (symlinks followed), or None when there is none."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except (FileNotFoundError, NotADirectoryError):
        return None


def _create_temp(path: Path) -> tuple[int, str]:
    """Create `.<name>.<random>.tmp` beside `path`, exclusively, with mode 0o666 less the umask: the mode
    `open()` gives a new file (tempfile.mkstemp would give 0o600, and the rename would keep it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True, mode: int | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    An interrupted write leaves either the old file or the new one, never a partial file. With
    `durable` (the default) the data is on disk before the rename, so this holds through a power cut
    too; callers writing many files pass False and call `make_durable` on them later, once.

    `mode` sets the file's permission bits; None keeps those of the file being replaced, and gives a new
    file the umask's (0o666 & ~umask), as `open()` would, so a rewritten photo stays readable by whoever
    could read it before.
    """
    path = Path(path)
    if mode is None:
        mode = file_mode(path)  # None: a new file, created with the umask's mode
    try:
        fd, tmp = _create_temp(path)
    except FileNotFoundError:  # the folder does not exist yet (checked only then: this runs per downloaded image)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    try:
        try:
            if mode is not None:
                _chmod(fd, tmp, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def make_durable(paths: Sequence[str | os.PathLike[str]], *, root: str | os.PathLike[str]) -> None:
    """Put the data of `paths` (files under `root`) on disk: one syncfs() of root's file system on Linux
    (a single journal commit however many files), an fsync() per file elsewhere. OSError propagates."""
    if not paths:
        return
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if _syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_syncfs() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """`atomic_write_text` of `obj` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _chmod(fd: int, tmp: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows before Python 3.13
        os.chmod(tmp, mode)


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def dataset_lock(root: str | os.PathLike[str], run: str, *, error: type[UrsaError], advice: str = "") -> Iterator[None]:
    """Hold `<root>/.ursa/dataset.lock` while `run` ("download", "verify") changes the dataset folder.

    Two such runs at once would undo each other's work (a verify rewriting a file a download has just
    recorded leaves the manifest's hash wrong; two verifies append the same moves to the journal twice),
    so a second run raises `error`, naming the run that holds the lock (its pid and start time are
    written into the file) and the fix: wait for it to finish. `advice` adds another way out. The lock
    is an flock(), released by the kernel when its holder ends, even by SIGKILL; nothing is left to
    clean up. (No lock on Windows.) The caller makes `<root>/.ursa/` first.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(root) / _META_DIR / LOCK_NAME
    try:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run; "a+": never truncate another run's note
    except OSError as exc:
        raise error(f"Cannot create the lock file {str(path)!r}: {exc.strerror or exc}. ursa {run} changes files under "
                    f"{str(root)!r}; run it as a user who can write there.") from None  # fmt: skip
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            raise error(_busy_message(root, path, run, fh.read(4096), advice)) from None
        fh.seek(0)
        fh.truncate()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        fh.write(json.dumps({"run": run, "pid": os.getpid(), "started": started}) + "\n")
        fh.flush()
        yield  # closing the file releases the lock


_DOING = {"download": "writing into", "verify": "checking and repairing"}


def _busy_message(root: str | os.PathLike[str], path: Path, run: str, note: str, advice: str) -> str:
    try:
        holder = json.loads(note)
        other, who = str(holder["run"]), f"pid {int(holder['pid'])}, started {holder['started']}; "
    except (ValueError, KeyError, TypeError):  # a holder that has not written its note yet
        other, who = "", ""
    what = f"Another {other} is {_DOING.get(other, 'working on')}" if other else "Another ursa download or verify is working on"
    return (f"{what} {str(root)!r} right now ({who}it holds {str(path)!r}). Wait for it to finish, then run this "
            f"{run} again{advice}.")  # fmt: skip
