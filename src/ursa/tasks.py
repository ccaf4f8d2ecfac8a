"""`python -m ursa.tasks JOBDIR`: run one studio job (`ursa.web.studio.jobs`) and report it as events.

The job folder holds job.json (its kind and options; the project root is the folder four levels up:
`<root>/.ursa/studio/jobs/<id>/`). The job runs through the same public functions the CLI calls:

    train     ursa.train.recipe.train_run on the project's class folders (cleaned.csv when there is one)
    issues    ursa.interpret.issues.find_issues, and confusion.png / top_losses.png into the run folder
    export    ursa.export.export_run into models/<run> (done at once when that export exists and loads)
    download  ursa.collect.download.download of <job dir>/urls.txt into a class folder

Events are appended to `<job dir>/events.jsonl`, one JSON object a line with `t` (seconds since the start)
and `type`: "stage" {stage}, "progress" {p (the job's overall fraction, 0..1), stage}, "log" {line},
"epoch" {history row}, and last "end" {state: "done" | "failed" | "cancelled", result | error}. SIGTERM (a
cancel) ends the job "cancelled"; an UrsaError "failed" with its message; any other exception "failed" with
its one-line text (the traceback goes to stdout, which the studio keeps in output.log). Exit code 0 when
done, 1 when failed, 130 when cancelled.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ursa.errors import UrsaError
from ursa.web.studio.jobs import json_safe

__all__ = ["RUNNERS", "Cancelled", "Events", "main"]

_THROTTLE_S = 0.1  # at most ten progress lines a second


class Cancelled(KeyboardInterrupt):
    """Raised in the job when SIGTERM arrives: a KeyboardInterrupt, so no `except Exception` swallows it, asyncio
    lets it out of the downloader's event loop, and the downloader saves its manifest on the way out (as for Ctrl-C)."""


