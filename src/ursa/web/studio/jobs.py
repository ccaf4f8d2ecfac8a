"""The studio's persistent job table and its worker: long work (train, issues, export, download) as child processes.

Each job is a folder `<root>/.ursa/studio/jobs/<id>/` (id: 12 hex digits):

    job.json       the job's record (kind, options, state, times, pid; the result once it ended), written atomically
    events.jsonl   appended by the child: one JSON object a line, {"t": seconds since it started, "type": ...}:
                   "stage" {stage}, "progress" {p: the job's overall fraction 0..1, stage}, "log" {line},
                   "epoch" {row of history.csv}, "end" {state: done | failed | cancelled, result | error}
    output.log     the child's stdout and stderr (Rich's progress, tracebacks)
    urls.txt       a download job's URL list (files given to `submit`)

One worker thread runs the queued jobs, oldest first, one at a time, each as `[python, "-m", "ursa.tasks",
<job dir>]` in a session of its own (so a cancel reaches its helper processes too). A snapshot folds the
events live; when the child exits the parent folds them into job.json. A train job that ends "done" queues
the jobs its option `then` names (default: export, then issues) for the new run.

Restarting survives: a new `Jobs` reads the table back. A job recorded as running whose process is still
alive (the same pid with the same start time in /proc) is adopted and watched to its end; one whose process
is gone ends "interrupted" (or as its events say, when it finished unwatched). Stopping the worker leaves a
running child running, to be adopted by the next `Jobs`.

This module never imports training: the child does (`ursa.tasks`), and the options are checked here with
the config dataclasses alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ursa._io import atomic_write_bytes, atomic_write_json
from ursa.config import AUG_PRESETS, DataConfig, TrainConfig
from ursa.errors import StudioError, UrsaError
from ursa.web.studio.project import Conflict, NotFound

__all__ = ["FINAL", "JOBS_DIR", "KINDS", "STATES", "TRAIN_DEFAULTS", "Jobs", "check_options", "json_safe"]

KINDS = ("train", "issues", "export", "download")
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
JOBS_DIR = Path(".ursa") / "studio" / "jobs"
KILL_AFTER_S = 5.0  # seconds between SIGTERM and SIGKILL when cancelling a running job
LOG_LINES = 50  # log lines in a snapshot
POLL_S = 0.2  # how often the worker looks at its child
_ID = re.compile(r"^[0-9a-f]{12}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_OWN_FILES = {"job.json", "events.jsonl", "output.log"}
# export first: "Try it" needs the export, and a person tries the model before reading the findings
TRAIN_DEFAULTS: dict[str, Any] = {"arch": "efficientnet_lite0", "size": None, "aug": "default", "views": TrainConfig().views, "fine_tune": 0,
                                  "seed": 42, "valid_pct": 0.2, "name": "run", "then": ["export", "issues"]}  # fmt: skip
FOLLOW_UPS = ("export", "issues")  # what a train job may queue after it (`then`)
# Backbones whose weights ship inside Ursa's own dependencies: a job has no weights-file option, and the machine may be offline.
STUDIO_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def json_safe(obj: Any) -> Any:
    """`obj` as JSON can hold it: NaN and infinities as None (JSON has no NaN; browsers refuse it), numpy and
    torch scalars as Python numbers, dict keys as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    return obj


def _folder_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 128 or value.startswith(".") or any(c in value for c in "/\\\0") or any(ord(c) < 32 for c in value):
        raise StudioError(f"{what} must be a folder name (no slashes, not starting with '.'), got {value!r}.")
    return value


