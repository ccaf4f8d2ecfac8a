"""The downloader against a real local server: every failure kind, dedup, limits, resuming, bad destinations."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

import ursa.collect._fetch_processes as fp
import ursa.collect.download as dl
from ursa._io import dataset_lock
from ursa.collect.download import Job, download, jobs_from_list, split_dest
from ursa.errors import BadImageError
from ursa.imageio import sniff_image
from ursa.collect.manifest import Manifest, ManifestSaver, manifest_path
from ursa.collect.urls import parse_url_text
from ursa.config import CollectConfig
from ursa.errors import CollectError

if TYPE_CHECKING:
    from conftest import FaultServer

FAST = CollectConfig(timeout=0.5, total_timeout=1.0, backoff=0.01, max_bytes=2**20)


def rows(root: Path) -> dict[str, dict[str, str]]:
    return {url: row for (_, url), row in Manifest.load(root).rows.items()}


def images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


FAILURES = [
    ("status/404", "http 404"),
    ("status/500", "http 500"),
    ("status/403", "http 403"),
    ("hang/x.jpg", "timeout: no data"),
    ("drip/x.jpg", "timeout: the response took longer"),
    ("html/photo.jpg", "not an image: an HTML page"),
    ("reset/x.jpg", "connection"),
    ("loop/x", "redirects: more than 5"),
    ("big/x.jpg", "too large: 3.0 MiB"),
    ("bigstream/x.jpg", "too large: more than"),
    ("bomb/x.png", "decompression bomb"),
    ("empty/x.jpg", "empty: the server sent 0 bytes"),
    ("truncated/x.jpg", "connection: closed before the whole response"),
]


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "helper-process"])
def test_every_failure_kind_is_a_manifest_row_and_the_run_goes_on(server: FaultServer, tmp_path: Path, processes: int,
                                                                   ready_helpers: list[fp.FetchProcesses]) -> None:  # fmt: skip
    """Also through a helper process: its failures come back with the same reasons, retried the same way."""
    server.hang_s = 1.5
    good = [server.url(f"img/{i}.jpg") for i in range(3)]
    bad = {server.url(path): reason for path, reason in FAILURES}
    jobs = [Job(u, "teddy") for u in [*bad, *good]]
    report = download(jobs, tmp_path, config=dataclasses.replace(FAST, processes=processes))
    assert report.processes == processes
    got = rows(tmp_path)
    assert set(got) == {*bad, *good}
    for url, reason in bad.items():
        assert got[url]["status"] == "failed", url
        assert got[url]["reason"].startswith(reason), (url, got[url]["reason"])
        assert got[url]["file"] == ""
    assert [got[u]["status"] for u in good] == ["ok"] * 3
    assert report.progress.ok == 3 and report.progress.failed == len(bad)
    assert images(tmp_path / "teddy") == ["00000001.jpg", "00000002.jpg", "00000003.jpg"]
    assert report.reasons["http 404"] == 1
    # transient failures were retried, permanent ones were not
    assert server.hits["/status/500"] == FAST.retries + 1
    assert server.hits["/status/404"] == 1
    assert server.hits["/hang/x.jpg"] == 1


def test_files_are_named_in_order_typed_by_content_and_stored_once(server: FaultServer, tmp_path: Path, make_jpeg) -> None:  # noqa: ANN001
    urls = [server.url("img/1.jpg?w=960"), server.url("png/2"), server.url("same/a.jpg"), server.url("same/b.jpg"),
            server.url("redirect/7"), server.url("img/1.jpg?again")]  # fmt: skip
    lst = parse_url_text("\n".join(urls), source="urls_teddy.txt")
    report = download(jobs_from_list(lst, "teddy", query="teddy bear"), tmp_path, config=CollectConfig(concurrency=1))
    got = rows(tmp_path)
    assert images(tmp_path / "teddy") == ["00000001.jpg", "00000002.png", "00000003.jpg", "00000004.jpg"]
    assert got[urls[3]]["status"] == "duplicate" and got[urls[3]]["file"] == "teddy/00000003.jpg"
    assert got[urls[5]]["status"] == "duplicate" and got[urls[5]]["file"] == "teddy/00000001.jpg"
    row = got[urls[4]]
    assert (row["status"], row["file"], row["query"], row["source"]) == ("ok", "teddy/00000004.jpg", "teddy bear", "urls_teddy.txt")
    assert (tmp_path / "teddy/00000004.jpg").read_bytes() == make_jpeg(7)
    assert row["sha256"] == hashlib.sha256(make_jpeg(7)).hexdigest() and row["bytes"] == str(len(make_jpeg(7)))
    assert report.progress.duplicate == 2


def test_sends_a_browser_user_agent(server: FaultServer, tmp_path: Path) -> None:
    download([Job(server.url("ua/x"), "a")], tmp_path)
    assert rows(tmp_path)[server.url("ua/x")]["status"] == "ok"
    assert all(a.startswith("Mozilla/5.0") for a in server.agents)


def test_transient_errors_are_retried_with_backoff(server: FaultServer, tmp_path: Path) -> None:
    download([Job(server.url("flaky/x"), "a")], tmp_path, config=FAST)
    row = rows(tmp_path)[server.url("flaky/x")]
    assert (row["status"], row["attempts"]) == ("ok", "3")


def test_non_http_lines_are_skipped_rows(tmp_path: Path) -> None:
    lst = parse_url_text("x-raw-image:///abc\ndata:image/png;base64,AAA\n")
    report = download(jobs_from_list(lst, "a"), tmp_path)
    assert {r["status"] for r in rows(tmp_path).values()} == {"skipped"}
    assert report.progress.skipped == 2


def test_per_host_limit_is_respected(server: FaultServer, tmp_path: Path) -> None:
    server.delay = 0.1
    jobs = [Job(server.url(f"img/{i}"), "a") for i in range(12)]
    download(jobs, tmp_path, config=CollectConfig(per_host=3, concurrency=16))
    assert server.max_inflight <= 3
    assert len(images(tmp_path / "a")) == 12


def test_max_images_stops_at_the_limit_and_resumes_to_a_higher_one(server: FaultServer, tmp_path: Path) -> None:
    jobs = [Job(server.url(f"status/404?{i}"), "a") for i in range(2)] + [Job(server.url(f"img/{i}"), "a") for i in range(10)]
    report = download(jobs, tmp_path, config=CollectConfig(max_images=3, concurrency=8))
    assert len(images(tmp_path / "a")) == 3
    assert report.progress.ok == 3 and report.progress.not_tried > 0
    assert len(rows(tmp_path)) == 3 + report.progress.failed  # untried URLs have no row yet
    download(jobs, tmp_path, config=CollectConfig(max_images=5, concurrency=8))
    assert len(images(tmp_path / "a")) == 5


def test_resume_after_ctrl_c_neither_duplicates_nor_loses(server: FaultServer, tmp_path: Path) -> None:
    server.delay = 0.02
    jobs = [Job(server.url(f"img/{i}"), "a") for i in range(40)]

    def interrupt(progress: object) -> None:
        if progress.ok >= 8:  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(jobs, tmp_path, config=CollectConfig(concurrency=4), on_progress=interrupt)
    done_before = {u for u, r in rows(tmp_path).items() if r["status"] == "ok"}
    assert len(done_before) >= 8
    hits_before = dict(server.hits)
    report = download(jobs, tmp_path, config=CollectConfig(concurrency=4))
    got = rows(tmp_path)
    assert all(got[j.url]["status"] == "ok" for j in jobs)
    assert report.progress.skipped == len(done_before)
    for url in done_before:  # settled URLs were not fetched again
        path = "/" + url.split("/", 3)[3]
        assert server.hits[path] == hits_before[path]
    files = images(tmp_path / "a")
    assert len(files) == 40
    assert len({hashlib.sha256((tmp_path / "a" / f).read_bytes()).digest() for f in files}) == 40
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "helper-process"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_resume_after_a_signal(server: FaultServer, tmp_path: Path, sig: signal.Signals, processes: str) -> None:
    """Ctrl-C saves the manifest and exits 130; a killed process may have stored files its manifest never
    recorded, which a re-run adopts. Either way the re-run completes with no copies and no partial files,
    and no helper process outlives the run."""
    server.delay = 0.05
    urls = [server.url(f"img/{i}") for i in range(60)]
    lst = tmp_path / "urls_a.txt"
    lst.write_text("\n".join(urls))
    root = tmp_path / "data"
    cmd = [sys.executable, "-c", "from ursa.cli import main; main()", "download", str(lst), "--dest", str(root / "a"), "--concurrency", "2",
           "--processes", processes]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((root / "a").glob("0*"))) < 6:
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=30)
    stored = len(list((root / "a").glob("0*")))
    assert stored >= 6, "the download never got going"
    assert _wait_for_no_helpers(), "a fetch helper outlived its parent"
    if sig == signal.SIGINT:
        assert code == 130
        assert sum(r["status"] == "ok" for r in rows(root).values()) == stored  # saved on the way out
    # simulate a kill in the middle of a write: our own temp file left behind
    (root / "a" / ".00000999.jpg.abc123.tmp").write_bytes(b"\xff\xd8half")
    download([Job(u, "a") for u in urls], root)
    got = rows(root)
    assert all(got[u]["status"] == "ok" for u in urls)
    files = [p for p in (root / "a").iterdir()]
    assert len(files) == 60 and not [p for p in files if p.name.startswith(".")]
    assert sorted(got[u]["file"] for u in urls) == sorted(f"a/{p.name}" for p in files)


def _helpers() -> list[str]:
    """Command lines of running fetch helpers (Linux /proc; empty elsewhere)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes()
            if b"\0ursa.collect._fetch_processes\0" in cmd:  # python -m ursa.collect._fetch_processes <fd>
                out.append(cmd.decode(errors="replace"))
    return out