class Events:
    """Appends a job's events to `path` (see the module docstring). A SIGTERM that arrives while a line is being
    written is raised once the line is whole, so the file never holds a torn line followed by another."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the job's lifetime
        self.t0 = time.monotonic()
        self.p = 0.0
        self._last = 0.0
        self._writing = False
        self.cancel_pending = False

    def emit(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"t": round(time.monotonic() - self.t0, 3), "type": kind, **json_safe(fields)}, default=str)
        self._writing = True
        try:
            self.fh.write(line + "\n")
            self.fh.flush()
        finally:
            self._writing = False
        if self.cancel_pending and kind != "end":
            self.cancel_pending = False
            raise Cancelled

    def on_sigterm(self, signum: int, frame: Any) -> None:
        if self._writing:
            self.cancel_pending = True
        else:
            raise Cancelled

    def stage(self, stage: str) -> None:
        self.emit("stage", stage=stage)
        self.log(stage)

    def progress(self, p: float | None, stage: str, *, force: bool = False) -> None:
        """The overall fraction `p` (None: nudge it a quarter of the way towards `p_cap` ... see `nudge`)."""
        if p is not None and math.isfinite(p):
            self.p = max(self.p, min(1.0, max(0.0, float(p))))
        now = time.monotonic()
        if force or now - self._last >= _THROTTLE_S:
            self._last = now
            self.emit("progress", p=round(self.p, 4), stage=stage)

    def nudge(self, stage: str, *, cap: float) -> None:
        """Progress of unknown length (a step message): a quarter of the way from here to `cap`."""
        self.progress(self.p + (cap - self.p) * 0.25, stage, force=True)

    def log(self, line: str) -> None:
        self.emit("log", line=str(line)[:500])

    def epoch(self, row: dict[str, Any]) -> None:
        self.emit("epoch", **row)

    def end(self, state: str, *, result: Any = None, error: str | None = None) -> None:
        self.emit("end", state=state, result=result, error=error)


# ---- the jobs ---------------------------------------------------------------------------------------------


_PASS = re.compile(r"\(pass (\d+)/(\d+)\)")


class _TrainProgress:
    """train_run's events -> the job's overall fraction: features 2..90% (2..47% when fine-tuning follows),
    the head's epochs up to 98%, fine-tuning's epochs 47..97%; epoch rows passed on as they come."""

    def __init__(self, ev: Events, *, fine_tune: int) -> None:
        self.ev = ev
        self.feat_end = 0.47 if fine_tune > 0 else 0.90

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e.get("type")
        if kind == "stage":
            self.ev.stage(str(e.get("stage", "")))
        elif kind == "epoch":
            self.ev.epoch({k: v for k, v in e.items() if k != "type"})
        elif kind == "progress":
            stage, done, total = str(e.get("stage", "")), e.get("done", 0), max(1, int(e.get("total") or 1))
            frac = min(1.0, max(0.0, done / total))
            m = _PASS.search(stage)
            if m:
                k, n = int(m.group(1)), max(1, int(m.group(2)))
                p = 0.02 + (self.feat_end - 0.02) * ((k - 1) + frac) / n
                self.ev.progress(p, f"computing features: {stage}", force=done >= total)
            elif stage == "fine_tune":
                self.ev.progress(0.47 + 0.50 * frac, f"fine-tuning, epoch {e.get('epoch')}/{e.get('n_epoch')}", force=done >= total)
            else:
                self.ev.progress(self.feat_end + (0.98 - self.feat_end if self.feat_end > 0.5 else 0.0) * frac, f"training the head, epoch {e.get('epoch')}/{e.get('n_epoch')}")


def _run_dir(root: Path, name: str) -> Path:
    from ursa.errors import StudioError

    run = root / "runs" / name
    if not (run / "config.json").is_file():
        raise StudioError(f"there is no finished run {name!r} in {root / 'runs'}. Train a model first.")
    return run


def _train(root: Path, jobdir: Path, o: dict[str, Any], ev: Events) -> dict[str, Any]:
    from ursa.config import DataConfig, TrainConfig
    from ursa.train.recipe import train_run

    cleaned = root / "cleaned.csv"
    data = DataConfig(labels=str(cleaned) if cleaned.is_file() else None, valid_pct=o["valid_pct"], seed=o["seed"], aug=o["aug"])
    train = TrainConfig(arch=o["arch"], size=o["size"], views=o["views"], fine_tune=o["fine_tune"])
    if cleaned.is_file():
        ev.log("labels from cleaned.csv (the last applied review)")
    res = train_run(root, root / "runs" / o["name"], data=data, train=train, progress=True, events=_TrainProgress(ev, fine_tune=o["fine_tune"]))
    metrics = json.loads((res.out / "metrics.json").read_text(encoding="utf-8"))
    ev.log(f"run {res.out.name}: error rate {metrics['error_rate']:.4f}, accuracy {metrics['accuracy']:.4f} ({metrics['n_train']} train / {metrics['n_valid']} valid images)")
    return {"run": res.out.name, "metrics": metrics}


def _issues(root: Path, jobdir: Path, o: dict[str, Any], ev: Events) -> dict[str, Any]:
    from ursa.interpret.analysis import ClassificationInterpretation
    from ursa.interpret.issues import KINDS, find_issues

    run = _run_dir(root, o["run"])
    ev.progress(0.02, "searching for label issues, duplicates and outliers", force=True)

    def step(msg: str) -> None:
        ev.log(msg)
        ev.nudge(f"searching: {msg}", cap=0.85)

    rep = find_issues(run, progress=step)
    ev.progress(0.88, "drawing the confusion matrix and the top losses", force=True)
    interp = ClassificationInterpretation.from_run(run)
    interp.plot_confusion_matrix(out=run / "confusion.png")
    interp.plot_top_losses(9, out=run / "top_losses.png")
    counts = {k: len(rep.of_kind(k)) for k in KINDS}
    ev.log(", ".join(f"{k} {n}" for k, n in counts.items() if n) or "no issues found")
    return {"run": run.name, "counts": counts, "summary": rep.summary, "issues_csv": f"runs/{run.name}/issues.csv"}


def _export(root: Path, jobdir: Path, o: dict[str, Any], ev: Events) -> dict[str, Any]:
    from ursa.errors import ExportError
    from ursa.export import export_run, load_model

    run = _run_dir(root, o["run"])
    out = root / "models" / run.name
    if (out / "model.json").is_file():
        try:
            load_model(out)
        except UrsaError as exc:
            raise ExportError(f"{out} holds an export that does not load ({exc}). Move it out of models/, then export again.") from None
        ev.log(f"{out.name} is already exported")
        return {"export": out.name, "path": f"models/{out.name}", "existing": True}
    ev.progress(0.02, "exporting", force=True)

    def step(msg: str) -> None:
        ev.log(msg)
        ev.nudge(msg, cap=0.95)

    res = export_run(run, out, on_step=step)
    return {"export": res.out.name, "path": f"models/{res.out.name}", "existing": False, "classes": res.meta.get("classes"),
            "max_abs_diff": res.max_abs_diff}  # fmt: skip


def _image_files(folder: Path) -> set[str]:
    from ursa.imageio import NON_IMAGE_SUFFIXES

    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NON_IMAGE_SUFFIXES}


def _download(root: Path, jobdir: Path, o: dict[str, Any], ev: Events) -> dict[str, Any]:
    from ursa.collect.download import download, jobs_from_list
    from ursa.collect.urls import read_url_list
    from ursa.config import CollectConfig
    from ursa.review import update_cleaned

    cls = o["class"]
    urls = read_url_list(jobdir / "urls.txt")
    ev.log(urls.summary())
    before = _image_files(root / cls)

    def show(p: Any) -> None:
        ev.progress(p.done / p.total if p.total else 0.0, f"downloading {p.done}/{p.total}: ok {p.ok}, duplicate {p.duplicate}, failed {p.failed}", force=p.done == p.total)

    report = download(jobs_from_list(urls, cls), root, config=CollectConfig(max_images=o.get("max")), on_progress=show)
    new = sorted(_image_files(root / cls) - before)
    if new:  # a cleaned.csv lists the dataset: the new images join it (nothing happens without one)
        update_cleaned(root, add=[(f"{cls}/{n}", cls) for n in new])
    p = report.progress
    for kind, n in report.reasons.most_common():
        ev.log(f"failed: {kind} x{n}")
    for note in report.notes:
        ev.log(f"note: {note}")
    return {"class": cls, "ok": p.ok, "duplicate": p.duplicate, "failed": p.failed, "skipped": p.skipped, "not_tried": p.not_tried,
            "reasons": dict(report.reasons), "manifest": ".ursa/manifest.csv", "added": len(new)}  # fmt: skip


RUNNERS: dict[str, Callable[[Path, Path, dict[str, Any], Events], dict[str, Any]]] = {"train": _train, "issues": _issues, "export": _export, "download": _download}


def main(argv: list[str] | None = None) -> int:
    """Run the job in folder argv[0]; returns the exit code (0 done, 1 failed, 130 cancelled, 2 bad usage)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ursa.tasks JOBDIR  (a job folder the studio made: <root>/.ursa/studio/jobs/<id>/)", file=sys.stderr)
        return 2
    jobdir = Path(args[0]).resolve()
    try:
        job = json.loads((jobdir / "job.json").read_text(encoding="utf-8"))
        kind, options = job["kind"], job["options"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{jobdir} is not a job folder ({exc}).", file=sys.stderr)
        return 2
    ev = Events(jobdir / "events.jsonl")
    signal.signal(signal.SIGTERM, ev.on_sigterm)
    root = jobdir.parents[3]
    try:
        runner = RUNNERS.get(kind)
        if runner is None:
            raise UrsaError(f"unknown job kind {kind!r}; the studio runs {', '.join(RUNNERS)}.")
        ev.progress(0.0, f"{kind} started", force=True)
        result = runner(root, jobdir, options, ev)
    except (Cancelled, KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not tear the last line
        ev.end("cancelled", error="cancelled")
        return 130
    except UrsaError as exc:
        ev.end("failed", error=str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure becomes the job's error; the traceback goes to output.log
        traceback.print_exc()
        text = str(exc).strip().splitlines()
        ev.end("failed", error=f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
        return 1
    ev.progress(1.0, "done", force=True)
    ev.end("done", result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
