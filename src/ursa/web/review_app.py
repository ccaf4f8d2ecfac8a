"""The review page: flagged images grouped by kind, with keep / relabel / delete, saved as they are made.

`create_review_app(root, run_dir)` reads the run's `issues.csv` (see `ursa.interpret.issues`) into a
`ReviewSession` (the state and the decide / undo / apply / undo-apply / image logic, which the studio
serves too) and serves:

- `GET /` the page (plain HTML + JS, no build step), `GET /api/state` everything it shows;
- `GET /img/{id}` an image by its id (12 hex digits derived from its name): only images listed in
  issues.csv, only from inside the dataset root (or its quarantine, once applied);
- `POST /api/decide` `{id, action, label?, version}`: a decision, written to the journal at once;
  a stale `version` (another tab decided first) gets 409 and changes nothing;
- `POST /api/undo` takes back the latest decision; `POST /api/apply` applies them (writes cleaned.csv,
  quarantines deletions); `POST /api/undo-apply` restores the dataset.

With a pool (`ursa review DATA --run RUN --pool DIR`), the picks of the run's `next.csv` (`ursa next`)
are shown first, to be labelled: `POST /api/pool/label` `{id, label}` copies the pool file into the
class folder (the pool is never changed), `POST /api/pool/skip` `{id}` leaves it out, `POST
/api/pool/undo` `{id}` takes either back (the copy goes to the quarantine); each writes a journal line
at once (`ursa.review.label_from_pool`). `GET /img/{id}` serves these pool files too (only those listed).

Bad ids get 400, unknown ids 404, with a JSON `{"error": ...}` body that says what to do. Every route is
behind `ursa.web.security.WebGuard`: a foreign Host or Origin gets 403, a POST that is not
`application/json` 415 (so no other web page can decide, apply or undo for the user).
"""

from __future__ import annotations

import hashlib
import json
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
from ursa.review import QUARANTINE_DIR, Review, ReviewConflict, dataset_labels, label_from_pool, pool_status, skip_pool_image, undo_pool_image
from ursa.web.security import protect

__all__ = ["ReviewRequestError", "ReviewSession", "create_review_app", "image_id"]

HERE = Path(__file__).resolve().parent
_ID = re.compile(r"^[0-9a-f]{12}$")


