"""The prediction page and JSON API for an export folder (`ursa serve models/bears`).

`create_predict_app(folder)` serves:

- `GET /` a page (plain HTML + JS): upload, drag-and-drop or paste a photo, see the top classes as bars;
- `POST /predict` the image as multipart field `file`, or as the raw request body -> JSON
  `{label, index, prob, best, rejected, reason, unfamiliarity, top: [{label, prob}], ms, threshold}`
  (`reason`: "unfamiliar" or "unsure between A and B" when rejected, else null); `?top_k=` (1..100);
  `?heatmap=true` adds `heatmap`, the Grad-CAM of the answer over the model's input crop (a PNG data URL);
- `GET /health` liveness and the loaded model; `GET /model` model.json (less local paths);
- `GET /docs`, `GET /openapi.json` the OpenAPI description.

Safety and load: bodies over `max_upload_bytes` get 413 (from Content-Length before a byte of the body
is read, and while reading), images over `max_pixels` get 413 before they are decoded (decompression
bombs), anything that is not an image gets 415 and a damaged image 422, each with a JSON
`{"detail": ...}` that says what to send. Decoding and inference run in the thread pool, at most
`concurrency` at a time. A request is admitted before its body is read: when `concurrency` requests run
and `max_queue` more are admitted, a new one gets 503 at once, its body never read. Admitted bodies are
streamed into temporary files that stay in memory up to 1 MiB and go to disk beyond, and are read back
whole only inside the inference slot, so memory holds at most `concurrency` full uploads.
Every route is behind `ursa.web.security.WebGuard` (Host, Origin, token). `add_predict_route` puts the
same prediction route on another app (the studio's `/api/predict`, whose model changes as it trains).

This module imports only `ursa.export` and `ursa.errors` from Ursa: serving never needs the training code.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import IO, Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from ursa.errors import BadImageError, ImageTooLargeError, NotAnImageError, ServeError
from ursa.export import MAX_PIXELS, Predictor
from ursa.web.security import protect

__all__ = ["MAX_UPLOAD_BYTES", "BodyTooLarge", "PredictionOut", "add_predict_route", "create_predict_app", "default_workers", "limited_request", "serve"]

HERE = Path(__file__).resolve().parent
MAX_UPLOAD_BYTES = 10 * 2**20  # default request body limit: 10 MiB
_MULTIPART_SLACK = 64 * 2**10  # room for multipart boundaries and headers around the file
_SPOOL_BYTES = 2**20  # an upload stays in memory up to this size while it waits, and goes to a temporary file beyond
_MAX_FIELD_BYTES = 64 * 2**10  # a form field other than the file (the page sends none)


class TopClass(BaseModel):
    label: str
    prob: float


class PredictionOut(BaseModel):
    """The answer of `POST /predict`."""

    label: str  # the class, or "none of these" under the open-set threshold
    index: int  # class index; -1 for "none of these"
    prob: float  # top probability, 0..1
    best: str  # the most probable class, also when rejected
    rejected: bool
    reason: str | None = None  # why "none of these": "unfamiliar" (open-set detector) or "unsure between A and B" (softmax); None when accepted
    unfamiliarity: float | None = None  # the open-set detector's score (higher: less like the training photos); None without a detector
    top: list[TopClass]
    ms: dict[str, float]  # decode / preprocess / model / total milliseconds on the server
    threshold: float
    heatmap: str | None = None  # with ?heatmap=true: the model's input crop with Grad-CAM drawn on, as a data:image/png URL


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The image: multipart/form-data with the field `file`, or the raw bytes of the image file as the body.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    400: {"description": "No image in the request"},
    413: {"description": "Upload or image dimensions over the limit"},
    415: {"description": "Not an image"},
    422: {"description": "Damaged image or bad parameter"},
    503: {"description": "Too many requests waiting; retry"},
}


class BodyTooLarge(Exception):
    """Raised while reading a request made by `limited_request` once its body passes the limit."""


def limited_request(request: Request, limit: int) -> Request:
    """`request` whose body reads raise BodyTooLarge as soon as more than `limit` bytes have arrived, so an
    upload that lied about (or left out) its Content-Length is cut off while streaming, not after."""
    received = 0

    async def receive() -> Any:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
        return message

    return Request(request.scope, receive)


class _Fail(Exception):
    """A refusal. `close`: end the connection after the answer instead of receiving a body nobody reads."""

    def __init__(self, status: int, detail: str, *, close: bool = False):
        super().__init__(detail)
        self.status, self.detail, self.close = status, detail, close


def default_workers(cpus: int | None = None) -> tuple[int, int]:
    """(concurrent inferences, ONNX Runtime threads each) for a machine with `cpus` cores.

    Several single-threaded inferences side by side use the cores better than one multi-threaded
    inference at a time under load (no thread hand-offs), and leave the event loop a share.
    """
    cpus = cpus or os.cpu_count() or 1
    concurrency = max(1, min(4, cpus))
    return concurrency, max(1, cpus // concurrency)


def add_predict_route(
    app: FastAPI,
    path: str,
    get_predictor: Callable[[], Predictor],
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    concurrency: int = 1,
    max_queue: int = 64,
    responses: dict[int | str, dict[str, Any]] | None = None,
) -> None:
    """Add `POST path` to `app`: one image (multipart field `file`, or the raw body) -> `PredictionOut` JSON.

    The upload handling of the module docstring: 413 over `max_upload_bytes` (from Content-Length before
    the body is read, and while reading), admission before the body is read (`concurrency` predictions
    at once, `max_queue` more admitted, 503 beyond), bodies spooled to temporary files and read back whole
    only inside an inference slot; 415 / 422 / 413 for a non-image, a damaged image, too many pixels.

    `get_predictor()` is called in a worker thread inside the inference slot, once per request, and may
    load a model (the studio loads its latest export lazily) or raise an `UrsaError` other than the image
    errors, which goes to `app`'s exception handlers (the studio answers 409 "train a model first").
    `responses` documents such extra answers in OpenAPI. `app`'s guard must list `path` among its raw
    body paths (`ursa.web.security.protect`).
    """
    if max_upload_bytes < 1 or max_queue < 0 or concurrency < 1:
        raise ServeError("the upload limit and concurrency must be positive and the queue length at least 0.")
    gate = asyncio.Semaphore(concurrency)
    admitted = 0  # requests reading their body, waiting for a slot or running
    too_big = f"the upload is over the limit of {max_upload_bytes / 2**20:g} MiB. Send a smaller image (resize it to a few megapixels)."

    async def spool_upload(request: Request, multipart: bool) -> tuple[IO[bytes], list[Callable[[], Any]]]:
        """The image (multipart field `file`, or the whole body) in a temporary file, read with a bounded
        streaming read; and what to call to release it."""
        limited = limited_request(request, max_upload_bytes + (_MULTIPART_SLACK if multipart else 0))
        try:
            if not multipart:
                spool: IO[bytes] = SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - closed by the caller
                try:
                    async for chunk in limited.stream():
                        spool.write(chunk)
                except BaseException:
                    spool.close()
                    raise
                return spool, [spool.close]
            # Starlette's parser streams file parts into its own 1 MiB spooled files; other fields are small.
            form = await limited.form(max_files=1, max_fields=16, max_part_size=_MAX_FIELD_BYTES)
        except BodyTooLarge:
            raise _Fail(413, too_big, close=True) from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            await form.close()
            raise _Fail(400, "no file in the form. Send the image as the multipart field named 'file'.")
        return upload.file, [form.close]  # closes the upload's file too

    def predict_spooled(src: IO[bytes], top_k: int, heatmap: bool) -> dict[str, Any]:
        """Read the upload back and predict, with the Grad-CAM picture when `heatmap` (in a worker thread,
        inside an inference slot)."""
        size = src.seek(0, os.SEEK_END)
        if size > max_upload_bytes:
            raise _Fail(413, too_big)
        if size == 0:
            raise _Fail(400, "the request has no image. Send it as the multipart field 'file', or as the raw request body.")
        predictor = get_predictor()
        src.seek(0)
        if not heatmap:
            return {**predictor.predict_image(src.read(), top_k=top_k).to_dict(), "threshold": predictor.threshold}
        if not predictor.can_explain:
            raise _Fail(422, "this model gives no heat maps: it was exported by an earlier Ursa. Export it again (ursa export runs/NAME --out NEW_FOLDER), or leave out heatmap.")
        import base64
        import io

        pred, _, picture = predictor.explain(src.read(), top_k=top_k)
        buf = io.BytesIO()
        picture.save(buf, "PNG")
        return {**pred.to_dict(), "threshold": predictor.threshold, "heatmap": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}

    async def predict(
        request: Request,
        top_k: int = Query(5, ge=1, le=100, description="How many classes to list in `top`."),
        heatmap: bool = Query(False, description="Also return `heatmap`: where the model looked (Grad-CAM), as a PNG data URL."),
    ) -> Any:
        """Classify one image: its label (or "none of these"), probability and the top classes."""
        nonlocal admitted
        try:
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + (_MULTIPART_SLACK if multipart else 0):
                raise _Fail(413, too_big, close=True)  # before a byte of the body is read
            if admitted >= concurrency + max_queue:  # admission before the body is read
                raise _Fail(503, "the server is busy. Retry in a moment.", close=declared is None)
            admitted += 1
            try:
                src, release = await spool_upload(request, multipart)
                try:
                    async with gate:
                        return await run_in_threadpool(predict_spooled, src, top_k, heatmap)
                finally:
                    for close in release:
                        result = close()
                        if asyncio.iscoroutine(result):
                            await result
            finally:
                admitted -= 1
        except _Fail as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers={"connection": "close"} if exc.close else None)
        except ImageTooLargeError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=413)
        except NotAnImageError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=415)
        except BadImageError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)

    app.add_api_route(path, predict, methods=["POST"], response_model=PredictionOut, openapi_extra=_BODY_DOC, responses={**_ERRORS_DOC, **(responses or {})})


def create_predict_app(
    model: str | os.PathLike[str] | Predictor,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    concurrency: int | None = None,
    threads: int | None = None,
    max_queue: int = 64,
    backend: str = "auto",
    precision: str | None = None,
    host: str = "127.0.0.1",
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app serving one export folder (or an already loaded Predictor).

    `concurrency` inferences run at once (default: `default_workers()`), each with `threads` ONNX
    Runtime threads; `max_queue` more may wait. `host` is the address the server binds (its Host
    header is checked on loopback) and `token` the one clients must present (required off loopback).
    Raises ExportError when the folder cannot be loaded, ServeError on bad limits or a missing token.
    """
    if max_upload_bytes < 1 or max_pixels < 1 or max_queue < 0:
        raise ServeError("the upload limit and pixel limit must be positive and the queue length at least 0.")
    conc, thr = default_workers()
    concurrency = concurrency or conc
    if concurrency < 1:
        raise ServeError(f"concurrency must be at least 1, got {concurrency}.")
    if isinstance(model, Predictor):
        predictor = model
    else:
        predictor = Predictor(model, backend=backend, precision=precision, threads=threads or thr, spin=False, max_pixels=max_pixels)
    predictor.max_pixels = max_pixels
    meta = {k: v for k, v in predictor.meta.items() if k != "source"}  # local paths are not the client's business
    name = str(meta.get("name") or predictor.folder.name)
    app = FastAPI(
        title=f"Ursa classifier: {name}",
        version=str(meta.get("versions", {}).get("ursa", "")),
        description=f"Classifies a photo as one of {len(predictor.classes)} classes ({', '.join(predictor.classes[:20])}{', ...' if len(predictor.classes) > 20 else ''}), or \"none of these\".",
    )
    protect(app, host=host, token=token, raw_body_paths={"/predict"}, error_key="detail")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    limit_mb = max_upload_bytes / 2**20

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        ctx = {"name": name, "classes": predictor.classes, "limit_mb": f"{limit_mb:g}", "threshold": predictor.threshold, "can_explain": predictor.can_explain}
        resp = templates.TemplateResponse(request, "predict.html", ctx)
        resp.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"
        return resp

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: `status` "ok" and what is loaded."""
        return {"status": "ok", "model": name, "classes": len(predictor.classes), "backend": predictor.backend, "precision": predictor.precision}

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        """The export's model.json: classes, architecture, preprocessing, open-set threshold, metrics, versions, file hashes."""
        return meta

    add_predict_route(app, "/predict", lambda: predictor, max_upload_bytes=max_upload_bytes, concurrency=concurrency, max_queue=max_queue)
    return app


def serve(
    folder: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    concurrency: int | None = None,
    threads: int | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    backend: str = "auto",
    precision: str | None = None,
    log_level: str = "info",
    access_log: bool = True,
    token: str | None = None,
) -> None:
    """Load `folder` and serve it with Uvicorn until interrupted (Ctrl-C).

    Binds `host` (loopback by default: pass 0.0.0.0 only to serve other machines, with a `token`, see
    `ursa.web.security.resolve_token`). Slow and idle connections are dropped (`ursa.web.server`).
    Raises ExportError for a bad folder and ServeError when the port is taken or the token is missing.
    """
    import socket

    from ursa.web.server import run

    if not 0 < port < 65536:
        raise ServeError(f"--port must be between 1 and 65535, got {port}.")
    app = create_predict_app(folder, max_upload_bytes=max_upload_bytes, concurrency=concurrency, threads=threads, backend=backend, precision=precision, host=host, token=token)
    try:  # fail with a clear message instead of uvicorn's log line and exit(1)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}). Another program is using the port: pass another --port.") from None
    run(app, host=host, port=port, log_level=log_level, access_log=access_log)