def _wait_for_no_helpers(timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _helpers() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _helpers()


@pytest.fixture
def ready_helpers(monkeypatch: pytest.MonkeyPatch) -> list[fp.FetchProcesses]:
    """Fetch helpers that are running before the first URL is placed (a slow machine may take longer to
    start one than a small test run lasts, and the run would then fetch everything itself); the list
    collects them."""
    started: list[fp.FetchProcesses] = []

    class Ready(fp.FetchProcesses):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            for i, conn in enumerate(self.conns):
                assert conn.poll(60), "a fetch helper did not start"
                self._receive(i)  # its 'ready' message
            assert all(self.ready)
            assert len(_helpers()) >= len(self.procs), "_helpers() no longer recognises a helper's command line"
            started.append(self)

    monkeypatch.setattr(dl, "FetchProcesses", Ready)  # the class download() starts
    return started


def test_a_helper_that_dies_mid_run_loses_nothing(server: FaultServer, tmp_path: Path, ready_helpers: list[fp.FetchProcesses]) -> None:
    """Killing the fetch helper fails its in-flight URLs as transient; they are retried here and the run completes."""
    server.delay = 0.05
    started = ready_helpers
    # hosts are dealt helper, helper, here: 127.0.0.1 and localhost are two origins, both on the helper
    urls = [server.url(f"img/{i}") for i in range(60)] + [server.url(f"img/{i}").replace("127.0.0.1", "localhost") for i in range(60, 120)]
    killed = []

    def kill_once(progress: object) -> None:
        if progress.ok >= 10 and not killed:  # type: ignore[attr-defined]
            started[0].procs[0].kill()
            killed.append(progress.ok)  # type: ignore[attr-defined]

    report = download([Job(u, "a") for u in urls], tmp_path, config=CollectConfig(concurrency=8, processes=2), on_progress=kill_once)
    assert killed
    got = rows(tmp_path)
    assert all(got[u]["status"] == "ok" for u in urls), {u: got[u]["reason"] for u in urls if got[u]["status"] != "ok"}
    assert report.progress.ok == 120 and len(images(tmp_path / "a")) == 120
    log = tmp_path / ".ursa" / "fetch-processes.log"
    assert len(report.notes) == 1 and "fetch process 1 stopped early (exit code -9)" in report.notes[0] and str(log) in report.notes[0]
    assert log.is_file()


def test_what_a_helper_prints_is_kept_and_a_clean_run_leaves_no_log(server: FaultServer, tmp_path: Path, ready_helpers: list[fp.FetchProcesses]) -> None:
    urls = [server.url(f"img/{i}") for i in range(40)]
    report = download([Job(u, "a") for u in urls[:20]], tmp_path, config=CollectConfig(concurrency=4, processes=2))
    assert report.processes == 2 and report.notes == [] and not (tmp_path / ".ursa" / "fetch-processes.log").exists()
    # What a helper prints (here: the error of a message it cannot read) goes to the log; a helper that
    # then dies is named in the report with the log's path, and the run still completes.
    log = tmp_path / ".ursa" / "fetch-processes.log"
    done = []

    def garble_then_kill(progress: object) -> None:
        if not done and len(ready_helpers) == 2:  # this run's helpers have started
            helpers = ready_helpers[-1]
            helpers.conns[0].send("not a request")
            deadline = time.monotonic() + 20
            while "Traceback" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
                time.sleep(0.05)
            helpers.procs[0].kill()
            done.append(True)

    report = download([Job(u, "a") for u in urls[20:]], tmp_path, config=CollectConfig(concurrency=4, processes=2), on_progress=garble_then_kill)
    assert done and report.progress.ok == 20
    assert len(report.notes) == 1 and "exit code -9" in report.notes[0] and str(log) in report.notes[0], report.notes
    assert "Traceback" in log.read_text() and "ValueError" in log.read_text()


def test_processes_by_cpu_count_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert fp.process_count(CollectConfig(), 100) == 1  # too few URLs to pay for starting a process
    assert fp.process_count(CollectConfig(), 2000) == 2
    assert fp.process_count(CollectConfig(processes=3), 10) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert fp.process_count(CollectConfig(), 2000) == 1


def test_a_users_own_file_with_the_same_bytes_is_adopted(server: FaultServer, tmp_path: Path, make_jpeg) -> None:  # noqa: ANN001
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.jpg").write_bytes(make_jpeg(4))
    download([Job(server.url("img/4"), "a"), Job(server.url("img/5"), "a")], tmp_path)
    got = rows(tmp_path)
    assert got[server.url("img/4")]["file"] == "a/mine.jpg"
    assert images(tmp_path / "a") == ["00000001.jpg", "mine.jpg"]


def test_failed_urls_are_left_alone_unless_retry_failed(server: FaultServer, tmp_path: Path) -> None:
    jobs = [Job(server.url("toggle/x"), "a")]
    download(jobs, tmp_path)
    assert rows(tmp_path)[jobs[0].url]["status"] == "failed"
    server.broken = False
    report = download(jobs, tmp_path)
    assert report.progress.skipped == 1 and server.hits["/toggle/x"] == 1
    download(jobs, tmp_path, config=CollectConfig(retry_failed=True))
    assert rows(tmp_path)[jobs[0].url]["status"] == "ok"
    assert images(tmp_path / "a") == ["00000001.jpg"]


def test_file_numbers_are_never_reused_after_a_file_was_moved_away(server: FaultServer, tmp_path: Path) -> None:
    download([Job(server.url("img/1"), "a"), Job(server.url("img/2"), "a")], tmp_path, config=CollectConfig(concurrency=1))
    (tmp_path / "a" / "00000002.jpg").rename(tmp_path / "elsewhere.jpg")  # as verify's quarantine would
    download([Job(server.url("img/3"), "a")], tmp_path)
    assert images(tmp_path / "a") == ["00000001.jpg", "00000003.jpg"]


def test_destination_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.write_text("not a folder")
    with pytest.raises(CollectError, match="is a file"):
        download([Job("http://127.0.0.1:9/x", "a")], target)
    with pytest.raises(CollectError, match="Cannot (create|write)"):
        download([Job("http://127.0.0.1:9/x", "a")], target / "sub")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_destination_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / ".ursa").mkdir(parents=True)
    root.chmod(0o500)
    try:
        with pytest.raises(CollectError, match="Cannot write"):
            download([Job("http://127.0.0.1:9/x", "a")], root)
    finally:
        root.chmod(0o700)


