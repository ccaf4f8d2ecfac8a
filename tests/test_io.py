"""ursa._io: atomic writes and putting written files on disk."""

from __future__ import annotations

import os
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
