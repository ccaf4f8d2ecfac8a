"""verify under hostile conditions (issue 12): the folder lock shared with download, symlinks and odd files,
a killed run's duplicates, and file modes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from ursa._io import LOCK_NAME
from ursa.collect.download import Job, download
from ursa.collect.manifest import Manifest
from ursa.errors import CollectError, VerifyError
from ursa.verify import journal_path, quarantine_dir, verify_folder

if TYPE_CHECKING:
    from conftest import FaultServer

CLI = [sys.executable, "-c", "from ursa.cli import main; main()"]


@pytest.fixture
def rotated_jpeg(encode, photo) -> Callable[..., bytes]:  # noqa: ANN001
    """`rotated_jpeg(seed=3)`: a JPEG that verify repairs (EXIF orientation 6): its repaired bytes differ from
    what it was."""

    def make(seed: int = 3) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = 6
        return encode(photo(40, 20, seed=seed), "JPEG", exif=exif.tobytes())

    return make


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included; the lock file and temporary files left out) with its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == LOCK_NAME or p.name.endswith(".tmp"):
            continue
        try:
            if p.is_file():
                out[p.relative_to(root).as_posix()] = p.read_bytes()
        except FileNotFoundError:  # a running download's file renamed away between listing and reading
            continue
    return out


def lock_holder(root: Path) -> dict[str, object]:
    try:
        return json.loads((root / ".ursa" / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def wait_for(condition, what: str, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- item 7: one folder lock for download and verify ------------------------------------------------------


def test_verify_during_a_download_is_refused_and_changes_nothing(server: FaultServer, tmp_path: Path, write, result_for, rotated_jpeg) -> None:  # noqa: ANN001
    """Regression: a verify during a download left manifest rows whose sha256 no longer matched the file."""
    pytest.importorskip("fcntl")
    server.delay = 0.2
    root = tmp_path / "data"
    write(root, "b/rotated.jpg", rotated_jpeg())  # what verify would repair if it ran
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(f"img/{i}") for i in range(40)))
    proc = subprocess.Popen([*CLI, "download", str(lst), "--dest", str(root / "a"), "--concurrency", "1", "--processes", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: lock_holder(root).get("pid") == proc.pid and any((root / "a").glob("0*")), "the download to start")
        before = snapshot(root)
        cli = subprocess.run([*CLI, "verify", str(root)], capture_output=True, text=True, timeout=120)
        assert proc.poll() is None, "the download ended before verify ran; the check proved nothing"
        after = snapshot(root)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert cli.returncode == 2, cli.stderr
    err = " ".join(cli.stderr.split())
    assert "Another download is writing into" in err and f"pid {proc.pid}" in err and "Wait for it to finish" in err
    assert "Traceback" not in cli.stderr
    changed = {k for k in before if k in after and before[k] != after[k]}
    assert not changed - {".ursa/manifest.csv"}  # the download's own snapshots may land; verify changed nothing
    assert not journal_path(root).exists() and not quarantine_dir(root).exists()
    assert (root / "b/rotated.jpg").read_bytes() == rotated_jpeg()
    report = verify_folder(root)  # the download is gone (SIGKILL): the kernel released its lock
    assert result_for(report, "b/rotated.jpg").status == "repaired"


_SLOW_VERIFY = textwrap.dedent("""
    import pathlib, sys, time
    from ursa.verify import verify_folder

    def progress(done, total):
        if done == 1:  # one file checked and repaired: say so, then stay in the middle of the run
            pathlib.Path(sys.argv[2]).touch()
            time.sleep(600)

    verify_folder(sys.argv[1], on_progress=progress)