def test_split_dest() -> None:
    assert split_dest("data/bears/teddy") == (Path("data/bears"), "teddy")
    with pytest.raises(CollectError, match="class folder"):
        split_dest("data/.hidden")


def test_redirect_to_a_non_http_url_fails_cleanly(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "ftp://example.com/x.jpg"})

    download([Job("http://example.test/x.jpg", "a")], tmp_path, transport=httpx.MockTransport(handler))
    assert rows(tmp_path)["http://example.test/x.jpg"]["reason"].startswith("bad url")


def test_works_inside_a_running_event_loop(tmp_path: Path, make_png) -> None:  # noqa: ANN001
    """Notebooks run an event loop; download() must still work when called from one."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=make_png(3))

    async def notebook_cell() -> None:
        download([Job("http://example.test/a", "a")], tmp_path, transport=httpx.MockTransport(handler))

    asyncio.run(notebook_cell())
    assert images(tmp_path / "a") == ["00000001.png"]


def test_manifest_lives_at_the_root(tmp_path: Path) -> None:
    download([Job("x-raw-image:///1", "teddy")], tmp_path / "bears")
    assert manifest_path(tmp_path / "bears").is_file()


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"<!DOCTYPE html><html>", "an HTML page"), (b'{"error": 1}', "JSON"),
     (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"), (b"GIF89a" + b"\x00" * 3, "unreadable header"),
     (b"\x00\x01garbage", "unknown format")],
)  # fmt: skip
def test_sniff_image_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(BadImageError, match=reason):
        sniff_image(data)


def test_sniff_image_refuses_a_decompression_bomb(bomb_png) -> None:  # noqa: ANN001
    with pytest.raises(BadImageError, match="decompression bomb"):
        sniff_image(bomb_png())


def test_sniff_image_reads_only_the_header(make_jpeg, make_png) -> None:  # noqa: ANN001
    assert sniff_image(make_png(1, (30, 20))) == (".png", 30, 20)
    assert sniff_image(make_jpeg(1)) == (".jpg", 24, 16)
    with pytest.raises(BadImageError, match="decompression bomb"):
        sniff_image(make_png(1, (30, 20)), max_pixels=100)


@pytest.mark.parametrize("cls", ["", "../escape", "a/b", ".hidden"])
def test_class_names_must_be_plain_folder_names(tmp_path: Path, cls: str) -> None:
    with pytest.raises(CollectError, match="not a plain folder name"):
        download([Job("http://127.0.0.1:9/x", cls)], tmp_path / "root")
    assert not (tmp_path / "escape").exists()


def test_manifest_saver_never_replaces_a_newer_save_with_an_older_one(tmp_path: Path) -> None:
    manifest = Manifest.load(tmp_path)
    saver = ManifestSaver(tmp_path, manifest)
    manifest.put({"class": "a", "url": "http://x/1", "status": "ok"})
    older = saver.take()
    manifest.put({"class": "a", "url": "http://x/2", "status": "ok"})
    saver.save()  # the newer one lands first
    saver.write(*older)  # a slow snapshot thread finishing late
    assert {url for _, url in Manifest.load(tmp_path).rows} == {"http://x/1", "http://x/2"}


def test_a_second_download_into_the_same_folder_at_once_is_refused(server: FaultServer, tmp_path: Path) -> None:
    """Two runs at once would number files alike and overwrite each other's manifest."""
    pytest.importorskip("fcntl")
    (tmp_path / ".ursa").mkdir()
    with dataset_lock(tmp_path, "download", error=CollectError):  # as another download running now
        with pytest.raises(CollectError, match=r"Another download is writing into .* \(pid \d+, started .*Wait for it to finish"):
            download([Job(server.url("img/1"), "a")], tmp_path)
    assert not (tmp_path / "a").exists()
    download([Job(server.url("img/1"), "a")], tmp_path)  # once it is done, this one runs
    assert rows(tmp_path)[server.url("img/1")]["status"] == "ok"