def image_id(name: str) -> str:
    """The page's id of image `name`: the first 12 hex digits of sha1(name)."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]


class ReviewRequestError(ReviewError):
    """A request the review session refuses; `status` is the HTTP status to answer with (400, 403, 404, 409)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ReviewSession:
    """The review of one run's findings (`run_dir/issues.csv`) over dataset `root`, for any web app.

    Holds what the page shows (the findings grouped by kind, each image with its id, label, decision and
    version) and turns requests into `ursa.review.Review` calls (the journal is the state: two sessions,
    or two tabs, on the same root see each other's decisions). Every refusal is a `ReviewRequestError`
    with its HTTP status. Raises ReviewError when issues.csv cannot be read.

    With `pool` (a folder of unlabelled images), the picks of `run_dir/next.csv` are listed too, to be
    labelled (`pool_label`, `pool_skip`, `pool_undo`); issues.csv is then optional.
    """

    def __init__(self, root: str | Path, run_dir: str | Path, *, pool: str | Path | None = None):
        self.root = Path(root)
        self.run_dir = Path(run_dir)
        self.review = Review(self.root)
        self.pool = Path(pool).resolve() if pool is not None else None
        self.pool_items: dict[str, dict[str, Any]] = {}  # id -> {id, name (relative to the pool), path, guess, confidence, reason}
        if self.pool is not None:
            self._load_pool(self.pool)
        try:
            rows = read_issues(self.run_dir) if (self.pool is None or (self.run_dir / "issues.csv").is_file()) else []
        except UrsaError as exc:
            raise ReviewError(str(exc)) from None
        labels_now = dataset_labels(self.root)
        cfg_path = self.run_dir / "config.json"
        classes = list(json.loads(cfg_path.read_text(encoding="utf-8")).get("classes", [])) if cfg_path.is_file() else []
        self.classes: list[str] = classes or sorted(set(labels_now.values()))
        self.items: dict[str, dict[str, Any]] = {}  # id -> {id, name, label (at load), split, findings}
        self.groups: dict[str, list[str]] = {k: [] for k in KINDS}  # kind -> ids, in issues.csv order
        for r in rows:
            name = r["name"]
            iid = image_id(name)
            it = self.items.setdefault(iid, {"id": iid, "name": name, "label": labels_now.get(name, r["label"]), "split": r["split"], "findings": []})
            it["findings"].append({k: r.get(k, "") for k in ("kind", "suggested", "confidence", "score", "group", "detail")})
            if r["kind"] in self.groups and iid not in self.groups[r["kind"]]:
                self.groups[r["kind"]].append(iid)
        self.names = {iid: it["name"] for iid, it in self.items.items()}
        self.labels_now = labels_now  # the dataset as it stands; re-read after an apply or its undo

    def _load_pool(self, pool: Path) -> None:
        from ursa.interpret.suggest import read_next

        if not pool.is_dir():
            raise ReviewError(f"pool folder {pool} does not exist. Pass --pool with the folder `ursa next` picked from.")
        try:
            rows = read_next(self.run_dir)
        except UrsaError as exc:
            raise ReviewError(f"{exc} (with --pool, the page shows the picks of `ursa next {self.run_dir} --pool {pool}`)") from None
        for r in rows:
            path = Path(r["name"])
            if not inside_root(pool, path):
                raise ReviewError(f"{self.run_dir / 'next.csv'} lists {path}, which is not in the pool {pool}: it was made for another pool. Run `ursa next {self.run_dir} --pool {pool}` first.")
            iid = image_id(str(path))
            self.pool_items[iid] = {"id": iid, "name": path.relative_to(pool).as_posix() if path.is_relative_to(pool) else path.name, "path": str(path),
                                    "guess": r["guess"], "confidence": r["confidence"], "reason": r["reason"]}  # fmt: skip

    def pool_state(self, iid: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        """One pool pick as the page shows it: its fields plus status (open / labelled / skipped), label and copy."""
        it = self.pool_items[iid]
        st = (status if status is not None else pool_status(self.root)).get(it["path"])
        return {**it, "status": st.status if st else "open", "label": st.label if st else None, "copy": st.name if st else None, "exists": Path(it["path"]).is_file()}

    def _pool_lookup(self, iid: Any) -> str:
        if not isinstance(iid, str) or not _ID.match(iid):
            raise ReviewRequestError(400, f"bad image id {str(iid)[:80]!r}: ids are 12 hex digits, as /api/state lists them.")
        if iid not in self.pool_items:
            raise ReviewRequestError(404, f"unknown pool image id {iid}: it is not among the picks of next.csv. Reload the page.")
        return self.pool_items[iid]["path"]

    def pool_label(self, iid: Any, label: Any) -> dict[str, Any]:
        """Copy pool pick `iid` into class `label` (409 when labelled already). -> {item}."""
        path = self._pool_lookup(iid)
        if not isinstance(label, str) or not label:
            raise ReviewRequestError(400, "label must be the name of a class.")
        try:
            label_from_pool(self.root, path, label, labels=self.classes)
        except ReviewError as exc:
            raise ReviewRequestError(409 if "already" in str(exc) else 400, str(exc)) from None
        self.labels_now = dataset_labels(self.root)
        return {"item": self.pool_state(iid)}

    def pool_skip(self, iid: Any) -> dict[str, Any]:
        """Leave pool pick `iid` out (409 when labelled). -> {item}."""
        path = self._pool_lookup(iid)
        try:
            skip_pool_image(self.root, path)
        except ReviewError as exc:
            raise ReviewRequestError(409, str(exc)) from None
        return {"item": self.pool_state(iid)}

    def pool_undo(self, iid: Any) -> dict[str, Any]:
        """Take back the labelling or skip of pool pick `iid` (409 when there is none). -> {item}."""
        path = self._pool_lookup(iid)
        try:
            undo_pool_image(self.root, path)
        except ReviewError as exc:
            raise ReviewRequestError(409, str(exc)) from None
        self.labels_now = dataset_labels(self.root)
        return {"item": self.pool_state(iid)}

    def lookup(self, iid: Any) -> str:
        """The image name of id `iid`; 400 for a malformed id, 404 for one not among the findings."""
        if not isinstance(iid, str) or not _ID.match(iid):
            raise ReviewRequestError(400, f"bad image id {str(iid)[:80]!r}: ids are 12 hex digits, as /api/state lists them.")
        if iid not in self.names:
            raise ReviewRequestError(404, f"unknown image id {iid}: it is not among this run's findings. Reload the page.")
        return self.names[iid]

    def item_state(self, iid: str, st: Any = None) -> dict[str, Any]:
        """One image as the page shows it: the load-time fields plus current label, decision and version
        (`st`: a `ursa.review.ReviewState` already read, to list many images from one read)."""
        st = st or self.review.state()
        it = self.items[iid]
        d = st.decision(it["name"])
        now = self.labels_now.get(it["name"])
        return {
            **it,
            "label": now or it["label"],
            "in_dataset": now is not None,
            "version": st.versions.get(it["name"], 0),
            "decision": ({"action": d["action"], "label": d.get("label")} if d else None),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows: root, run, classes, kinds (with ids), items by id, pending and applied counts."""
        st = self.review.state()
        status = pool_status(self.root) if self.pool is not None else {}
        return {
            "root": str(self.root),
            "run": str(self.run_dir),
            "pool": None if self.pool is None else {"dir": str(self.pool), "ids": list(self.pool_items), "items": {iid: self.pool_state(iid, status) for iid in self.pool_items}},
            "classes": self.classes,
            "kinds": [{"kind": k, "title": KIND_TITLES[k][0], "help": KIND_TITLES[k][1], "ids": self.groups[k]} for k in KINDS if self.groups[k]],
            "items": {iid: self.item_state(iid, st) for iid in self.items},
            "pending": len(st.decisions()),
            "applied": len(st.applies),
        }

    def image_path(self, iid: Any) -> Path:
        """The file of image `iid`, in the dataset or (once applied) its quarantine, or a pool pick in the pool;
        403 outside the root (or pool), 404 when gone."""
        if isinstance(iid, str) and iid in self.pool_items and self.pool is not None:
            path = Path(self.pool_items[iid]["path"])
            if not inside_root(self.pool, path):
                raise ReviewRequestError(403, f"image {iid} points outside the pool; it is not served.")
            if not path.is_file():
                raise ReviewRequestError(404, f"{path} is no longer in the pool.")
            return path
        name = self.lookup(iid)
        for path in (self.root / name, self.root / QUARANTINE_DIR / name):
            if not inside_root(self.root.resolve(), path):
                raise ReviewRequestError(403, f"image {iid} points outside the dataset root; it is not served.")
            if path.is_file():
                return path
        raise ReviewRequestError(404, f"{name} is no longer in {self.root} nor in its quarantine.")

    def decide(self, iid: Any, action: Any, *, label: Any = None, version: Any = None) -> dict[str, Any]:
        """Record a decision on image `iid` (action keep / relabel / delete, `label` for relabel); `version` the
        image's version the client saw (409 when another decision came first). -> {item, pending}."""
        name = self.lookup(iid)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ReviewRequestError(400, "version must be an integer (the image's version from /api/state).")
        try:
            self.review.decide(name, str(action), label=label, current=self.items[image_id(name)]["label"], expected_version=version, labels=self.classes)
        except ReviewConflict as exc:
            raise ReviewRequestError(409, str(exc)) from None
        except ReviewError as exc:
            raise ReviewRequestError(400, str(exc)) from None
        st = self.review.state()
        return {"item": self.item_state(image_id(name), st), "pending": len(st.decisions())}

    def undo(self) -> dict[str, Any]:
        """Take back the latest decision (409 when there is none). -> {item (None if not a finding), pending}."""
        try:
            line = self.review.undo()
        except ReviewError as exc:
            raise ReviewRequestError(409, str(exc)) from None
        st = self.review.state()
        iid = image_id(line["name"])
        return {"item": self.item_state(iid, st) if iid in self.items else None, "pending": len(st.decisions())}

    def apply(self) -> dict[str, Any]:
        """Apply the decisions: cleaned.csv written, deletions quarantined (409 when refused).
        -> {applied, counts, n_images, csv, quarantined}."""
        try:
            line = self.review.apply()
        except ReviewError as exc:
            raise ReviewRequestError(409, str(exc)) from None
        self.labels_now = dataset_labels(self.root)
        return {"applied": line["id"], "counts": line["counts"], "n_images": line["n_images"], "csv": str(self.root / line["csv"]["path"]), "quarantined": [m["name"] for m in line["moves"]]}

    def undo_apply(self) -> dict[str, Any]:
        """Undo the last apply, restoring the dataset (409 when there is none). -> {undone, restored}."""
        try:
            line = self.review.undo_apply()
        except ReviewError as exc:
            raise ReviewRequestError(409, str(exc)) from None
        self.labels_now = dataset_labels(self.root)
        return {"undone": line["id"], "restored": [m["name"] for m in line["moves"]]}


def create_review_app(root: str | Path, run_dir: str | Path, *, host: str = "127.0.0.1", token: str | None = None, pool: str | Path | None = None) -> FastAPI:
    """The review app for dataset `root` and the findings in `run_dir/issues.csv` (and, with `pool`, the
    picks of `run_dir/next.csv` to label), to be served on `host` (loopback unless a `token` is given)."""
    session = ReviewSession(root, run_dir, pool=pool)

    app = FastAPI(title="Ursa review", docs_url=None, redoc_url=None, openapi_url=None)
    protect(app, host=host, token=token, error_key="error")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(ReviewRequestError)
    async def _err(request: Request, exc: ReviewRequestError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> Any:
        return templates.TemplateResponse(request, "review.html", {"root": str(session.root), "run": str(session.run_dir)})

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        return session.snapshot()

    @app.get("/img/{iid}")
    def image(iid: str) -> FileResponse:
        return FileResponse(session.image_path(iid), headers={"Cache-Control": "no-store"})

    @app.post("/api/decide")
    async def decide(request: Request) -> dict[str, Any]:
        data = await json_body(request)
        return session.decide(data.get("id"), data.get("action"), label=data.get("label"), version=data.get("version"))

    @app.post("/api/undo")
    def undo() -> dict[str, Any]:
        return session.undo()

    @app.post("/api/apply")
    def apply() -> dict[str, Any]:
        return session.apply()

    @app.post("/api/undo-apply")
    def undo_apply() -> dict[str, Any]:
        return session.undo_apply()

    @app.post("/api/pool/label")
    async def pool_label(request: Request) -> dict[str, Any]:
        data = await json_body(request)
        return session.pool_label(data.get("id"), data.get("label"))

    @app.post("/api/pool/skip")
    async def pool_skip(request: Request) -> dict[str, Any]:
        return session.pool_skip((await json_body(request)).get("id"))

    @app.post("/api/pool/undo")
    async def pool_undo(request: Request) -> dict[str, Any]:
        return session.pool_undo((await json_body(request)).get("id"))

    return app


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body; ReviewRequestError 400 when it is not JSON or not an object."""
    try:
        data = await request.json()
    except ValueError:
        raise ReviewRequestError(400, "the request body must be JSON.") from None
    if not isinstance(data, dict):
        raise ReviewRequestError(400, "the request body must be a JSON object.")
    return data