def check_options(kind: str, options: Any) -> dict[str, Any]:
    """The options of a job of `kind`, checked and with defaults filled in; StudioError names what is wrong.

    train: arch, size (px or None), aug (preset name), views, fine_tune (epochs), seed, valid_pct, name (the
    run folder's name), then (jobs to queue after it: a list of "issues" / "export"); issues and export:
    run (a run folder's name); download: class, max (most good images in the class, or None).
    """
    if kind not in KINDS:
        raise StudioError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}.")
    if not isinstance(options, dict):
        raise StudioError(f"job options must be a JSON object, got {type(options).__name__}.")
    allowed = {"train": set(TRAIN_DEFAULTS), "issues": {"run"}, "export": {"run"}, "download": {"class", "max"}}[kind]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise StudioError(f"unknown {kind} options {unknown}; the options are {sorted(allowed)}.")
    if kind == "train":
        o = {**TRAIN_DEFAULTS, **options}
        if o["arch"] not in STUDIO_ARCHS:
            raise StudioError(f"arch {o['arch']!r} is not one the studio can train: pick one of {', '.join(STUDIO_ARCHS)}.")
        if o["aug"] not in AUG_PRESETS:
            raise StudioError(f"aug must be one of the augmentation presets {', '.join(AUG_PRESETS)}, got {o['aug']!r}.")
        try:
            DataConfig(valid_pct=o["valid_pct"], seed=o["seed"], aug=o["aug"])
            TrainConfig(arch=o["arch"], size=o["size"], views=o["views"], fine_tune=o["fine_tune"])
        except UrsaError as exc:
            raise StudioError(str(exc)) from None
        _folder_name(o["name"], "name (the run folder)")
        then = o["then"]
        if not isinstance(then, list) or any(t not in FOLLOW_UPS for t in then) or len(set(then)) != len(then):
            raise StudioError(f"then must be a list of jobs to run after training, from {list(FOLLOW_UPS)}, got {then!r}.")
        return o
    if kind in ("issues", "export"):
        if "run" not in options:
            raise StudioError(f"a {kind} job needs the run it works on: {{\"run\": NAME}}.")
        return {"run": _folder_name(options["run"], "run")}
    o = {"class": options.get("class"), "max": options.get("max")}
    _folder_name(o["class"], "class")
    m = o["max"]
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise StudioError(f"max must be a whole number of at least 1 (or null for every URL), got {m!r}.")
    return o


# ---- processes ---------------------------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None when it is gone or a zombie.
    Where there is no /proc, "?" for a live process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return "?"
    fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and parentheses
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else "?"


def _alive(pid: Any, start: Any) -> bool:
    """True when process `pid` runs and is the one that started at `start` (not a recycled pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = _proc_start(pid)
    return now is not None and (start is None or now == start or "?" in (now, start))


class _Events:
    """The fold of one job's events.jsonl, read incrementally (only complete lines, from where it left off)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tail = b""
        self.p = 0.0
        self.stage = ""
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.epochs: list[dict[str, Any]] = []
        self.end: dict[str, Any] | None = None
        self.size = -1

    def read(self) -> _Events:
        try:
            size = self.path.stat().st_size
        except OSError:
            return self
        if size == self.size:
            return self
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return self
        self.offset += len(data)
        self.size = self.offset
        lines = (self.tail + data).split(b"\n")
        self.tail = lines.pop()  # an incomplete last line waits for the rest
        for raw in lines:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue  # a line torn by a kill is passed over
            if isinstance(ev, dict):
                self._apply(ev)
        return self

    def _apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "stage":
            self.stage = str(ev.get("stage", ""))
        elif kind == "progress":
            p = ev.get("p")
            if isinstance(p, (int, float)) and math.isfinite(p):
                self.p = max(self.p, min(1.0, max(0.0, float(p))))
            if ev.get("stage"):
                self.stage = str(ev["stage"])
        elif kind == "log":
            self.log.append(str(ev.get("line", "")))
        elif kind == "epoch":
            self.epochs.append({k: v for k, v in ev.items() if k not in ("t", "type")})
        elif kind == "end":
            self.end = ev