""")


def test_download_or_a_second_verify_during_a_verify_is_refused(server: FaultServer, tmp_path: Path, write, journal, rotated_jpeg) -> None:  # noqa: ANN001
    """Regression: two verifies at once appended the same moves to the journal twice."""
    pytest.importorskip("fcntl")
    root = tmp_path / "data"
    for i in range(3):
        write(root, f"a/{i}.jpg", rotated_jpeg(seed=i))
    busy = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_VERIFY, str(root), str(busy)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the first verify has repaired one file and is still running
        wait_for(lambda: busy.exists() or proc.poll() is not None, "the first verify to start")
        assert proc.poll() is None
        assert lock_holder(root)["run"] == "verify"
        before = snapshot(root)
        cli = subprocess.run([*CLI, "verify", str(root)], capture_output=True, text=True, timeout=120)
        with pytest.raises(VerifyError, match=rf"Another verify is checking and repairing .*pid {proc.pid}.*Wait for it to finish"):
            verify_folder(root)
        with pytest.raises(CollectError, match=r"Another verify .*Wait for it to finish, then run this download again"):
            download([Job(server.url("img/1"), "a")], root)
        assert snapshot(root) == before
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert cli.returncode == 2 and "Another verify is checking and repairing" in " ".join(cli.stderr.split()), cli.stderr
    assert len([e for e in journal(root) if e["op"] == "repair"]) == 1  # only the first verify's one repair
    report = verify_folder(root)  # killed: its lock went with it
    assert report.count("repaired") == 2 and report.count("ok") == 1


# ---- item 10: symlinks and odd files are skipped and reported --------------------------------------------


def test_symlinks_and_odd_files_are_skipped_and_reported(tmp_path: Path, encode, photo, write) -> None:  # noqa: ANN001
    """Regression: one dangling symlink stopped verify for the whole dataset; a link to the root must not
    make the dataset's images duplicates of themselves."""
    root = tmp_path / "data"
    write(root, "cats/1.png", encode(photo(seed=1), "PNG"))
    write(root, "cats/2.png", encode(photo(seed=2), "PNG"))
    write(root, "dogs/3.png", encode(photo(seed=3), "PNG"))
    write(tmp_path, "elsewhere/o.png", encode(photo(seed=4), "PNG"))
    (root / "cats/gone.jpg").symlink_to(root / "cats/nothing.jpg")  # dangling
    (root / "cats/self.jpg").symlink_to(root / "cats/self.jpg")  # a loop
    (root / "everything").symlink_to(root, target_is_directory=True)  # the root again
    (root / "dogs/more").symlink_to("../cats", target_is_directory=True)  # a folder inside
    (root / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "dogs/o.png").symlink_to(tmp_path / "elsewhere/o.png")  # a file outside
    (root / "dogs/1.png").symlink_to("../cats/1.png")  # a file inside, in another class
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "cats/pipe")  # reading it would wait forever
    before = snapshot(root)
    cli = subprocess.run([*CLI, "verify", str(root)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    out = " ".join(cli.stdout.split())
    assert "skipped: cats/gone.jpg: dangling symlink" in out and "skipped: everything: symlink to a folder inside the dataset" in out
    report = verify_folder(root)
    status = {r.file: r.status for r in report.results}
    skipped = {"cats/gone.jpg", "cats/self.jpg", "everything", "dogs/more", "outside", "dogs/o.png", "dogs/1.png"}
    assert status == {"cats/1.png": "ok", "cats/2.png": "ok", "dogs/3.png": "ok"} | dict.fromkeys(skipped, "skipped") | (
        {"cats/pipe": "skipped"} if hasattr(os, "mkfifo") else {})  # fmt: skip
    reasons = {r.file: r.changes[0] for r in report.results if r.status == "skipped"}
    assert "does not exist" in reasons["cats/gone.jpg"] and "loop" in reasons["cats/self.jpg"]
    assert "outside the dataset" in reasons["outside"] and "outside the dataset" in reasons["dogs/o.png"]
    assert "not followed" in reasons["everything"] and "not followed" in reasons["dogs/more"]
    # the in-root link is what training reads as one more image: a cross-class duplicate, and the only group
    assert [(g.files, g.kind, g.cross_class) for g in report.duplicates] == [(["cats/1.png", "dogs/1.png"], "bytes", True)]
    assert report.by_label()["cats"]["skipped"] == 2 + hasattr(os, "mkfifo")
    assert snapshot(root) == before and (root / "cats/gone.jpg").is_symlink() and (root / "dogs/1.png").is_symlink()
    assert not quarantine_dir(root).exists()


def test_an_unreadable_file_is_skipped_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encode, photo, write, result_for) -> None:  # noqa: ANN001
    write(tmp_path, "a/1.png", encode(photo(), "PNG"))
    locked = write(tmp_path, "a/2.png", encode(photo(seed=1), "PNG"))
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads a file of mode 0 anyway: fail the read as it fails for anyone else
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) if self.name != "2.png" else (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    try:
        report = verify_folder(tmp_path)
    finally:
        locked.chmod(0o644)
    assert result_for(report, "a/1.png").status == "ok"
    assert result_for(report, "a/2.png").status == "skipped" and "ermission denied" in result_for(report, "a/2.png").changes[0]


# ---- item 11: a killed verify's re-run finds every duplicate ----------------------------------------------

_KILLED_VERIFY = textwrap.dedent("""
    import os, signal, sys
    from ursa.verify import verify_folder
    after = int(sys.argv[2])
    verify_folder(sys.argv[1], on_progress=lambda done, total: os.kill(os.getpid(), signal.SIGKILL) if done == after else None)
""")


def killed_verify(root: Path, after: int) -> None:
    """Run verify in a process that SIGKILLs itself right after its `after`-th file: a real kill at a known point."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_VERIFY, str(root), str(after)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.fixture
def dataset(write, encode, photo, rotated_jpeg) -> Callable[[Path], Path]:  # noqa: ANN001
    """`dataset(root)`: four images under root, two of them the same picture in two classes."""

    def make(root: Path) -> Path:
        write(root, "cats/a.jpg", rotated_jpeg())  # the same picture in two classes, both repaired by verify
        write(root, "dogs/b.jpg", rotated_jpeg())
        write(root, "dogs/c.png", encode(photo(seed=9), "PNG"))
        write(root, "dogs/d.png", encode(Image.new("RGBA", (12, 12), (9, 9, 9, 255)), "PNG"))  # repaired, no copy
        return root

    return make


def groups(report) -> list[tuple[list[str], str]]:  # noqa: ANN001
    return [(g.files, g.kind) for g in report.duplicates]


@pytest.mark.parametrize("old_journal", [False, True], ids=["journal", "journal-without-pixel-hashes"])
def test_a_rerun_after_a_killed_verify_finds_every_cross_class_duplicate(tmp_path: Path, old_journal: bool, journal, rotated_jpeg, dataset) -> None:  # noqa: ANN001
    """Regression: after a killed verify a re-run missed a cross-class duplicate a third run found: the file
    repaired before the kill had new bytes and pixels, its twin was grouped by what it was before repair."""
    whole = verify_folder(dataset(tmp_path / "whole"))
    assert groups(whole) == [(["cats/a.jpg", "dogs/b.jpg"], "bytes")]
    root = dataset(tmp_path / "killed")
    killed_verify(root, after=1)  # cats/a.jpg repaired, dogs/b.jpg not yet
    assert [e["file"] for e in journal(root)] == ["cats/a.jpg"] and (root / "cats/a.jpg").read_bytes() != rotated_jpeg()
    if old_journal:  # lines as verify wrote them before the one journal, without the pixel hash (read from the kept original)
        lines = [{"time": e["at"], "stage": "verify", "action": e["op"], **{k: v for k, v in e.items() if k not in ("seq", "at", "op", "pixels")}} for e in journal(root)]
        journal_path(root).write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"torn li')
    second = verify_folder(root)
    assert groups(second) == groups(whole)
    assert {r.file: r.status for r in second.results} == {"cats/a.jpg": "ok", "dogs/b.jpg": "repaired", "dogs/c.png": "ok", "dogs/d.png": "repaired"}
    assert groups(verify_folder(root)) == groups(whole)  # and every run after that
    assert snapshot(root / "cats") == snapshot(tmp_path / "whole/cats")  # the same repair as an uninterrupted run


def test_duplicates_follow_repairs_of_repairs(tmp_path: Path, write, rotated_jpeg) -> None:  # noqa: ANN001
    """A file repaired twice (a later run shrinks what an earlier one rotated) is still grouped with its twin."""
    root = tmp_path
    write(root, "cats/a.jpg", rotated_jpeg())
    verify_folder(root)
    write(root, "dogs/b.jpg", rotated_jpeg())  # the same picture arrives later
    from ursa.config import VerifyConfig

    report = verify_folder(root, config=VerifyConfig(max_size=16))  # both shrunk now; cats/a.jpg a second time
    assert groups(report) == [(["cats/a.jpg", "dogs/b.jpg"], "bytes")]


# ---- item 14: modes ---------------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_repaired_and_quarantined_files_keep_their_mode(tmp_path: Path, umask_022: None, encode, photo, write, result_for, rotated_jpeg) -> None:  # noqa: ANN001
    """Regression: repaired, quarantined and kept-original files came out 0600 (the originals were 0644)."""
    rotated = write(tmp_path, "a/rot.jpg", rotated_jpeg())
    rotated.chmod(0o640)
    gif = write(tmp_path, "a/pal.gif", encode(photo(), "GIF"))
    gif.chmod(0o604)
    junk = write(tmp_path, "a/junk.jpg", b"not an image")
    junk.chmod(0o644)
    plain = write(tmp_path, "a/plain.png", encode(photo(seed=2), "PNG"))
    plain.chmod(0o644)
    m = Manifest(tmp_path)
    m.put({"class": "a", "url": "http://x/1", "status": "ok", "file": "a/rot.jpg"})
    m.save()
    report = verify_folder(tmp_path)
    assert result_for(report, "a/rot.jpg").status == "repaired" and result_for(report, "a/pal.gif").new_file == "a/pal.png"
    assert mode(rotated) == 0o640 and mode(quarantine_dir(tmp_path) / "originals/a/rot.jpg") == 0o640
    assert mode(tmp_path / "a/pal.png") == 0o604 and mode(quarantine_dir(tmp_path) / "originals/a/pal.gif") == 0o604
    assert mode(quarantine_dir(tmp_path) / "a/junk.jpg") == 0o644
    assert mode(plain) == 0o644 and mode(tmp_path / ".ursa/manifest.csv") == 0o644


def test_downloaded_files_get_the_umask_mode(server: FaultServer, tmp_path: Path, umask_022: None) -> None:
    download([Job(server.url("img/1"), "a"), Job(server.url("img/2"), "a")], tmp_path)
    files = list((tmp_path / "a").iterdir())
    assert len(files) == 2 and all(mode(p) == 0o644 for p in files)
    assert mode(tmp_path / ".ursa/manifest.csv") == 0o644
