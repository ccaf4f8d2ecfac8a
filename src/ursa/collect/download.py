"""A concurrent, resumable image downloader that accounts for every URL in `<root>/.ursa/manifest.csv`.

Files go to `<root>/<class>/00000001.jpg`, `00000002.png`, ... (the extension comes from the bytes, not the
URL). Each file is written to a temporary name and renamed, and identical content is stored once per class
(by sha256). Every URL gets a manifest row with its status and reason; a failure never stops the run.

Resuming: URLs that already have a row are not fetched again (failed ones are with `retry_failed`). Files
written by a run that was killed before it saved its manifest are found by their sha256 and adopted by the
URL that fetched them, so a re-run neither duplicates a file nor loses one.

Speed: for large lists the HTTP work is shared with helper processes (`_FetchProcesses`, one per CPU
beyond the first), since parsing HTTP in Python takes a few milliseconds of CPU per image; images are
written without an fsync each and made durable together just before the manifest that names them is
saved (`_ManifestSaver`).

Politeness and safety: at most `concurrency` requests in flight, `per_host` per host; a browser-like
User-Agent; connect and read timeouts plus a deadline for the whole response (slow drips); transient
failures (connection resets, 429, 5xx) retried with exponential backoff; redirects followed up to a limit;
bodies over `max_bytes` abandoned; content sniffed from the bytes, and images whose header claims more
than `max_pixels` pixels (decompression bombs) refused without decoding them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import multiprocessing.connection
import os
import random
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from PIL import Image

from ursa._io import atomic_write_bytes, atomic_write_text, dataset_lock, make_durable, sha256_file
from ursa.collect.manifest import META_DIR, Manifest
from ursa.collect.urls import UrlList, is_http_url
from ursa.config import MAX_PIXELS, CollectConfig
from ursa.data.images import too_many_pixels
from ursa.errors import CollectError

__all__ = [
    "Job",
    "Progress",
    "DownloadReport",
    "download",
    "jobs_from_list",
    "jobs_from_search",
    "shard_of",
    "select_shard",
    "parse_shard",
    "split_dest",
    "sniff_image",
    "NotAnImage",
]

# Formats kept, by what Pillow calls them, and the extension their files get.
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
               "TIFF": ".tif", "AVIF": ".avif"}  # fmt: skip
_NUMBERED = re.compile(r"^(\d{8})(?:\.|$)")
# Our own temporary files (see ursa._io.atomic_write_bytes) left by a run that was killed mid-write.
_STALE_TMP = re.compile(r"^\.\d{8}\.[a-z]+\..*\.tmp$")
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524}
_SAVE_EVERY_S = 2.0  # seconds between manifest snapshots during a run
_WRITE_ON_LOOP_BYTES = 1 << 20  # larger downloads are written by a helper thread


@dataclass(frozen=True)
class Job:
    """One URL to fetch for one class, with its provenance (`query`, `source`) for the manifest."""

    url: str
    cls: str
    query: str = ""
    source: str = ""


@dataclass
class Progress:
    """Running counts of a download. `skipped` counts URLs an earlier run already settled."""

    total: int = 0
    ok: int = 0
    duplicate: int = 0
    failed: int = 0
    skipped: int = 0
    not_tried: int = 0  # left over once a class reached `max_images`

    @property
    def done(self) -> int:
        return self.ok + self.duplicate + self.failed + self.skipped + self.not_tried


@dataclass
class DownloadReport:
    """What a download did, for people and tests. `reasons` counts failures by kind ('http 404', 'timeout', ...)."""

    root: Path
    manifest: Path
    progress: Progress
    per_class: dict[str, Counter[str]] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    processes: int = 1  # processes that did the HTTP work, this one included (see CollectConfig.processes)
    notes: list[str] = field(default_factory=list)  # what a person should know about the run itself (a fetch process that stopped)


class NotAnImage(Exception):
    """Raised by `sniff_image` with a short reason; becomes a `failed` manifest row, never reaches a user."""


class _Stop(Exception):
    """Carries an exception raised by the progress callback out of a worker; its cause is re-raised."""


class _Fail(Exception):
    """A failed fetch: `reason` for the manifest; `transient` failures are retried."""

    def __init__(self, reason: str, *, transient: bool = False, status: int | None = None, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.status = status
        self.wait = wait


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def sniff_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(extension, width, height) of an image given its bytes; reads only the header, never decodes pixels.

    Raises `NotAnImage` with a reason for empty bodies, HTML or other text, unknown formats, and headers
    claiming more than `max_pixels` pixels (decompression bombs; the limit every stage shares by default).
    """
    if not data:
        raise NotAnImage("empty: the server sent 0 bytes")
    head = data[:64]
    known = (
        head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))
    )
    if not known:
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script", b"<meta")):
            raise NotAnImage("not an image: an HTML page")
        if text.startswith((b"<?xml", b"<svg")):
            raise NotAnImage("not an image: XML or SVG (vector drawings are not supported)")
        if text.startswith((b"{", b"[")):
            raise NotAnImage("not an image: JSON")
        raise NotAnImage(f"not an image: unknown format starting {head[:8]!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format or "", img.size
    except Image.DecompressionBombError as exc:
        raise NotAnImage(f"decompression bomb: the header claims over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise NotAnImage(f"not an image: unreadable header ({exc})") from exc
    if w * h > max_pixels:
        raise NotAnImage(f"decompression bomb: {too_many_pixels(w, h, max_pixels)}")
    ext = _EXTENSIONS.get(fmt)
    if ext is None:
        raise NotAnImage(f"not an image: unsupported format {fmt}")
    return ext, w, h


def split_dest(dest: str | os.PathLike[str]) -> tuple[Path, str]:
    """(dataset root, class name) of a class folder: data/bears/teddy -> (data/bears, 'teddy')."""
    dest = Path(dest)
    cls = dest.absolute().name
    if not cls or cls.startswith("."):
        raise CollectError(f"--dest {str(dest)!r} does not name a class folder. Use --dest <root>/<class>, e.g. data/bears/teddy.")
    return dest.parent, cls


def shard_of(url: str, count: int) -> int:
    """The shard (0 .. count-1) a URL belongs to: its sha1 modulo `count`, the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(url.encode("utf-8")).digest()[:8], "big") % count


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/N"` -> (i, N) with 0 <= i < N; anything else raises CollectError naming the fix."""
    head, sep, tail = text.partition("/")
    if not (sep and head.strip().isdigit() and tail.strip().isdigit()) or not 0 <= int(head) < int(tail):
        raise CollectError(f"--shard {text!r} is not a shard: use i/N with 0 <= i < N, e.g. --shard 0/16 ... --shard 15/16 (every URL lands in exactly one).")
    return int(head), int(tail)


def select_shard(jobs: Iterable[Job], index: int, count: int) -> list[Job]:
    """The jobs of shard `index` of `count` (by `shard_of` their URL): the shards partition any job list."""
    return [j for j in jobs if shard_of(j.url, count) == index]


def jobs_from_list(url_list: UrlList, cls: str, *, query: str = "") -> list[Job]:
    """Jobs for every URL of a list, plus one per non-http line so the manifest records it as skipped."""
    lines = [*url_list.urls, *url_list.not_urls]
    return [Job(url=u, cls=cls, query=query, source=url_list.source) for u in lines]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return min(float(value.strip()), 30.0)
    return None


@dataclass
class _ClassStore:
    """A class folder's state during a run: the next file number and where each sha256 is stored."""

    cls: str
    folder: Path
    next_number: int = 1
    by_sha: dict[str, str] = field(default_factory=dict)  # sha256 -> file relative to the root
    orphans: set[str] = field(default_factory=set)  # files on disk no manifest row points to
    ok: int = 0  # ok rows, earlier runs included (for max_images)
    inflight: int = 0


def _prepare_store(root: Path, cls: str, manifest: Manifest) -> _ClassStore:
    folder = root / cls
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = atomic_write_bytes(folder / ".ursa-write-test", b"")
        probe.unlink()
    except OSError as exc:
        raise CollectError(
            f"Cannot write to {str(folder)!r}: {exc.strerror or exc}. Choose a --dest folder you can write to."
        ) from exc
    store = _ClassStore(cls=cls, folder=folder)
    numbers = [0]
    referenced: set[str] = set()
    for row in manifest.rows.values():
        if row["class"] != cls or not row["file"]:
            continue
        referenced.add(row["file"])
        if m := _NUMBERED.match(Path(row["file"]).name):
            numbers.append(int(m.group(1)))
        if row["status"] in ("ok", "duplicate") and row["sha256"] and (root / row["file"]).is_file():
            store.by_sha.setdefault(row["sha256"], row["file"])
        store.ok += row["status"] == "ok"
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _STALE_TMP.match(entry.name) and entry.is_file():
            Path(entry.path).unlink(missing_ok=True)  # our own half-written temp file, never a user's
            continue
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if m := _NUMBERED.match(entry.name):
            numbers.append(int(m.group(1)))
        rel = f"{cls}/{entry.name}"
        if rel not in referenced:
            store.orphans.add(rel)
            store.by_sha.setdefault(sha256_file(entry.path), rel)
    store.next_number = max(numbers) + 1
    return store


class _Downloader:
    """One run: a queue per class, `concurrency` worker tasks, a semaphore per host."""

    def __init__(self, root: Path, manifest: Manifest, cfg: CollectConfig,
                 on_progress: Callable[[Progress], None] | None) -> None:  # fmt: skip
        self.root = root
        self.manifest = manifest
        self.cfg = cfg
        self.on_progress = on_progress
        self.progress = Progress()
        self.report = DownloadReport(root=root, manifest=manifest.path, progress=self.progress)
        self.queues: dict[str, deque[Job]] = {}
        self.stores: dict[str, _ClassStore] = {}
        self.hosts: dict[str, asyncio.Semaphore] = {}
        self.last_save = time.monotonic()
        self.saver = _ManifestSaver(root, manifest)
        self.snapshot: asyncio.Future[None] | None = None
        self.helpers: _FetchProcesses | None = None
        self.cond = asyncio.Condition()  # binds to the running loop on first use

    # -- bookkeeping, all on the event loop thread --------------------------------------------------
    def plan(self, jobs: Iterable[Job]) -> None:
        """Sort jobs into 'already settled' (skipped), 'not a URL' (a skipped row now) and 'to fetch'."""
        by_class: dict[str, list[Job]] = {}
        seen: set[tuple[str, str]] = set()
        for job in jobs:
            if (job.cls, job.url) in seen:
                continue
            seen.add((job.cls, job.url))
            self.progress.total += 1
            if job.cls not in self.stores:
                if not job.cls or job.cls.startswith(".") or any(c in job.cls for c in "/\\\0"):
                    raise CollectError(f"Class name {job.cls!r} is not a plain folder name. Use a name like 'teddy'.")
                self.stores[job.cls] = _prepare_store(self.root, job.cls, self.manifest)
                self.report.per_class[job.cls] = Counter()
            row = self.manifest.get(job.cls, job.url)
            if row is not None and not (row["status"] == "failed" and self.cfg.retry_failed):
                self._count(job.cls, "skipped")
            elif not is_http_url(job.url):
                self._row(job, status="skipped", reason="not an http(s) URL")
                self._count(job.cls, "skipped")
            else:
                by_class.setdefault(job.cls, []).append(job)
        for cls, items in by_class.items():
            self.queues[cls] = _interleave_by_host(items)

    def _count(self, cls: str, what: str) -> None:
        setattr(self.progress, what, getattr(self.progress, what) + 1)
        self.report.per_class[cls][what] += 1

    def _row(self, job: Job, **values: object) -> None:
        self.manifest.put({"class": job.cls, "url": job.url, "query": job.query, "source": job.source,
                           "time": _now(), **values})  # fmt: skip

    def _take(self) -> Job | None:
        limit = self.cfg.max_images
        for cls, queue in self.queues.items():
            if not queue:
                continue
            store = self.stores[cls]
            if limit is not None and store.ok >= limit:
                for _ in range(len(queue)):
                    self._count(cls, "not_tried")
                queue.clear()
                continue
            if limit is None or store.ok + store.inflight < limit:
                store.inflight += 1
                return queue.popleft()
        return None

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)
        if time.monotonic() - self.last_save > _SAVE_EVERY_S and (self.snapshot is None or self.snapshot.done()):
            # A snapshot in a helper thread: the files first (one syncfs), then the manifest naming them.
            self.last_save = time.monotonic()
            self.snapshot = asyncio.get_running_loop().run_in_executor(None, self.saver.write, *self.saver.take())

    # -- the run --------------------------------------------------------------------------------------
    async def run(self, transport: httpx.AsyncBaseTransport | None) -> None:
        """Fetch every queued job. Stops cleanly (workers cancelled, connections closed) on cancellation
        (Ctrl-C under asyncio.run) or when `on_progress` raises, which is then re-raised."""
        cfg = self.cfg
        self._notify()
        pending = sum(len(q) for q in self.queues.values())
        client = _Fetcher(cfg, transport or _HostRouter(per_host=cfg.per_host))
        n_proc = self.report.processes = _processes(cfg, pending) if transport is None else 1
        fetcher = None
        if n_proc > 1:
            try:
                fetcher = _FetchProcesses(cfg, n_proc - 1, local=client, log=self.root / META_DIR / "fetch-processes.log")
            except OSError:  # cannot start processes here: do it all in this one
                self.report.processes = 1
        fetch = fetcher.fetch if fetcher is not None else functools.partial(_fetch_once, client, cfg=cfg)
        workers = [asyncio.create_task(self._worker(fetch)) for _ in range(min(cfg.concurrency, pending))]
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if fetcher is not None:
                fetcher.close()  # they exit while the rest winds down; download() joins them
                self.helpers = fetcher
            await client.transport.aclose()
            if self.snapshot is not None:
                await asyncio.gather(self.snapshot, return_exceptions=True)  # a snapshot only; the final save reports problems
        for w in workers:
            if not w.cancelled() and w.exception() is not None:
                exc = w.exception()
                raise exc.__cause__ if isinstance(exc, _Stop) and exc.__cause__ is not None else exc  # type: ignore[misc]

    async def _worker(self, fetch: Callable[[str], Awaitable[tuple[int, bytes, str]]]) -> None:
        while True:
            async with self.cond:
                job = self._take()
                while job is None and any(self.queues.values()):
                    await self.cond.wait()
                    job = self._take()
            if job is None:
                return
            store = self.stores[job.cls]
            try:
                await self._one(fetch, job, store)
            finally:
                store.inflight -= 1
                async with self.cond:
                    self.cond.notify_all()
            try:
                self._notify()
            except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt from the callback: stop every worker
                # asyncio would let a KeyboardInterrupt escape the event loop mid-step; as an ordinary
                # exception it stops the run in order, and run() re-raises the original.
                raise _Stop() from exc

    async def _one(self, fetch: Callable[[str], Awaitable[tuple[int, bytes, str]]], job: Job, store: _ClassStore) -> None:
        host = self.hosts.setdefault(_origin(job.url), asyncio.Semaphore(self.cfg.per_host))
        attempts, status = 0, None
        while True:
            attempts += 1
            try:
                async with host:
                    status, body, ext = await fetch(job.url)
                break
            except _Fail as fail:
                status = fail.status or status
                if fail.transient and attempts <= self.cfg.retries:
                    delay = fail.wait if fail.wait is not None else self.cfg.backoff * 2 ** (attempts - 1)
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    continue
                self._fail(job, fail.reason, attempts=attempts, status=status)
                return
        await self._store(job, store, body, ext, attempts=attempts, status=status)

    async def _store(self, job: Job, store: _ClassStore, body: bytes, ext: str, *, attempts: int, status: int) -> None:
        sha = hashlib.sha256(body).hexdigest()
        common = {"sha256": sha, "bytes": len(body), "attempts": attempts, "http_status": status}
        existing = store.by_sha.get(sha)
        if existing is not None and existing in store.orphans:
            store.orphans.discard(existing)  # a file an interrupted run wrote for this URL, or the user's own
            self._stored(job, store, existing, common, reason="adopted a file already in the folder")
            return
        if existing is not None:
            self._row(job, status="duplicate", reason=f"same bytes as {existing}", file=existing, **common)
            self._count(job.cls, "duplicate")
            return
        rel = f"{job.cls}/{store.next_number:08d}{ext}"
        store.next_number += 1
        store.by_sha[sha] = rel  # claimed before the write, so a copy arriving meanwhile is a duplicate
        try:
            # Written here, on the event loop: a few hundred microseconds into the page cache, where a
            # thread hand-off per file cost more (GIL ping-pong) than the write. The data reaches the
            # disk before any manifest names the file (`_ManifestSaver`). Bodies over 1 MiB go to a thread.
            if len(body) <= _WRITE_ON_LOOP_BYTES:
                atomic_write_bytes(self.root / rel, body, durable=False)
            else:
                write = asyncio.get_running_loop().run_in_executor(None, functools.partial(atomic_write_bytes, self.root / rel, body, durable=False))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    # Stopping (Ctrl-C): the thread finishes this write anyway, so wait for it and record
                    # the file, keeping the saved manifest in step with the folder; then stop.
                    with contextlib.suppress(OSError):
                        await write
                        self._stored(job, store, rel, common)
                    raise
        except OSError as exc:
            del store.by_sha[sha]
            self._fail(job, f"write: cannot write {rel}: {exc.strerror or exc}", attempts=attempts, status=status)
            return
        self._stored(job, store, rel, common)

    def _stored(self, job: Job, store: _ClassStore, rel: str, common: dict[str, object], *, reason: str = "") -> None:
        self.saver.written(self.root / rel)
        self._row(job, status="ok", reason=reason, file=rel, **common)
        store.ok += 1
        self._count(job.cls, "ok")

    def _fail(self, job: Job, reason: str, *, attempts: int, status: int | None) -> None:
        self._row(job, status="failed", reason=reason, attempts=attempts, http_status=status)
        self._count(job.cls, "failed")
        self.report.reasons[reason.split(":", 1)[0]] += 1


async def _fetch_once(client: _Fetcher, url: str, *, cfg: CollectConfig) -> tuple[int, bytes, str]:
    """(status, body, extension) of one GET, within `cfg.total_timeout`; every failure is a `_Fail`."""
    try:
        if sys.version_info >= (3, 11):  # a deadline on this task; wait_for would start a task per request
            async with asyncio.timeout(cfg.total_timeout):
                status, body = await client.get(url)
        else:
            status, body = await asyncio.wait_for(client.get(url), cfg.total_timeout)
    except asyncio.TimeoutError as exc:
        raise _Fail(f"timeout: the response took longer than {cfg.total_timeout:g} s") from exc
    except httpx.ConnectTimeout as exc:
        raise _Fail(f"timeout: could not connect within {cfg.timeout:g} s", transient=True) from exc
    except httpx.TimeoutException as exc:
        raise _Fail(f"timeout: no data for {cfg.timeout:g} s") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise _Fail(f"bad url: {exc}") from exc
    except httpx.RemoteProtocolError as exc:
        raise _Fail(f"connection: closed before the whole response arrived ({exc})", transient=True) from exc
    except httpx.ConnectError as exc:
        raise _Fail(f"connection: cannot connect ({exc})", transient=True) from exc
    except httpx.TransportError as exc:
        raise _Fail(f"connection: {exc or type(exc).__name__}", transient=True) from exc
    return status, body, _sniff(body, cfg.max_pixels)[0]


_MIN_URLS_PER_PROCESS = 200  # below this many URLs per extra process, starting it costs more than it saves


def _processes(cfg: CollectConfig, pending: int) -> int:
    """How many fetch processes a run of `pending` URLs gets: `cfg.processes`, or by CPU count and size."""
    if sys.platform == "win32":  # the helpers' pipes need a selector event loop
        return 1
    if cfg.processes is not None:
        return max(1, cfg.processes)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus, pending // _MIN_URLS_PER_PROCESS)) if cpus > 1 else 1


class _FetchProcesses:
    """The HTTP work of a run spread over helper processes; everything else stays in this one.

    One event loop parses HTTP at ~2-3 ms of CPU per image here (httpcore, h11, asyncio), so a single
    process tops out near one core. Each of the `n` helpers runs `_fetch_once` for the URLs sent to it
    and returns (status, body, extension) or the failure; this process keeps the queue, the per-host
    limits, the retries, the files and the manifest, so resuming and the manifest's guarantees do not
    change. Hosts are dealt out in turn, two to each helper for one fetched here (this process also does
    the bookkeeping), and keep their place, so their connections stay in one pool; until a helper has
    started, its hosts are fetched here. A helper that dies fails its URLs as transient (retried here)
    and is named by `stopped()`; the helpers' stderr goes to `log` (kept only when not empty or one died);
    helpers exit when this process closes their pipe or dies, and ignore Ctrl-C (this process handles it).
    """

    def __init__(self, cfg: CollectConfig, n: int, *, local: _Fetcher, log: Path | None = None) -> None:
        self.cfg, self.local = cfg, local
        self.loop = asyncio.get_running_loop()
        self.conns: list[Any] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ready: list[bool] = []
        self.lost: list[int] = []  # helpers whose pipe closed before close(): they crashed or were killed
        self.closing = False
        self.log = log
        self._log_file = open(log, "ab") if log is not None else None  # every helper's stderr; closed in join()
        self.waiting: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self.route: dict[str, int] = {}
        self.deal = [i for i in range(n) for _ in range(2)] + [-1]  # -1: this process
        self.next_id = 0
        try:
            for i in range(n):
                self._start(i)
        except BaseException:
            self.close()
            self.join()
            raise

    def _start(self, i: int) -> None:
        """Start helper i: a fresh interpreter that imports only this module (not the caller's script, as
        multiprocessing's spawn would), in its own session so a Ctrl-C in the terminal reaches only this
        process; it talks over a socket pair and exits when this end closes."""
        mine, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen([sys.executable, "-c", "from ursa.collect.download import _fetch_helper; _fetch_helper()", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=self._log_file or subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        conn = multiprocessing.connection.Connection(mine.detach())
        conn.send(self.cfg)
        self.conns.append(conn)
        self.procs.append(proc)
        self.ready.append(False)
        self.loop.add_reader(conn.fileno(), self._receive, i)

    async def fetch(self, url: str) -> tuple[int, bytes, str]:
        i = self.route.setdefault(_origin(url), self.deal[len(self.route) % len(self.deal)])
        if i < 0 or not self.ready[i]:
            return await _fetch_once(self.local, url, cfg=self.cfg)
        self.next_id += 1
        fid, fut = self.next_id, self.loop.create_future()
        self.waiting[fid] = (fut, i)
        try:
            self.conns[i].send((fid, url))
            kind, value = await fut
        except asyncio.CancelledError:
            self.waiting.pop(fid, None)
            with contextlib.suppress(OSError, ValueError):
                self.conns[i].send((-fid, ""))  # stop that request there too
            raise
        except (OSError, ValueError) as exc:  # the helper's pipe is gone: its hosts are fetched here from now on
            self.waiting.pop(fid, None)
            self._drop(i)
            raise _Fail("connection: the fetch process stopped", transient=True) from exc
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        reason, transient, status, wait = value
        raise _Fail(reason, transient=transient, status=status, wait=wait)

    def _receive(self, i: int) -> None:
        try:
            fid, result = self.conns[i].recv()
        except (EOFError, OSError):  # the helper died: its URLs are retried here
            self._drop(i)
            return
        if fid == 0:
            self.ready[i] = True
            return
        fut, _ = self.waiting.pop(fid, (None, i))
        if fut is not None and not fut.done():
            fut.set_result(result)

    def _drop(self, i: int) -> None:
        if not self.closing and i not in self.lost:
            self.lost.append(i)
        self.ready[i] = False
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.conns[i].fileno())
        for fid, (fut, j) in list(self.waiting.items()):
            if j == i:
                del self.waiting[fid]
                if not fut.done():
                    fut.set_result(_failure(_Fail("connection: the fetch process stopped", transient=True, wait=0.0)))

    def close(self) -> None:
        """Tell the helpers to stop (they see the end of their pipe and exit); `join` waits for them."""
        self.closing = True
        for i, conn in enumerate(self.conns):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(conn.fileno())
            conn.close()
            self.ready[i] = False

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            if self.log is not None and not self.lost:
                with contextlib.suppress(OSError):
                    if self.log.stat().st_size == 0:
                        self.log.unlink()  # nothing was said: no empty log left behind

    def stopped(self) -> list[str]:
        """One line per helper that stopped before the end of the run (after `join`)."""
        where = f"; what it printed is in {self.log}" if self.log is not None else ""
        return [f"fetch process {i + 1} stopped early (exit code {self.procs[i].returncode}); its URLs were fetched by the main process{where}" for i in self.lost]


def _failure(fail: _Fail) -> tuple[str, tuple[str, bool, int | None, float | None]]:
    """A `_Fail` as a helper's answer; `_FetchProcesses.fetch` raises it again from these fields."""
    return "failed", (fail.reason, fail.transient, fail.status, fail.wait)


def _fetch_helper() -> None:
    """Entry point of a `_FetchProcesses` helper: argv[1] is its socket; the first message is the config."""
    conn = multiprocessing.connection.Connection(int(sys.argv[1]))
    try:
        cfg = conn.recv()
    except EOFError:
        return
    asyncio.run(_serve_fetches(conn, cfg))


async def _serve_fetches(conn: Any, cfg: CollectConfig) -> None:
    loop = asyncio.get_running_loop()
    client = _Fetcher(cfg, _HostRouter(per_host=cfg.per_host))
    tasks: dict[int, asyncio.Task[None]] = {}
    closed = loop.create_future()

    def send(message: object) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError):  # the parent is gone
            if not closed.done():
                closed.set_result(None)

    async def one(fid: int, url: str) -> None:
        try:
            result: tuple[str, object] = ("ok", await _fetch_once(client, url, cfg=cfg))
        except _Fail as fail:
            result = _failure(fail)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one URL, not the helper
            result = _failure(_Fail(f"internal: {type(exc).__name__}: {exc}"))
        tasks.pop(fid, None)
        send((fid, result))

    def receive() -> None:
        try:
            fid, url = conn.recv()
        except (EOFError, OSError):
            if not closed.done():
                closed.set_result(None)
            return
        if fid < 0:
            task = tasks.pop(-fid, None)
            if task is not None:
                task.cancel()
            return
        tasks[fid] = loop.create_task(one(fid, url))

    loop.add_reader(conn.fileno(), receive)
    send((0, None))  # ready
    try:
        await closed
    finally:
        loop.remove_reader(conn.fileno())
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await client.transport.aclose()


class _ManifestSaver:
    """Saves the manifest so that every file it names is on disk first, from any thread.

    Downloaded files are written without an fsync each; before a manifest that names them is written,
    they are made durable together (`make_durable`: one syncfs on Linux). So after a crash or power cut
    a saved manifest never points at a file whose bytes were lost. `take` (on the event loop) captures
    the rows and the files to sync; `write` (any thread) never replaces a newer save with an older one.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root, self.manifest = root, manifest
        self.pending: list[Path] = []  # written since the last `take`
        self.taken = self.saved = 0  # generations
        self.lock = threading.Lock()  # one write at a time
        self.pending_lock = threading.Lock()

    def written(self, path: Path) -> None:
        with self.pending_lock:
            self.pending.append(path)

    def take(self) -> tuple[int, list[Path], str]:
        with self.pending_lock:
            files, self.pending = self.pending, []
        self.taken += 1
        return self.taken, files, self.manifest.to_csv()

    def write(self, generation: int, files: list[Path], text: str) -> None:
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
        self.write(*self.take())


class _Fetcher:
    """GET with redirects, a body-size limit and browser-like headers, straight on an httpx transport.

    httpx.AsyncClient's per-request machinery (cookies, auth, event hooks) costs about as much CPU as the
    transport itself, and a downloader needs none of it; on a 2-core machine that is the difference between
    CPU-bound and network-bound. Errors are httpx's own exceptions, or `_Fail` for HTTP-level failures.
    """

    def __init__(self, cfg: CollectConfig, transport: httpx.AsyncBaseTransport) -> None:
        self.cfg = cfg
        self.transport = transport
        self.headers = {
            "User-Agent": cfg.user_agent,
            "Accept": "image/avif,image/webp,image/apng,image/*,*/*;q=0.8",
            "Accept-Language": "en-US,en;q=0.9",
        }
        self.timeouts = {"connect": cfg.timeout, "read": cfg.timeout, "write": cfg.timeout, "pool": None}

    async def get(self, url: str) -> tuple[int, bytes]:
        """(status, body) of the final response; `_Fail` for HTTP errors, too-large bodies and redirect loops."""
        for _ in range(self.cfg.max_redirects + 1):
            request = httpx.Request("GET", url, headers=self.headers, extensions={"timeout": self.timeouts})
            response = await self.transport.handle_async_request(request)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    url = str(request.url.join(location.strip()))
                    if not is_http_url(url):
                        raise _Fail(f"bad url: redirected to {url[:80]!r}", status=response.status_code)
                    continue
                return await self._read(response)
            finally:
                await response.aclose()
        raise _Fail(f"redirects: more than {self.cfg.max_redirects} (a redirect loop?)")

    async def _read(self, response: httpx.Response) -> tuple[int, bytes]:
        status, limit = response.status_code, self.cfg.max_bytes
        if status >= 300:
            raise _Fail(f"http {status}: {response.reason_phrase}".rstrip(": "), status=status,
                        transient=status in _TRANSIENT_STATUS, wait=_retry_after(response.headers.get("retry-after")))  # fmt: skip
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _Fail(f"too large: {_mib(int(length))} is over the limit of {_mib(limit)}", status=status)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise _Fail(f"too large: more than the limit of {_mib(limit)}", status=status)
            chunks.append(chunk)
        return status, b"".join(chunks)


class _HostRouter(httpx.AsyncBaseTransport):
    """One small httpcore connection pool per origin, sharing one TLS context and one network backend.

    httpcore's pool scans all its connections for every request it places (quadratic in their number),
    so a single pool of 64 connections spends more time bookkeeping than downloading; pools of
    `per_host` connections keep that cost flat and enforce the per-host limit on connections too.
    The pools are httpcore's own (what httpx.AsyncHTTPTransport wraps), built here so they can take
    `_Backend`; requests, responses and exceptions are translated to and from httpx's as httpx does.
    """

    def __init__(self, *, per_host: int) -> None:
        self.ssl = httpx.create_ssl_context()
        self.per_host = per_host
        self.backend = _Backend()
        self.pools: dict[tuple[bytes, bytes, int | None], httpcore.AsyncConnectionPool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = httpcore.AsyncConnectionPool(
                ssl_context=self.ssl, max_connections=self.per_host, max_keepalive_connections=self.per_host,
                keepalive_expiry=5.0, network_backend=self.backend)  # fmt: skip
        req = httpcore.Request(method=request.method, url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
                               headers=request.headers.raw, content=request.stream, extensions=request.extensions)  # fmt: skip
        with _httpx_errors():
            resp = await pool.handle_async_request(req)
        return httpx.Response(status_code=resp.status, headers=resp.headers, stream=_Body(resp.stream), extensions=resp.extensions)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's of the same name (httpx.ReadTimeout for httpcore.ReadTimeout, ...)."""
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise getattr(httpx, type(exc).__name__, httpx.TimeoutException)(str(exc)) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, httpcore.ProxyError) as exc:
        raise getattr(httpx, type(exc).__name__, httpx.TransportError)(str(exc)) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self.stream:
                yield part

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Stream(httpcore.AsyncNetworkStream):
    """httpcore's AnyIO stream, with the raw socket looked up once.

    httpcore asks every idle connection "is your socket readable?" before it places each request; the
    AnyIO stream answers by rebuilding its attribute table (a getpeername() system call included) every
    time, which was a tenth of the downloader's CPU. The answer itself is one poll() here.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self.inner = inner
        self.sock = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self.inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self.inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self.sock
        if info == "is_readable":
            fd = -1 if self.sock is None else self.sock.fileno()
            if fd < 0:
                return True  # gone: the next read returns b"", as httpcore expects
            if not hasattr(select, "poll"):  # Windows
                return bool(select.select([fd], [], [], 0)[0])
            poll = select.poll()  # not select(): it fails for descriptors over 1023
            poll.register(fd, select.POLLIN)
            return bool(poll.poll(0))
        return self.inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's AnyIO backend, handing out `_Stream`s."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        return _Stream(await self.inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self.inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _sniff(body: bytes, max_pixels: int) -> tuple[str, int, int]:
    try:
        return sniff_image(body, max_pixels=max_pixels)
    except NotAnImage as exc:
        raise _Fail(str(exc)) from exc


def _interleave_by_host(jobs: Sequence[Job]) -> deque[Job]:
    """Round-robin over hosts, keeping list order within each host, so one big host does not stall the others."""
    per_host: dict[str, deque[Job]] = {}
    for job in jobs:
        per_host.setdefault(_origin(job.url), deque()).append(job)
    out: deque[Job] = deque()
    queues = list(per_host.values())
    while queues:
        for q in queues:
            out.append(q.popleft())
        queues = [q for q in queues if q]
    return out


def _run_coroutine(make: Callable[[], object]) -> None:
    """asyncio.run, also from inside a running loop (Jupyter), where it runs on a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make())  # type: ignore[arg-type]
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, make()).result()  # type: ignore[arg-type]


