"""A concurrent, resumable image downloader that accounts for every URL in `<root>/.ursa/manifest.csv`.

Files go to `<root>/<class>/00000001.jpg`, `00000002.png`, ... (the extension comes from the bytes, not the
URL). Each file is written to a temporary name and renamed, and identical content is stored once per class
(by sha256). Every URL gets a manifest row with its status and reason; a failure never stops the run.

Resuming: URLs that already have a row are not fetched again (failed ones are with `retry_failed`). Files
written by a run that was killed before it saved its manifest are found by their sha256 and adopted by the
URL that fetched them, so a re-run neither duplicates a file nor loses one.

This module is the scheduler (queues, per-host limits, retries, file numbering, dedup, resuming) and the
public API. The HTTP details (one GET, the connection pools, the table of failure reasons) live in
`ursa.collect._http`; the helper processes in `ursa.collect._fetch_processes`; the manifest and its
saver in `ursa.collect.manifest`.

Speed: for large lists the HTTP work is shared with helper processes (`FetchProcesses`, one per CPU
beyond the first), since parsing HTTP in Python costs CPU per image (benchmarks/download_speed.py
measures it); images are written without an fsync each and made durable together just before the
manifest that names them is saved (`ManifestSaver`).

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
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from ursa._io import atomic_write_bytes, dataset_lock, sha256_file
from ursa.collect._fetch_processes import FetchProcesses, process_count
from ursa.collect._http import Fail, Fetcher, HostRouter, fetch_once, origin
from ursa.collect.manifest import META_DIR, Manifest, ManifestSaver
from ursa.collect.urls import UrlList, is_http_url
from ursa.config import CollectConfig
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
]

_NUMBERED = re.compile(r"^(\d{8})(?:\.|$)")
# Our own temporary files (see ursa._io.atomic_write_bytes) left by a run that was killed mid-write.
_STALE_TMP = re.compile(r"^\.\d{8}\.[a-z]+\..*\.tmp$")
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


class _Stop(Exception):
    """Carries an exception raised by the progress callback out of a worker; its cause is re-raised."""


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        self.saver = ManifestSaver(root, manifest)
        self.snapshot: asyncio.Future[None] | None = None
        self.helpers: FetchProcesses | None = None
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
        client = Fetcher(cfg, transport or HostRouter(per_host=cfg.per_host))
        n_proc = self.report.processes = process_count(cfg, pending) if transport is None else 1
        fetcher = None
        if n_proc > 1:
            try:
                fetcher = FetchProcesses(cfg, n_proc - 1, local=client, log=self.root / META_DIR / "fetch-processes.log")
            except OSError:  # cannot start processes here: do it all in this one
                self.report.processes = 1
        fetch = fetcher.fetch if fetcher is not None else functools.partial(fetch_once, client, cfg=cfg)
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
        host = self.hosts.setdefault(origin(job.url), asyncio.Semaphore(self.cfg.per_host))
        attempts, status = 0, None
        while True:
            attempts += 1
            try:
                async with host:
                    status, body, ext = await fetch(job.url)
                break
            except Fail as fail:
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
            # Written here, on the event loop: a small write into the page cache costs less than a thread
            # hand-off per file (GIL ping-pong; benchmarks/download_speed.py shows the difference). The
            # data reaches the disk before any manifest names the file (`ManifestSaver`). Bodies over
            # `_WRITE_ON_LOOP_BYTES` go to a thread.
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


def _interleave_by_host(jobs: Sequence[Job]) -> deque[Job]:
    """Round-robin over hosts, keeping list order within each host, so one big host does not stall the others."""
    per_host: dict[str, deque[Job]] = {}
    for job in jobs:
        per_host.setdefault(origin(job.url), deque()).append(job)
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
