"""The studio's web app: one JSON API over a project folder, and the page that uses it (`ursa studio`).

`create_studio_app(root)` serves the project `root` (see `ursa.web.studio.project.Project`): class
folders, their images, runs, exports and the persistent job table (`ursa.web.studio.jobs.Jobs`, which
runs training, issue finding, export and downloads as child processes, so this module never imports the
training code). The routes, all JSON unless said otherwise:

- `GET /` the page, `/static/...` its script and style; `GET /docs` this API in OpenAPI;
- `GET /api/project` the classes (counts, thumbnails, warnings), runs, the last jobs and the predictor;
- `POST /api/classes` `{"name"}` (201); `DELETE /api/classes/{name}` (to quarantine, undoable);
  `POST /api/classes/{name}/rename` `{"to"}`; `POST /api/classes/{name}/restore` `{}`;
- `POST /api/classes/{name}/images` multipart `files` (one or many) and `source` -> one row per file;
- `POST /api/classes/{name}/urls` a text body of URLs (or CSV), `?max=` -> a download job (202);
- `POST /api/train` the training options -> a job (202); `POST /api/export` `{"run"?}` -> a job (202);
- `GET /api/jobs`, `GET /api/jobs/{id}`, `POST /api/jobs/{id}/cancel`, `GET /api/jobs/{id}/events` (SSE);
- `GET /api/runs`, `GET /api/runs/latest`, `GET /api/runs/{name}`, `GET /api/runs/{name}/files/{file}`;
- `GET /api/review`, `POST /api/review/decide|undo|apply|undo-apply` (the review page's logic,
  `ursa.web.review_app.ReviewSession`, on the newest run with findings);
- `GET /api/img?name=`, `GET /api/thumb?name=` images of the project (or its quarantine);
- `POST /api/predict` an image -> `PredictionOut` from the newest export (`ursa serve`'s /predict);
- `GET /api/exports/{name}.zip` an export folder as a zip.

Refusals are JSON `{"detail": ...}`: 400 for a bad request (`StudioError`, bad options), 404 for what
does not exist (`NotFound`), 409 for what the project's state forbids now (`Conflict`: a class that
exists, too few images to train, no model yet), 413 for uploads over the limits, 415 / 422 for what is
not an image or is damaged. Every route is behind `ursa.web.security.WebGuard` (Host, Origin, JSON
content type except on the three upload routes, and the token off loopback).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ursa.collect.local import Added
from ursa.config import AUG_PRESETS
from ursa.errors import BadImageError, ImageTooLargeError, InterpretError, NotAnImageError, StudioError, UrsaError
from ursa.export import Predictor
from ursa.interpret.analysis import ClassificationInterpretation
from ursa.web.predict_app import MAX_UPLOAD_BYTES, BodyTooLarge, add_predict_route, default_workers, limited_request
from ursa.web.review_app import ReviewRequestError, ReviewSession
from ursa.web.security import protect
from ursa.web.studio.jobs import FOLLOW_UPS, STUDIO_ARCHS, TRAIN_DEFAULTS, Jobs, check_options
from ursa.web.studio.project import Conflict, Forbidden, NotFound, Project

__all__ = ["MAX_FILES", "MAX_FILE_BYTES", "MAX_REQUEST_BYTES", "TRAIN_OPTIONS", "create_studio_app"]

WEB = Path(__file__).resolve().parent.parent  # src/ursa/web: templates/ and static/
MAX_FILES = 64  # image files in one upload request
MAX_REQUEST_BYTES = 100 * 2**20  # one upload request, all files together
MAX_FILE_BYTES = 20 * 2**20  # one image file: larger ones become a refused row
MAX_URL_TEXT_BYTES = 2**20  # the body of a URL list
_PART_SLACK = 4096  # bytes of multipart boundary and part headers allowed per file, beyond the request limit
_SOURCES = ("upload", "webcam", "paste")
_FINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
_RUN_FILE_TYPES = {".png": "image/png", ".csv": "text/csv; charset=utf-8", ".json": "application/json"}
_CSP = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; style-src 'self'; script-src 'self'; connect-src 'self'"
_SSE_POLL_S = 0.25
_SSE_PING_S = 15.0


# ---- request bodies (OpenAPI documents them; unknown keys are refused with 400) -------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: 1.5 or "64" is not an int, true not a number


class ClassIn(_Body):
    name: str = Field(description="The new class: 1-64 characters, no '/', '\\\\', control characters or leading '.', not runs/models/train/valid.")


class RenameIn(_Body):
    to: str = Field(description="The class's new name (the same rules as a new class).")


class EmptyIn(_Body):
    pass


class TrainIn(_Body):
    """Training options, all optional: a missing or null one takes the studio's default (`TRAIN_DEFAULTS` of
    `ursa.web.studio.jobs`, which checks them), which trains efficientnet_lite0 on the feature cache in seconds."""

    arch: str | None = Field(None, description=f"Backbone: one of {', '.join(STUDIO_ARCHS)} (default {TRAIN_DEFAULTS['arch']}).")
    size: int | None = Field(None, description="Input side in pixels, 32..2048 (default: the backbone's own, 224).")
    aug: str | None = Field(None, description=f"Augmentation preset: one of {', '.join(AUG_PRESETS)} (default {TRAIN_DEFAULTS['aug']}).")
    views: int | None = Field(None, description=f"Most augmented views per training image in the feature cache (default {TRAIN_DEFAULTS['views']}).")
    fine_tune: int | None = Field(None, description="Epochs of full fine-tuning after the cached stage (default 0; slow on a CPU).")
    seed: int | None = Field(None, description=f"Seed for the split, augmentation and training (default {TRAIN_DEFAULTS['seed']}).")
    valid_pct: float | None = Field(None, description=f"Share of each class held out for validation, in (0, 1) (default {TRAIN_DEFAULTS['valid_pct']}).")
    name: str | None = Field(None, description="Run folder name: runs/NAME, or NAME-2, ... when taken (default 'run').")
    then: list[str] | None = Field(None, description=f"Jobs to queue after a successful training, in order, from {', '.join(FOLLOW_UPS)} (default: both, in that order).")


TRAIN_OPTIONS = tuple(TrainIn.model_fields)


class DecideIn(_Body):
    id: str = Field(description="The image's id (12 hex digits, from GET /api/review).")
    action: str = Field(description="keep, relabel or delete.")
    label: str | None = Field(None, description="The new label (relabel only).")
    version: int | None = Field(None, description="The image's version as last seen; a stale one gets 409.")


class ExportIn(_Body):
    run: str | None = Field(None, description="The run to export; null: the newest run.")


# ---- helpers ------------------------------------------------------------------------------------------


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence a person can act on."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown option {where!r}")
        elif err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{where or 'the body'}: {err.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts) + ". See /docs for what each route takes."


def _zip_folder(folder: Path, name: str) -> Path:
    """`folder`'s regular files (no links) in a new temporary zip, under the top folder `name`/; the caller deletes it."""
    fd, tmp = tempfile.mkstemp(prefix="ursa-export-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    zf.write(path, f"{name}/{path.relative_to(folder).as_posix()}")
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


class _LatestPredictor:
    """The Predictor of the newest export under `models/` (by model.json's time), loaded on first use and
    again when a newer export appears; Conflict "train a model first" when there is none."""

    def __init__(self, models: Path, *, threads: int):
        self.models = models
        self.threads = threads
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._predictor: Predictor | None = None

    def newest(self) -> Path | None:
        """The newest export folder (models/NAME holding model.json), or None."""
        best: tuple[int, Path] | None = None
        try:
            entries = list(os.scandir(self.models))
        except OSError:
            return None
        for e in entries:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            try:
                mtime = os.stat(os.path.join(e.path, "model.json")).st_mtime_ns
            except OSError:
                continue
            if best is None or mtime > best[0]:
                best = (mtime, Path(e.path))
        return None if best is None else best[1]

    def info(self) -> dict[str, Any]:
        """{"run": the export /api/predict uses (its run's name) or None, "ready": whether it is loaded}."""
        folder = self.newest()
        loaded = self._predictor is not None and self._key is not None and folder is not None and self._key[0] == str(folder)
        return {"run": folder.name if folder else None, "ready": loaded}

    def __call__(self) -> Predictor:
        folder = self.newest()
        if folder is None:
            raise Conflict("there is no model yet: train a model first (the export job after training makes the one this uses).")
        key = (str(folder), (folder / "model.json").stat().st_mtime_ns)
        with self._lock:  # one load at a time; the requests behind it use the loaded model
            if self._key != key or self._predictor is None:
                try:
                    self._predictor = Predictor(folder, threads=self.threads, spin=False)
                except UrsaError as exc:
                    raise Conflict(f"the newest export {folder.name} cannot be loaded ({exc}). Export the run again.") from None
                self._key = key
            return self._predictor


# ---- the app ------------------------------------------------------------------------------------------


def create_studio_app(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    token: str | None = None,
    python: str = sys.executable,
    max_files: int = MAX_FILES,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_predict_bytes: int = MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The studio for the project folder `root` (created if missing), to be served on `host`.

    `token` is required off loopback (see `ursa.web.security`); `python` is the interpreter the jobs run
    under. Upload limits: `max_files` files and `max_request_bytes` bytes per request to
    /api/classes/{name}/images (413 beyond), `max_file_bytes` per image (a refused row beyond),
    `max_predict_bytes` per /api/predict request. The job worker starts and stops with the app (its
    lifespan). Raises StudioError for a train/valid dataset and ServeError for a missing token.
    """
    project = Project(root)
    jobs = Jobs(project.root, python=python)
    concurrency, threads = default_workers()
    predictor = _LatestPredictor(project.root / "models", threads=threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        try:
            yield
        finally:
            await run_in_threadpool(jobs.stop)

    app = FastAPI(
        title="Ursa studio",
        description=f"Make an image classifier from the project folder {project.root.name}: classes, images, training, results, review, prediction, export.",
        lifespan=lifespan,
    )
    app.state.project, app.state.jobs = project, jobs
    protect(app, host=host, token=token, raw_body_paths={"/api/predict", "/api/classes/{name}/images", "/api/classes/{name}/urls"}, error_key="detail")
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    templates = Jinja2Templates(directory=str(WEB / "templates"))

    # -- errors: one JSON shape, the status the kind of refusal deserves --------------------------------
    def _json_error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers={"cache-control": "no-store"})

    statuses: list[tuple[type[Exception], int]] = [
        (NotFound, 404), (Forbidden, 403), (Conflict, 409), (ImageTooLargeError, 413), (NotAnImageError, 415), (BadImageError, 422), (UrsaError, 400),
    ]  # fmt: skip  # most specific first: NotFound, Forbidden and Conflict are StudioErrors, the image errors UrsaErrors

    @app.exception_handler(UrsaError)
    async def _ursa_error(request: Request, exc: UrsaError) -> JSONResponse:
        if isinstance(exc, ReviewRequestError):
            return _json_error(exc.status, str(exc))
        return _json_error(next(s for t, s in statuses if isinstance(exc, t)), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(400, _validation_detail(exc))

    # -- the page ------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> Response:
        resp = templates.TemplateResponse(request, "studio.html", {"root": str(project.root), "name": project.root.name})
        resp.headers["Content-Security-Policy"] = _CSP
        resp.headers["Cache-Control"] = "no-store"
        return resp

    # -- project and classes ------------------------------------------------------------------------------
    def export_info(run: str) -> dict[str, Any] | None:
        folder = project.export_dir(run)
        if not (folder / "model.json").is_file():
            return None
        return {"name": run, "zip": f"/api/exports/{quote(run)}.zip", "files": sorted(p.name for p in folder.iterdir() if p.is_file())}

    def with_links(job: dict[str, Any]) -> dict[str, Any]:
        """A job snapshot with the download link of an export job's zip (the page links to it)."""
        result = job.get("result")
        if job.get("kind") == "export" and isinstance(result, dict) and result.get("export") and "zip" not in result:
            job = {**job, "result": {**result, "zip": f"/api/exports/{quote(str(result['export']))}.zip"}}
        return job

    @app.get("/api/project")
    def get_project() -> dict[str, Any]:
        """The project: root, classes (name, count, warnings, thumbnails), removed classes, runs, latest run, the last 10 jobs, the predictor."""
        return {**project.summary(), "jobs": [with_links(j) for j in jobs.list(10)], "predictor": predictor.info()}

    def class_count(name: str) -> int:
        return next((int(c["count"]) for c in project.classes() if c["name"] == name), 0)

    def existing_class(name: str) -> str:
        name = project.check_class_name(name)
        if not (project.root / name).is_dir():
            raise NotFound(f"there is no class {name!r} in {project.root.name}: add it first (POST /api/classes).")
        return name

    @app.post("/api/classes", status_code=201)
    def add_class(body: ClassIn) -> dict[str, Any]:
        """Add an empty class folder. 409 when it exists."""
        return project.add_class(body.name)

    @app.delete("/api/classes/{name}")
    def remove_class(name: str) -> dict[str, Any]:
        """Move the class folder to the quarantine (journaled); `undo` is the URL that restores it."""
        out = project.remove_class(name)
        return {**out, "removed": name, "undo": f"/api/classes/{quote(name, safe='')}/restore"}

    @app.post("/api/classes/{name}/rename")
    def rename_class(name: str, body: RenameIn) -> dict[str, Any]:
        """Rename a class folder (and its rows in cleaned.csv)."""
        return project.rename_class(name, body.to)

    @app.post("/api/classes/{name}/restore")
    def restore_class(name: str, body: EmptyIn | None = None) -> dict[str, Any]:
        """Undo the latest removal of the class. 409 when a folder of that name exists again."""
        return project.restore_class(name)

    upload_too_big = f"the upload is over the limit of {max_request_bytes / 2**20:g} MiB in one request. Send the images in smaller batches."

    @app.post("/api/classes/{name}/images", responses={413: {"description": "Too many files or bytes in one request"}})
    async def add_images(request: Request, name: str) -> Any:
        """Add images to a class: multipart/form-data with one or many `files` fields and an optional
        `source` (upload, webcam or paste). Each file gets a row: ok, duplicate (the same picture is there)
        or refused (not an image, damaged, over the per-file limit), with the name Ursa stored it under."""
        name = existing_class(name)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise StudioError("send the images as multipart/form-data, one or many fields named 'files' (and optionally 'source').")
        limit = max_request_bytes + _PART_SLACK * max_files
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return JSONResponse({"detail": upload_too_big}, status_code=413, headers={"connection": "close"})  # before reading the body
        try:  # Starlette streams file parts into spooled temporary files (memory up to 1 MiB each, disk beyond)
            form = await limited_request(request, limit).form(max_files=max_files, max_fields=8, max_part_size=64 * 2**10)
        except BodyTooLarge:
            return JSONResponse({"detail": upload_too_big}, status_code=413, headers={"connection": "close"})
        except HTTPException as exc:  # Starlette's parser: too many files or fields, a malformed body
            if "too many files" in str(exc.detail).lower():
                return JSONResponse({"detail": f"more than {max_files} files in one request. Send the images in batches of {max_files} or fewer."}, status_code=413)
            raise StudioError(f"the multipart body could not be read ({exc.detail}). Send the images as fields named 'files'.") from None
        try:
            source = form.get("source") or "upload"
            if not isinstance(source, str) or source not in _SOURCES:
                raise StudioError(f"source must be one of {', '.join(_SOURCES)}, got {str(source)[:40]!r}.")
            uploads = [f for f in form.getlist("files") if not isinstance(f, str)]
            if not uploads:
                raise StudioError("no files in the request. Send the images as multipart fields named 'files'.")

            def store() -> list[Added]:
                # One file in memory at a time (add_images takes an iterator); an oversized one is never read,
                # its row says why. Rows come back in the order the files were sent.
                sizes = [up.file.seek(0, os.SEEK_END) for up in uploads]
                small = [up for up, n in zip(uploads, sizes) if n <= max_file_bytes]

                def bodies() -> Iterator[tuple[str, bytes]]:
                    for up in small:
                        up.file.seek(0)
                        yield (up.filename or "unnamed")[:200], up.file.read()

                stored = iter(project.add_images(name, bodies(), source=source) if small else [])
                too_big = f"over the limit of {max_file_bytes / 2**20:g} MiB per image; send a smaller picture"
                return [next(stored) if n <= max_file_bytes else Added((up.filename or "unnamed")[:200], "refused", too_big) for up, n in zip(uploads, sizes)]

            results = await run_in_threadpool(store)
            count = await run_in_threadpool(class_count, name)
        finally:
            await form.close()
        return {"results": [asdict(r) for r in results], "count": count}

    @app.post("/api/classes/{name}/urls", status_code=202, openapi_extra={"requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def add_urls(
        request: Request, name: str, max_images: int | None = Query(None, alias="max", ge=1, le=100_000, description="Most good images to keep in the class (counting those there).")
    ) -> Any:
        """Download images into a class from a list of URLs (one per line, or CSV with a url column), as a job."""
        from ursa.collect.urls import parse_url_text

        name = existing_class(name)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_URL_TEXT_BYTES:
                return JSONResponse({"detail": f"the URL list is over {MAX_URL_TEXT_BYTES // 2**20} MiB. Split it into smaller lists."}, status_code=413)
            chunks.append(chunk)
        try:
            text = b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise StudioError("the URL list must be UTF-8 text, one URL per line (or CSV with a url column).") from None
        parsed = parse_url_text(text, source="the request")
        if not parsed.urls:
            bad = f" (not URLs: {', '.join(repr(u) for u in parsed.not_urls[:3])})" if parsed.not_urls else ""
            raise StudioError(f"no http(s) URLs in the request body{bad}. Send one image URL per line.")
        job = await run_in_threadpool(lambda: jobs.submit("download", {"class": name, "max": max_images}, files={"urls.txt": text.encode("utf-8")}))
        return {"job": job["id"], "urls": len(parsed.urls)}

    # -- jobs ------------------------------------------------------------------------------------------------
    @app.post("/api/train", status_code=202)
    def train(body: TrainIn) -> dict[str, Any]:
        """Queue a training run on the class folders (cleaned.csv when there is one), then its `then` jobs."""
        options = check_options("train", body.model_dump(exclude_none=True))  # StudioError (400) names a bad one
        ready = [c for c in project.classes() if int(c["count"]) >= 2]
        if len(ready) < 2:
            have = ", ".join(f"{c['name']} ({c['count']})" for c in project.classes()) or "none"
            raise Conflict(f"training needs at least 2 classes with 2 or more images each (10 or more recommended); the project has: {have}. Add images first.")
        return {"job": jobs.submit("train", options)["id"]}

    @app.post("/api/export", status_code=202)
    def export(body: ExportIn) -> dict[str, Any]:
        """Queue the export of a run (the newest when `run` is null) to models/RUN; its result links the zip."""
        run = project.run_dir(body.run)
        return {"job": jobs.submit("export", {"run": run.name})["id"]}

    @app.get("/api/jobs")
    def list_jobs(limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        """The newest `limit` jobs, newest first (snapshots as GET /api/jobs/{id})."""
        return [with_links(j) for j in jobs.list(limit)]

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        """One job: id, kind, state, progress 0..1, stage, last log lines, epoch rows, result or error, times."""
        return with_links(jobs.get(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, body: EmptyIn | None = None) -> dict[str, Any]:
        """Cancel a queued or running job. 409 when it has finished."""
        return with_links(jobs.cancel(job_id))

    @app.get("/api/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events: `data: <job JSON>` on every change, until the job ends"}})
    async def job_events(request: Request, job_id: str) -> StreamingResponse:
        """The job's snapshot as Server-Sent Events whenever it changes (checked every 0.25 s); the stream ends after the final state."""
        first = await run_in_threadpool(jobs.get, job_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[str]:
            snap, last, quiet = first, None, 0.0
            while True:
                text = json.dumps(with_links(snap), separators=(",", ":"))
                if text != last:
                    yield f"data: {text}\n\n"
                    last, quiet = text, 0.0
                elif quiet >= _SSE_PING_S:  # a comment line keeps proxies and the browser from giving up on a long stage
                    yield ": ping\n\n"
                    quiet = 0.0
                if snap.get("state") in _FINAL or await request.is_disconnected():
                    return
                await asyncio.sleep(_SSE_POLL_S)
                quiet += _SSE_POLL_S
                snap = await run_in_threadpool(jobs.get, job_id)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- runs ------------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        """The runs: name, error_rate, accuracy, created, exported."""
        return list(project.summary()["runs"])

    def run_details(run: Path) -> dict[str, Any]:
        metrics_path = run / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
        out: dict[str, Any] = {"name": run.name, "metrics": metrics, "per_class": [], "confusion": None, "most_confused": [], "top_losses": []}
        try:
            interp = ClassificationInterpretation.from_run(run)
        except InterpretError:
            interp = None  # a run without predictions.csv (interrupted, or written by an older Ursa): metrics only
        if interp is not None:
            out["per_class"] = [asdict(m) for m in interp.per_class()]
            out["confusion"] = {"classes": interp.classes, "matrix": interp.confusion_matrix().tolist()}
            out["most_confused"] = [[a, b, n] for a, b, n in interp.most_confused()]
            losses, idx = interp.top_losses(12)
            names = interp.names or []
            out["top_losses"] = [
                {
                    "name": names[i] if names else None,
                    "label": interp.classes[int(interp.targets[i])],
                    "predicted": interp.classes[int(interp.preds[i])],
                    "prob": float(interp.probs[i, interp.preds[i]]),
                    "p_actual": float(interp.probs[i, interp.targets[i]]),
                    "loss": float(loss),
                    "img": f"/api/thumb?name={quote(names[i])}&side=256" if names else None,  # a grid of tiles: thumbnails, not the photos
                }
                for loss, i in zip(losses.tolist(), idx.tolist())
            ]
        base = f"/api/runs/{quote(run.name)}/files/"
        out["plots"] = {p.stem: base + quote(p.name) for p in sorted(run.iterdir()) if p.suffix.lower() == ".png" and p.is_file() and not p.is_symlink()}
        out["issues_ready"] = (run / "issues.csv").is_file()
        out["export"] = export_info(run.name)
        return out

    @app.get("/api/runs/latest")
    def latest_run() -> dict[str, Any]:
        """The newest run: metrics.json, per-class precision/recall, confusion matrix, most confused pairs, top losses, plot links, export."""
        return run_details(project.run_dir(None))

    @app.get("/api/runs/{name}")
    def get_run(name: str) -> dict[str, Any]:
        """One run, as /api/runs/latest."""
        return run_details(project.run_dir(name))

    @app.get("/api/runs/{name}/files/{file}")
    def run_file(name: str, file: str) -> FileResponse:
        """A PNG, CSV or JSON file directly inside the run folder (plots, history.csv, metrics.json, ...)."""
        run = project.run_dir(name)
        suffix = Path(file).suffix.lower()
        if suffix not in _RUN_FILE_TYPES or "/" in file or "\\" in file or file.startswith("."):
            raise StudioError(f"{file[:80]!r}: only the .png, .csv and .json files of a run are served, by their plain names.")
        listed = {p.name: p for p in run.iterdir() if p.is_file() and not p.is_symlink()}
        if file not in listed:
            raise NotFound(f"run {run.name} has no file {file[:80]!r}.")
        return FileResponse(listed[file], media_type=_RUN_FILE_TYPES[suffix], headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    # -- review ----------------------------------------------------------------------------------------------
    review_cache: dict[str, Any] = {"key": None, "session": None}
    review_lock = threading.Lock()

    def review_session() -> ReviewSession:
        """The review session of the newest run with an issues.csv (re-read when that file changes)."""
        for r in reversed(project.summary()["runs"]):  # oldest first there
            run = project.run_dir(r["name"])
            issues = run / "issues.csv"
            if issues.is_file():
                key = (str(run), issues.stat().st_mtime_ns)
                with review_lock:
                    if review_cache["key"] != key:
                        review_cache["session"], review_cache["key"] = ReviewSession(project.root, run), key
                    return review_cache["session"]
        raise NotFound("no findings to review yet: train a model (the issues job runs after training), then reload.")

    @app.get("/api/review")
    def review_state() -> dict[str, Any]:
        """The flagged images of the newest run with findings, grouped by kind, each with its decision and version."""
        return review_session().snapshot()

    @app.post("/api/review/decide")
    def review_decide(body: DecideIn) -> dict[str, Any]:
        """Keep, relabel or delete a flagged image (saved to the journal at once). 409 on a stale version."""
        return review_session().decide(body.id, body.action, label=body.label, version=body.version)

    @app.post("/api/review/undo")
    def review_undo(body: EmptyIn | None = None) -> dict[str, Any]:
        """Take back the latest decision."""
        return review_session().undo()

    @app.post("/api/review/apply")
    def review_apply(body: EmptyIn | None = None) -> dict[str, Any]:
        """Apply the decisions: write cleaned.csv, quarantine the deleted images."""
        return review_session().apply()

    @app.post("/api/review/undo-apply")
    def review_undo_apply(body: EmptyIn | None = None) -> dict[str, Any]:
        """Undo the last apply: the dataset as it was, byte for byte."""
        return review_session().undo_apply()

    # -- images ----------------------------------------------------------------------------------------------
    @app.get("/api/img")
    def image(name: str = Query(..., max_length=1024, description="The image's path relative to the project folder.")) -> FileResponse:
        """An image of the project (or its quarantine) by its relative name."""
        return FileResponse(project.image_path(name), headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    @app.get("/api/thumb")
    def thumb(name: str = Query(..., max_length=1024, description="The image's path relative to the project folder."), side: int = Query(160, ge=16, le=512)) -> Response:
        """A JPEG thumbnail (longest side `side` pixels) of an image of the project."""
        return Response(project.thumbnail(name, side), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    # -- prediction and export -------------------------------------------------------------------------------
    add_predict_route(
        app, "/api/predict", predictor, max_upload_bytes=max_predict_bytes, concurrency=concurrency, max_queue=16,
        responses={409: {"description": "No model yet: train (and export) first"}},
    )  # fmt: skip

    @app.get("/api/exports/{name}.zip", response_class=FileResponse, responses={200: {"content": {"application/zip": {}}}})
    def export_zip(name: str) -> FileResponse:
        """The export folder models/NAME as a zip (made on request, streamed from a temporary file)."""
        folder = project.export_dir(name)  # StudioError for a name that is not one folder
        if not (folder / "model.json").is_file():
            raise NotFound(f"there is no export {name!r}: export the run first (POST /api/export).")
        tmp = _zip_folder(folder, name)
        return FileResponse(tmp, media_type="application/zip", filename=f"{name}.zip", background=BackgroundTask(os.unlink, tmp), headers={"Cache-Control": "no-store"})

    return app