def download(
    jobs: Iterable[Job],
    root: str | os.PathLike[str],
    *,
    config: CollectConfig = CollectConfig(),
    on_progress: Callable[[Progress], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> DownloadReport:
    """Fetch every job's URL into `<root>/<job.cls>/` and record it in `<root>/.ursa/manifest.csv`.

    `on_progress` is called with the running counts after each URL (it may raise KeyboardInterrupt to stop:
    the manifest is saved and a re-run resumes). `transport` replaces httpx's network transport (tests).
    Raises `CollectError` when the root or a class folder cannot be written; every per-URL problem becomes
    a manifest row instead.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CollectError(f"The dataset folder {str(root)!r} is a file. Choose a --dest inside a folder you can write to.")
    try:
        (root / META_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CollectError(f"Cannot create {str(root / META_DIR)!r}: {exc.strerror or exc}. Choose a --dest folder you can write to.") from exc
    # Two downloads into one folder at once would number files alike and overwrite each other's manifest;
    # a verify at the same time would rewrite files whose hashes the manifest has just recorded.
    with dataset_lock(root, "download", error=CollectError,
                      advice=", or give this one its own --dest; shards that run at the same time need their own --dest each"):  # fmt: skip
        return _download(jobs, root, config, on_progress, transport)


def _download(jobs: Iterable[Job], root: Path, config: CollectConfig, on_progress: Callable[[Progress], None] | None,
              transport: httpx.AsyncBaseTransport | None) -> DownloadReport:  # fmt: skip
    manifest = Manifest.load(root)
    run = _Downloader(root, manifest, config, on_progress)
    start = time.perf_counter()
    try:
        run.plan(jobs)
        if any(run.queues.values()):
            _run_coroutine(lambda: run.run(transport))
    except BaseException:
        with contextlib.suppress(OSError):  # keep what was done (Ctrl-C included) so a re-run resumes
            run.saver.save()
        if run.helpers is not None:
            run.helpers.join()
        raise
    try:
        run.saver.save()
    except OSError as exc:
        raise CollectError(f"Cannot write the manifest {str(manifest.path)!r}: {exc.strerror or exc}. Free disk space or fix permissions, then re-run to resume.") from exc
    finally:
        if run.helpers is not None:
            run.helpers.join()
            run.report.notes += run.helpers.stopped()
    run.report.seconds = time.perf_counter() - start
    if on_progress is not None:
        on_progress(run.progress)
    return run.report


def jobs_from_search(results: Iterable[object], cls: str, *, query: str) -> list[Job]:
    """Jobs for search results (anything with `.url` and `.source`, such as `SearchResult`), keeping provenance."""
    return [Job(url=str(getattr(r, "url")), cls=cls, query=query, source=str(getattr(r, "source", "") or "")) for r in results]
