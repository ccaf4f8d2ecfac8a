"""The review page: flagged images grouped by kind, with keep / relabel / delete, saved as they are made.

`create_review_app(root, run_dir)` reads the run's `issues.csv` (see `ursa.interpret.issues`) and serves:

- `GET /` the page (plain HTML + JS, no build step), `GET /api/state` everything it shows;
- `GET /img/{id}` an image by its id (12 hex digits derived from its name): only images listed in
  issues.csv, only from inside the dataset root (or its quarantine, once applied);
- `POST /api/decide` `{id, action, label?, version}`: a decision, written to the journal at once;
  a stale `version` (another tab decided first) gets 409 and changes nothing;
- `POST /api/undo` takes back the latest decision; `POST /api/apply` applies them (writes cleaned.csv,
  quarantines deletions); `POST /api/undo-apply` restores the dataset.

Bad ids get 400, unknown ids 404, with a JSON `{"error": ...}` body that says what to do. Every route is
behind `ursa.web.security.WebGuard`: a foreign Host or Origin gets 403, a POST that is not
`application/json` 415 (so no other web page can decide, apply or undo for the user).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ursa.data.items import inside_root
from ursa.errors import ReviewError, UrsaError
from ursa.interpret.issues import KIND_TITLES, KINDS, read_issues
from ursa.review import QUARANTINE_DIR, Review, ReviewConflict, dataset_labels
from ursa.web.security import protect

__all__ = ["create_review_app", "image_id"]

HERE = Path(__file__).resolve().parent
_ID = re.compile(r"^[0-9a-f]{12}$")


def image_id(name: str) -> str:
    """The page's id of image `name`: the first 12 hex digits of sha1(name)."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]


class _Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_review_app(root: str | Path, run_dir: str | Path, *, host: str = "127.0.0.1", token: str | None = None) -> FastAPI:
    """The review app for dataset `root` and the findings in `run_dir/issues.csv`, to be served on `host`
    (loopback unless a `token` is given)."""
    root = Path(root)
    review = Review(root)
    try:
        rows = read_issues(run_dir)
    except UrsaError as exc:
        raise ReviewError(str(exc)) from None
    labels_now = dataset_labels(root)
    import json

    cfg_path = Path(run_dir) / "config.json"
    classes = list(json.loads(cfg_path.read_text(encoding="utf-8")).get("classes", [])) if cfg_path.is_file() else []
    classes = sorted(set(classes) | set(labels_now.values())) if not classes else classes
    items: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {k: [] for k in KINDS}
    for r in rows:
        name = r["name"]
        iid = image_id(name)
        it = items.setdefault(iid, {"id": iid, "name": name, "label": labels_now.get(name, r["label"]), "split": r["split"], "findings": []})
        it["findings"].append({k: r.get(k, "") for k in ("kind", "suggested", "confidence", "score", "group", "detail")})
        if r["kind"] in groups and iid not in groups[r["kind"]]:
            groups[r["kind"]].append(iid)
    names = {iid: it["name"] for iid, it in items.items()}
    current = {"labels": labels_now}  # the dataset as it stands; re-read after an apply or its undo

    app = FastAPI(title="Ursa review", docs_url=None, redoc_url=None, openapi_url=None)
    protect(app, host=host, token=token, error_key="error")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(_Error)
    async def _err(request: Request, exc: _Error) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def lookup(iid: Any) -> str:
        if not isinstance(iid, str) or not _ID.match(iid):
            raise _Error(400, f"bad image id {str(iid)[:80]!r}: ids are 12 hex digits, as /api/state lists them.")
        if iid not in names:
            raise _Error(404, f"unknown image id {iid}: it is not among this run's findings. Reload the page.")
        return names[iid]

    def item_state(iid: str, st: Any) -> dict[str, Any]:
        it = items[iid]
        d = st.decision(it["name"])
        now = current["labels"].get(it["name"])
        return {
            **it,
            "label": now or it["label"],
            "in_dataset": now is not None,
            "version": st.versions.get(it["name"], 0),
            "decision": ({"action": d["action"], "label": d.get("label")} if d else None),
        }

    def snapshot() -> dict[str, Any]:
        st = review.state()
        return {
            "root": str(root),
            "run": str(run_dir),
            "classes": classes,
            "kinds": [{"kind": k, "title": KIND_TITLES[k][0], "help": KIND_TITLES[k][1], "ids": groups[k]} for k in KINDS if groups[k]],
            "items": {iid: item_state(iid, st) for iid in items},
            "pending": len(st.decisions()),
            "applied": len(st.applies),
        }

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> Any:
        return templates.TemplateResponse(request, "review.html", {"root": str(root), "run": str(run_dir)})

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        return snapshot()

    @app.get("/img/{iid}")
    def image(iid: str) -> FileResponse:
        name = lookup(iid)
        for path in (root / name, root / QUARANTINE_DIR / name):
            if not inside_root(root.resolve(), path):
                raise _Error(403, f"image {iid} points outside the dataset root; it is not served.")
            if path.is_file():
                return FileResponse(path, headers={"Cache-Control": "no-store"})
        raise _Error(404, f"{name} is no longer in {root} nor in its quarantine.")

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise _Error(400, "the request body must be JSON.") from None
        if not isinstance(data, dict):
            raise _Error(400, "the request body must be a JSON object.")
        return data

    @app.post("/api/decide")
    async def decide(request: Request) -> dict[str, Any]:
        data = await body(request)
        name = lookup(data.get("id"))
        version = data.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise _Error(400, "version must be an integer (the image's version from /api/state).")
        try:
            review.decide(name, str(data.get("action")), label=data.get("label"), current=items[image_id(name)]["label"], expected_version=version, labels=classes)
        except ReviewConflict as exc:
            raise _Error(409, str(exc)) from None
        except ReviewError as exc:
            raise _Error(400, str(exc)) from None
        st = review.state()
        return {"item": item_state(image_id(name), st), "pending": len(st.decisions())}

    @app.post("/api/undo")
    def undo() -> dict[str, Any]:
        try:
            line = review.undo()
        except ReviewError as exc:
            raise _Error(409, str(exc)) from None
        st = review.state()
        iid = image_id(line["name"])
        return {"item": item_state(iid, st) if iid in items else None, "pending": len(st.decisions())}

    @app.post("/api/apply")
    def apply() -> dict[str, Any]:
        try:
            line = review.apply()
        except ReviewError as exc:
            raise _Error(409, str(exc)) from None
        current["labels"] = dataset_labels(root)
        return {"applied": line["id"], "counts": line["counts"], "n_images": line["n_images"], "csv": str(root / line["csv"]["path"]), "quarantined": [m["name"] for m in line["moves"]]}

    @app.post("/api/undo-apply")
    def undo_apply() -> dict[str, Any]:
        try:
            line = review.undo_apply()
        except ReviewError as exc:
            raise _Error(409, str(exc)) from None
        current["labels"] = dataset_labels(root)
        return {"undone": line["id"], "restored": [m["name"] for m in line["moves"]]}

    return app