class Jobs:
    """The job table of project `root` and its worker (see the module docstring); safe to share between threads.

    `python` is the interpreter the children run (default: this one).
    """

    def __init__(self, root: str | Path, *, python: str = sys.executable) -> None:
        self.root = Path(root).resolve()
        self.dir = self.root / JOBS_DIR
        self.python = python
        self._lock = threading.RLock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._events: dict[str, _Events] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudioError(f"cannot create the job table {self.dir}: {exc.strerror or exc}. Choose a project folder you can write to.") from None
        self._load()

    # ---- the table on disk ---------------------------------------------------------------------------
    def _load(self) -> None:
        for d in sorted(self.dir.iterdir()):
            if not _ID.match(d.name) or not (d / "job.json").is_file():
                continue
            try:
                job = json.loads((d / "job.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a damaged record is left where it is, for a person to look at
            if not isinstance(job, dict) or job.get("id") != d.name or job.get("kind") not in KINDS:
                continue
            self._jobs[d.name] = job
            if job.get("state") == "running" and not _alive(job.get("pid"), job.get("pid_start")):
                self._finish(job, exit_code=None, lost=True)

    def _write(self, job: dict[str, Any]) -> None:
        atomic_write_json(self.dir / job["id"] / "job.json", job)

    def _fold(self, job_id: str) -> _Events:
        ev = self._events.get(job_id)
        if ev is None:
            ev = self._events[job_id] = _Events(self.dir / job_id / "events.jsonl")
        return ev.read()

    def _job(self, job_id: Any) -> dict[str, Any]:
        if not isinstance(job_id, str) or not _ID.match(job_id):
            raise NotFound(f"{str(job_id)[:40]!r} is not a job id (12 hex digits).")
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"there is no job {job_id}.")
        return job

    # ---- snapshots -----------------------------------------------------------------------------------
    def _snapshot(self, job: dict[str, Any]) -> dict[str, Any]:
        state = job["state"]
        if state == "running":
            ev = self._fold(job["id"])
            progress, stage, log, epochs = ev.p, ev.stage, list(ev.log), list(ev.epochs)
        else:
            progress, stage, log, epochs = job.get("progress", 0.0), job.get("stage", ""), job.get("log", []), job.get("epochs", [])
        started, ended = job.get("started_t"), job.get("ended_t")
        seconds = None if started is None else round((ended if ended is not None else time.time()) - started, 3)
        snap = {
            "id": job["id"], "kind": job["kind"], "state": state, "progress": 1.0 if state == "done" else progress,
            "stage": stage, "log": log[-LOG_LINES:], "epochs": epochs, "result": job.get("result"), "error": job.get("error"),
            "options": job.get("options", {}), "created": job.get("created"), "started": job.get("started"), "ended": job.get("ended"),
            "seconds": seconds,
        }  # fmt: skip
        return json_safe(snap)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's snapshot: {"id", "kind", "state", "progress" 0..1, "stage", "log" (last 50 lines), "epochs"
        (history rows), "result", "error", "options", "created", "started", "ended" (ISO 8601 UTC), "seconds"}.
        NotFound for an unknown or malformed id."""
        with self._lock:
            return self._snapshot(self._job(job_id))

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """Snapshots of the `limit` newest jobs, newest first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.get("created_t", 0.0), j["id"]), reverse=True)
            return [self._snapshot(j) for j in jobs[: max(0, int(limit))]]

    def wait(self, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Block until the job is in a final state or `timeout` seconds passed; its snapshot either way."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.get(job_id)
            if snap["state"] in FINAL or time.monotonic() >= deadline:
                return snap
            time.sleep(0.05)

    # ---- changes -------------------------------------------------------------------------------------
    def submit(self, kind: str, options: dict[str, Any], *, files: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Queue a job of `kind` with `options` (checked: `check_options`); `files` are written into its folder
        (a download needs "urls.txt"). Returns its snapshot (state "queued")."""
        options = check_options(kind, options)
        files = dict(files or {})
        for name, data in files.items():
            if not isinstance(name, str) or not _FILE.match(name) or name in _OWN_FILES or not isinstance(data, (bytes, bytearray)):
                raise StudioError(f"job file {name!r} must be a plain file name with bytes (not one of {sorted(_OWN_FILES)}).")
        if kind == "download" and "urls.txt" not in files:
            raise StudioError("a download job needs its URL list as the file urls.txt.")
        with self._lock:
            job_id = secrets.token_hex(6)
            while job_id in self._jobs or (self.dir / job_id).exists():
                job_id = secrets.token_hex(6)
            t = time.time()
            job = {"id": job_id, "kind": kind, "state": "queued", "options": options, "created": _now(), "created_t": t, "started": None,
                   "ended": None, "result": None, "error": None, "progress": 0.0, "stage": "queued", "log": [], "epochs": []}  # fmt: skip
            stage = self.dir / f".{job_id}.new"  # the folder appears whole or not at all
            try:
                stage.mkdir(parents=True)
                for name, data in files.items():
                    atomic_write_bytes(stage / name, bytes(data))
                atomic_write_json(stage / "job.json", job)
                os.rename(stage, self.dir / job_id)
            except OSError as exc:
                shutil.rmtree(stage, ignore_errors=True)  # only our own half-made folder
                raise StudioError(f"cannot write the job folder under {self.dir}: {exc.strerror or exc}.") from None
            self._jobs[job_id] = job
            self._wake.set()
            return self._snapshot(job)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once; a running one by SIGTERM to its process group (SIGKILL after 5 s),
        ending "cancelled". Conflict for a job that already ended."""
        with self._lock:
            job = self._job(job_id)
            state = job["state"]
            if state in FINAL:
                raise Conflict(f"job {job_id} has already ended ({state}); there is nothing to cancel.")
            if state == "queued":
                job.update(state="cancelled", ended=_now(), ended_t=time.time(), stage="cancelled before it started")
                self._write(job)
                return self._snapshot(job)
            job["cancel_requested"] = True
            self._write(job)
            pid, start = job.get("pid"), job.get("pid_start")
        if _alive(pid, start):
            self._signal(pid, signal.SIGTERM)
            threading.Thread(target=self._kill_later, args=(job_id, pid, start), daemon=True, name=f"ursa-kill-{job_id}").start()
        return self.get(job_id)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # its own session: the pgid is its pid; helper processes get it too
        except OSError:
            try:
                os.kill(pid, sig)
            except OSError:
                pass  # already gone

    def _kill_later(self, job_id: str, pid: int, start: Any) -> None:
        deadline = time.monotonic() + KILL_AFTER_S
        while time.monotonic() < deadline:
            if not _alive(pid, start):
                return
            time.sleep(0.1)
        if _alive(pid, start):
            self._signal(pid, signal.SIGKILL)

    # ---- the worker ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="ursa-studio-jobs")
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker thread. A running child keeps running; the next Jobs adopts it."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def _next(self) -> dict[str, Any] | None:
        with self._lock:
            running = [j for j in self._jobs.values() if j["state"] == "running"]
            if running:  # adopted from an earlier Jobs: watched before anything new starts
                return running[0]
            queued = sorted((j for j in self._jobs.values() if j["state"] == "queued"), key=lambda j: (j.get("created_t", 0.0), j["id"]))
            return queued[0] if queued else None

    def _hold_worker_lock(self) -> Any:
        """An flock on `<jobs dir>/worker.lock`, held while this worker runs jobs, so two studios opened on one
        project never start the same queued job twice (the second waits until the first stops). None while
        another process holds it; a dummy where there is no fcntl (Windows)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        fh = open(self.dir / "worker.lock", "a")  # noqa: SIM115 - held until the worker stops
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return None
        return fh

    def _loop(self) -> None:
        lock = None
        try:
            while not self._stop.is_set() and lock is None:
                lock = self._hold_worker_lock()
                if lock is None:
                    self._stop.wait(1.0)
            if lock is not None:
                with self._lock:  # another studio may have run, ended or added jobs meanwhile: the disk is the truth
                    self._jobs.clear()
                    self._events.clear()
                    self._load()
            self._run_jobs()
        finally:
            if lock is not None and lock is not True:
                lock.close()  # releases the flock

    def _run_jobs(self) -> None:
        while not self._stop.is_set():
            job = self._next()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                if job["state"] == "queued":
                    self._launch(job)
                if job["state"] == "running":
                    self._watch(job)
            except Exception as exc:  # noqa: BLE001 - the worker outlives any one job; the job records why it failed
                with self._lock:
                    if job["state"] not in FINAL:
                        job.update(state="failed", error=f"the studio could not run this job: {type(exc).__name__}: {exc}", ended=_now(), ended_t=time.time())
                        self._write(job)

    def _launch(self, job: dict[str, Any]) -> None:
        d = self.dir / job["id"]
        with self._lock:
            if job["state"] != "queued":  # cancelled meanwhile
                return
            log = open(d / "output.log", "ab")  # noqa: SIM115 - handed to the child
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                proc = subprocess.Popen([self.python, "-m", "ursa.tasks", str(d)], cwd=self.root, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env)  # fmt: skip
            except OSError as exc:
                job.update(state="failed", error=f"cannot start {self.python}: {exc.strerror or exc}", ended=_now(), ended_t=time.time())
                self._write(job)
                return
            finally:
                log.close()
            self._procs[job["id"]] = proc
            job.update(state="running", started=_now(), started_t=time.time(), pid=proc.pid, pid_start=_proc_start(proc.pid), stage="starting")
            self._write(job)

    def _watch(self, job: dict[str, Any]) -> None:
        proc = self._procs.get(job["id"])
        while not self._stop.is_set():
            if proc is not None:
                code = proc.poll()
                if code is not None:
                    self._finish(job, exit_code=code)
                    return
            elif not _alive(job.get("pid"), job.get("pid_start")):
                self._finish(job, exit_code=None)
                return
            self._stop.wait(POLL_S)

    def _finish(self, job: dict[str, Any], *, exit_code: int | None, lost: bool = False) -> None:
        """Fold the events of a job whose process has ended into its record; queue its follow-ups."""
        follow: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            self._procs.pop(job["id"], None)
            ev = self._fold(job["id"])
            end = ev.end
            if end is not None and end.get("state") in ("done", "failed", "cancelled"):
                state, result, error = end["state"], end.get("result"), end.get("error")
            elif job.get("cancel_requested"):
                state, result, error = "cancelled", None, "cancelled"
            elif lost:
                state, result, error = "interrupted", None, "the studio stopped while this job was running, and its process is gone. Start it again."
            else:
                how = f"exit code {exit_code}" if exit_code is not None and exit_code >= 0 else f"signal {-exit_code}" if exit_code is not None else "no exit code"
                state, result, error = "failed", None, f"the job's process ended without finishing ({how}); see {self.dir / job['id'] / 'output.log'}."
            ended_t = time.time()
            job.update(state=state, result=json_safe(result), error=error, ended=_now(), ended_t=ended_t, progress=1.0 if state == "done" else ev.p,
                       stage=ev.stage if state != "done" else "done", log=list(ev.log), epochs=json_safe(ev.epochs), exit_code=exit_code)  # fmt: skip
            if state == "done" and job["kind"] == "train" and isinstance(result, dict) and result.get("run"):
                follow = [(k, {"run": result["run"]}) for k in job["options"].get("then", [])]
            # the follow-ups are queued before the training is seen as done (the lock is re-entrant), so
            # whoever sees it done also sees what it queued
            for kind, options in follow:
                try:
                    self.submit(kind, options)
                except StudioError:
                    pass  # a run name the checks refuse cannot come from train_run; nothing to queue
            self._write(job)
            self._events.pop(job["id"], None)
