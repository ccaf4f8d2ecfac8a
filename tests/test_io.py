"""ursa._io: atomic writes and putting written files on disk."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ursa import _io
from ursa._io import atomic_write_bytes, make_durable


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_creates_folders_replaces_and_leaves_no_temp_file(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "new" / "deeper" / "f.bin"
    atomic_write_bytes(target, b"first", durable=durable)
    atomic_write_bytes(target, b"second" * 100_000, durable=durable)
    assert target.read_bytes() == b"second" * 100_000
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("syncfs", ["syncfs", "fsync each"])
def test_make_durable_syncs_once_or_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: str) -> None:
    files = [atomic_write_bytes(tmp_path / f"{i}.bin", b"x", durable=False) for i in range(3)]
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("fsync"), real_fsync(fd))[1])
    if syncfs == "syncfs":
        if _io._syncfs is None:
            pytest.skip("no syncfs on this platform")
        real = _io._syncfs
        monkeypatch.setattr(_io, "_syncfs", lambda fd: (synced.append("syncfs"), real(fd))[1])
        make_durable(files, root=tmp_path)
        assert synced == ["syncfs"]
    else:
        monkeypatch.setattr(_io, "_syncfs", None)
        make_durable(files, root=tmp_path)
        assert synced == ["fsync"] * 3
    make_durable([], root=tmp_path / "missing")  # nothing to do is not an error


def test_make_durable_reports_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "_syncfs", None)
    with pytest.raises(FileNotFoundError):
        make_durable([tmp_path / "gone.bin"], root=tmp_path)


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for a test and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("durable", [True, False])
def test_new_files_get_the_umask_mode_and_rewrites_keep_theirs(tmp_path: Path, umask: Callable[[int], int], durable: bool) -> None:
    """Regression (issue 12, item 14): mkstemp's 0600 reached every repaired, quarantined and downloaded file."""
    new = atomic_write_bytes(tmp_path / "sub" / "new.jpg", b"x", durable=durable)
    assert new.stat().st_mode & 0o777 == 0o644  # 0o666 & ~0o022, as open() gives
    umask(0o077)
    assert atomic_write_bytes(tmp_path / "private.jpg", b"x", durable=durable).stat().st_mode & 0o777 == 0o600
    mine = tmp_path / "mine.jpg"
    mine.write_bytes(b"old")
    mine.chmod(0o640)
    atomic_write_bytes(mine, b"new", durable=durable)  # a rewrite keeps the file's own mode, whatever the umask
    assert mine.read_bytes() == b"new" and mine.stat().st_mode & 0o777 == 0o640
    assert atomic_write_bytes(tmp_path / "given.jpg", b"x", mode=0o604).stat().st_mode & 0o777 == 0o604
    assert _io.file_mode(tmp_path / "missing.jpg") is None
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_temp_names_are_the_ones_a_killed_download_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The downloader removes stale `.<8 digits>.<ext>.*.tmp` files of a killed run: the temp name must match."""
    from ursa.collect.download import _STALE_TMP

    seen: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst))[1])
    atomic_write_bytes(tmp_path / "00000001.jpg", b"x")
    assert len(seen) == 1 and _STALE_TMP.match(seen[0]), seen
