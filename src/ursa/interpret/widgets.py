"""`ImageCleaner`: the review page inside a notebook, as an ipywidgets widget.

The lesson cleaned its data in the notebook with fastai's `ImageClassifierCleaner`; this is that cleaner
with the review page's findings and rules. It shows the flagged images of one kind at a time (likely label
errors with the suggested label, the validation images with the largest loss, duplicates, leaks, outliers,
dark / bright / blurry / tiny / unreadable images), a page of cards each with the image, its name, label,
suggestion and confidence, and keep / relabel (a menu of the classes, or one click for the suggestion) /
delete buttons, plus undo, apply and undo apply.

The widget holds no decisions of its own: each click is a line of the dataset's journal, written through
`ursa.review.Review` at once, exactly as the review page writes it, so the page, `ursa review DATA --apply`
and `--undo` see the same decisions, and Apply writes the same `cleaned.csv` and quarantines the same files.
A click made from a stale card (the page or another notebook decided first) changes nothing and says so.

This is the only module that imports ipywidgets; nothing the CLI or the servers import imports it.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import ipywidgets as W

from ursa._io import sha256_file
from ursa.data.items import inside_root
from ursa.errors import BadImageError, InterpretError, ReviewError, UrsaError
from ursa.imageio import decode_image
from ursa.interpret.issues import (
    ISSUE_COLUMNS,
    KINDS,
    IssueReport,
    image_quality,
    quality_flags,
)
from ursa.interpret.issues import KIND_TITLES as ISSUE_KIND_TITLES
from ursa.review import QUARANTINE_DIR, Review, ReviewConflict, dataset_labels

__all__ = ["CLEANER_KINDS", "KIND_TITLES", "ImageCleaner", "thumbnail_jpeg"]

# The issue kinds, with "loss" (the validation images the model is most wrong about) after label issues.
CLEANER_KINDS = (KINDS[0], "loss", *KINDS[1:])
KIND_TITLES = {
    **ISSUE_KIND_TITLES,
    "loss": ("Top losses", "The validation images the model is most wrong about, largest loss first."),
}
_COLORS = {"keep": "#2e7d32", "relabel": "#1565c0", "delete": "#c62828"}


def thumbnail_jpeg(path: str | Path, *, size: int = 160, quality: int = 85) -> bytes:
    """The image at `path` as JPEG bytes at most `size` px on its long side: upright (EXIF orientation
    applied), refused over the pixel limit, JPEGs draft-decoded (`ursa.imageio.decode_image`)."""
    im = decode_image(path, min_side=size)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _placeholder(size: int, text: str) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (200, 200, 200))
    ImageDraw.Draw(im).text((8, size // 2 - 6), text, fill=(90, 90, 90))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _fmt_pct(x: Any) -> str:
    try:
        return f"{float(x):.0%}"
    except (TypeError, ValueError):
        return ""


def _describe(d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    return f"relabel → {d.get('label')}" if d["action"] == "relabel" else d["action"]


# ---- what to show: rows like issues.csv's, from a run folder, an IssueReport or a Learner ---------


@dataclass
class _Findings:
    root: Path
    classes: list[str]
    rows: list[dict[str, str]]
    source: str  # what the findings came from, for the header
    notes: list[str] = field(default_factory=list)  # kinds that could not be searched, and why


def _row(**kw: Any) -> dict[str, str]:
    return {k: ("" if kw.get(k) is None else (f"{kw[k]:.6f}" if isinstance(kw[k], float) else str(kw[k]))) for k in ISSUE_COLUMNS}


def _from_run(run: Path, root: Path | None, *, top_losses: int, progress: Callable[[str], None] | None) -> _Findings:
    from ursa.interpret.issues import find_issues, read_issues

    cfg_path = run / "config.json"
    if not run.is_dir():
        raise InterpretError(f"{run} does not exist. Pass a run folder written by `ursa train DATA --out RUN` (runs/NAME), an IssueReport or a Learner.")
    if not cfg_path.is_file():
        raise InterpretError(f"{run} is not a training run (no config.json). Pass a run folder written by `ursa train DATA --out RUN` (runs/NAME), an IssueReport or a Learner.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InterpretError(f"{cfg_path} cannot be read ({exc}). Train again to rewrite it.") from None
    if root is None:
        if cfg.get("root"):
            root = Path(cfg["root"])
        elif (run / "split.json").is_file():
            from ursa.data.split import load_split

            root = load_split(run / "split.json").root
        else:
            raise InterpretError(f"{cfg_path} does not name the dataset folder. Pass it: ImageCleaner({str(run)!r}, root=DATA).")
    if not root.is_dir():
        raise InterpretError(f"the dataset of {run} ({root}) is not there any more. Move it back, or pass its new place: ImageCleaner({str(run)!r}, root=DATA).")
    if (run / "issues.csv").is_file():
        rows = read_issues(run)
    else:
        rows = [_row(**{k: getattr(i, k) for k in ISSUE_COLUMNS}) for i in find_issues(run, progress=progress).issues]
    classes = list(cfg.get("classes") or [])
    findings = _Findings(root, classes, list(rows), f"run {run}")
    if top_losses > 0 and (run / "predictions.csv").is_file():
        from ursa.interpret.analysis import ClassificationInterpretation

        interp = ClassificationInterpretation.from_run(run)
        findings.classes = findings.classes or interp.classes
        findings.rows += _loss_rows(interp.probs, interp.targets, interp.classes, interp.names or [], top_losses)
    elif top_losses > 0:
        findings.notes.append(f"no top losses: {run / 'predictions.csv'} is missing (train again to write it).")
    return findings


def _loss_rows(probs: Any, targets: Any, classes: Sequence[str], names: Sequence[str], k: int) -> list[dict[str, str]]:
    """The `k` largest-loss validation images as "loss" rows: the predicted class is the suggestion when it
    differs from the label."""
    import numpy as np

    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    loss = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))
    out = []
    for i in np.argsort(-loss, kind="stable")[:k].tolist():
        t, p = int(targets[i]), int(probs[i].argmax())
        wrong = p != t
        detail = f"predicted {classes[p]} ({probs[i, p]:.0%}), labelled {classes[t]} ({probs[i, t]:.0%}); loss {loss[i]:.2f}"
        out.append(_row(kind="loss", name=names[i], label=classes[t], split="valid", suggested=classes[p] if wrong else "", confidence=float(probs[i, p]) if wrong else None, score=float(loss[i]), detail=detail))
    return out


def _from_report(report: IssueReport, root: Path | None) -> _Findings:
    if root is None:
        if not report.summary.get("root"):
            raise InterpretError("this IssueReport does not record its dataset folder (search_issues leaves it to the caller). Pass it: ImageCleaner(report, root=DATA).")
        root = Path(report.summary["root"])
    if not root.is_dir():
        raise InterpretError(f"the dataset folder {root} does not exist. Pass the folder the report was searched on: ImageCleaner(report, root=DATA).")
    rows = [_row(**{k: getattr(i, k) for k in ISSUE_COLUMNS}) for i in report.issues]
    return _Findings(root, list(report.classes), rows, "an IssueReport")


def _from_learner(learn: Any, root: Path | None, *, top_losses: int, quality: bool, progress: Callable[[str], None] | None) -> _Findings:
    """Top losses (the learner's validation predictions) and the search of `ursa issues` over the learner's
    feature cache (`learn.features()`: label issues, duplicates, leaks, outliers, pixel checks). A learner
    without one (its body changed before the cache was read, or not an image learner of this kind) gets
    exact duplicates and leaks by file hash and the pixel checks, and a note saying what is missing."""
    say = progress or (lambda msg: None)
    dls = getattr(learn, "dls", None)
    split = getattr(dls, "split", None)
    if split is None:
        raise InterpretError("this Learner has no image data (it trains on cached features). Pass the run folder instead: ImageCleaner('runs/NAME').")
    root = Path(root) if root is not None else Path(split.root)
    if not root.is_dir():
        raise InterpretError(f"the dataset folder {root} of this Learner does not exist any more. Move it back, or pass its new place: ImageCleaner(learn, root=DATA).")
    classes = list(dls.classes)
    findings = _Findings(root, classes, [], "a Learner")
    if top_losses > 0 and split.valid:
        from ursa.interpret.analysis import ClassificationInterpretation

        say("top losses (validation predictions)")
        interp = ClassificationInterpretation.from_learner(learn)  # names the files behind the predictions
        if interp.names is not None:
            findings.rows += _loss_rows(interp.probs, interp.targets, interp.classes, interp.names, top_losses)
        else:
            findings.notes.append("no top losses: this Learner's validation predictions do not line up with its image files.")
    fd, why = _learner_features(learn)
    if fd is not None:
        report = _search_features(fd, root, classes, quality=quality, seed=getattr(split, "seed", 42), progress=say)
        findings.rows += [_row(**{k: getattr(i, k) for k in ISSUE_COLUMNS}) for i in report.issues]
        return findings
    findings.notes.append(f"label issues, near copies and outliers need the learner's feature cache ({why}); `ursa issues RUN` on a run folder, passed here, finds them.")
    findings.rows += _file_checks(split, root, quality=quality, say=say)
    return findings


def _learner_features(learn: Any) -> tuple[Any, str]:
    """(the learner's FeatureData, "") or (None, why not)."""
    features = getattr(learn, "features", None)
    if not callable(features):
        return None, "this learner has none"
    try:
        return features(), ""
    except UrsaError as exc:
        return None, str(exc).rstrip(".")


def _search_features(fd: Any, root: Path, classes: list[str], *, quality: bool, seed: int, progress: Callable[[str], None]) -> IssueReport:
    """`search_issues` over a split's cached features (`ursa.train.features.FeatureData`), as `find_issues`
    runs it for a run folder: every cached view of each training image, the evaluation views of each
    validation image, predicting on the views both sides have."""
    import numpy as np

    from ursa.interpret.issues import search_issues

    n_tr, n_va = len(fd.train_names), len(fd.valid_names)
    n_views = len(fd.views)
    x_tr = fd.x_train.numpy().reshape(n_views, n_tr, -1)
    x_va = [v.numpy() for v in fd.x_valid]
    views: list[list[Any]] = [[x_tr[v, i] for v in range(n_views)] for i in range(n_tr)]
    views += [[x[i] for x in x_va] for i in range(n_va)]
    predict_views = 2 if (len(x_va) > 1 and n_views > 1 and fd.views[1] == 1) else 1
    labels = np.concatenate([fd.y_train[:n_tr].numpy(), fd.y_valid.numpy()])
    return search_issues(root, fd.train_names + fd.valid_names, labels, [False] * n_tr + [True] * n_va, views, classes, predict_views=predict_views, seed=seed, quality=quality, progress=progress)


def _file_checks(split: Any, root: Path, *, quality: bool, say: Callable[[str], None]) -> list[dict[str, str]]:
    """Exact duplicates and leaks (equal sha256) and the pixel checks of every image of `split`: what can be
    found without features."""
    rows: list[dict[str, str]] = []
    labelled = [(it, "train") for it in split.train] + [(it, "valid") for it in split.valid]
    say("hashing files")
    by_hash: dict[str, list[tuple[Any, str]]] = {}
    for it, side in labelled:
        try:
            by_hash.setdefault(sha256_file(root / it.name), []).append((it, side))
        except OSError:
            continue  # gone since the split was made: the pixel checks below report it
    n_group = 0
    for members in by_hash.values():
        if len(members) < 2:
            continue
        n_group += 1
        gid = f"g{n_group}"
        labs = sorted({it.label for it, _ in members})
        how = "exact copies" + (", labels differ: " + " vs ".join(labs) if len(labs) > 1 else "")
        for it, side in members:
            others = ", ".join(o.name for o, _ in members if o.name != it.name)
            rows.append(_row(kind="duplicate", name=it.name, label=it.label, split=side, score=1.0, group=gid, detail=f"{how}; same as {others}"))
        if len({side for _, side in members}) > 1:
            for it, side in members:
                rows.append(_row(kind="leak", name=it.name, label=it.label, split=side, score=1.0, group=gid, detail="in both train and valid: the validation score overstates accuracy"))
    if quality:
        say("image quality")
        for it, side in labelled:
            try:
                q = image_quality(root / it.name)
            except (OSError, ValueError) as exc:
                rows.append(_row(kind="unreadable", name=it.name, label=it.label, split=side, detail=f"could not be opened to measure: {exc}"))
                continue
            for kind, score, detail in quality_flags(q):
                rows.append(_row(kind=kind, name=it.name, label=it.label, split=side, score=float(score), detail=detail))
    return rows


def _findings(source: Any, root: Path | None, *, top_losses: int, quality: bool, progress: Callable[[str], None] | None) -> _Findings:
    if isinstance(source, IssueReport):
        return _from_report(source, root)
    if isinstance(source, (str, Path)):
        return _from_run(Path(source), root, top_losses=top_losses, progress=progress)
    if callable(getattr(source, "get_preds", None)) and hasattr(source, "dls"):
        return _from_learner(source, root, top_losses=top_losses, quality=quality, progress=progress)
    raise InterpretError(f"ImageCleaner shows a run folder (runs/NAME), an IssueReport or a Learner; got {type(source).__name__}. Pass one of those.")


# ---- the widget -----------------------------------------------------------------------------------


class ImageCleaner(W.VBox):
    """An ipywidgets widget to clean a dataset in a notebook, writing through the review journal.

    `source`: a run folder (`runs/NAME`: its issues.csv, searched first with `find_issues` when missing,
    and its predictions.csv for the top losses), an `IssueReport`, or a `Learner` built on image
    DataLoaders (top losses on its validation set, and the same search over its feature cache; without
    one, exact duplicates and leaks by file hash and the pixel checks). `root`: the dataset folder when
    the source does not record it (or it moved).
    `kinds`: which kinds to offer, in `CLEANER_KINDS` order (default: every kind that has findings).
    `max_images`: at most this many images per kind; `top_losses`: how many validation images the
    "loss" kind lists; `per_page`: cards per page; `thumb`: thumbnail size (px, long side);
    `quality`: run the pixel checks for a Learner. Display it as a cell's last expression.
    """

    def __init__(
        self,
        source: Any,
        *,
        kinds: Sequence[str] | None = None,
        max_images: int | None = 200,
        top_losses: int = 16,
        per_page: int = 12,
        thumb: int = 160,
        root: str | Path | None = None,
        quality: bool = True,
        progress: Callable[[str], None] | None = None,
    ):
        if kinds is not None:
            bad = [k for k in kinds if k not in CLEANER_KINDS]
            if bad or not kinds:
                raise InterpretError(f"unknown kinds {bad or list(kinds)}; pick from {', '.join(CLEANER_KINDS)}.")
        for name, value, low in (("per_page", per_page, 1), ("thumb", thumb, 16), ("top_losses", top_losses, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InterpretError(f"{name} must be an integer of at least {low}, got {value!r}.")
        if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
            raise InterpretError(f"max_images must be a positive integer or None, got {max_images!r}.")
        found = _findings(source, Path(root) if root is not None else None, top_losses=top_losses if kinds is None or "loss" in kinds else 0, quality=quality, progress=progress)
        self.root = found.root
        self.review = Review(self.root)
        self.notes = found.notes
        self.source = found.source
        self.labels_now = dataset_labels(self.root)  # the dataset as it stands; re-read after an apply or its undo
        self.classes = found.classes or sorted(set(self.labels_now.values()))
        self.per_page, self.thumb = per_page, thumb
        wanted = list(kinds) if kinds is not None else list(CLEANER_KINDS)
        self.items: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, list[str]] = {k: [] for k in CLEANER_KINDS}
        for r in found.rows:
            kind, name = r.get("kind", ""), r.get("name", "")
            if kind not in wanted or not name or (max_images is not None and len(self.groups[kind]) >= max_images and name not in self.groups[kind]):
                continue
            it = self.items.setdefault(name, {"name": name, "label": r.get("label", ""), "split": r.get("split", ""), "findings": []})
            it["findings"].append({k: r.get(k, "") for k in ("kind", "suggested", "confidence", "score", "group", "detail")})
            if name not in self.groups[kind]:
                self.groups[kind].append(name)
        self.kinds = [k for k in CLEANER_KINDS if k in wanted and self.groups[k]]
        # name -> the version its card last showed: a click on a stale card is refused (as the page's 409);
        # an image never shown (decided through `decide` from code) is not checked
        self._seen: dict[str, int] = {}
        self._thumbs: dict[str, bytes] = {}
        self._cards: list[_Card] = []
        self.kind = self.kinds[0] if self.kinds else ""
        self.page = 0

        self.kind_menu = W.Dropdown(options=self._kind_options(), value=self.kind or None, description="Show:", style={"description_width": "initial"}, layout=W.Layout(width="300px"))
        self.prev_button = W.Button(description="◀ Prev", tooltip="previous page", layout=W.Layout(width="80px"))
        self.next_button = W.Button(description="Next ▶", tooltip="next page", layout=W.Layout(width="80px"))
        self.page_label = W.Label()
        self.undo_button = W.Button(description="Undo", tooltip="Take back the last decision", icon="undo", layout=W.Layout(width="auto"))
        self.apply_button = W.Button(description="Apply", button_style="primary", tooltip="Write cleaned.csv and move deleted images to .ursa/quarantine/", layout=W.Layout(width="auto"))
        self.undo_apply_button = W.Button(description="Undo apply", tooltip="Restore the dataset as it was before the last apply", layout=W.Layout(width="auto"))
        self.progress = W.Label()
        self.status = W.HTML()
        self.help = W.HTML()
        self.notes_html = W.HTML()  # what this source could not search, and why (stays shown)
        self.grid = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", align_items="stretch"))
        self.kind_menu.observe(self._on_kind, names="value")
        self.prev_button.on_click(lambda _: self.show_page(self.page - 1))
        self.next_button.on_click(lambda _: self.show_page(self.page + 1))
        self.undo_button.on_click(lambda _: self.undo())
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_apply_button.on_click(lambda _: self.undo_apply())
        header = W.HTML(
            f"<b>Clean <code>{html.escape(str(self.root))}</code></b> &nbsp;<span style='color:#666'>findings of {html.escape(self.source)}. "
            "Every decision is saved the moment you make it (the review page and <code>ursa review DATA --apply</code> see it); "
            "nothing changes on disk until you press <b>Apply</b>, which can be undone.</span>"
        )
        bar = W.HBox([self.kind_menu, self.prev_button, self.page_label, self.next_button, self.undo_button, self.apply_button, self.undo_apply_button], layout=W.Layout(flex_flow="row wrap", align_items="center"))
        if self.notes:
            self.notes_html.value = "".join(f"<div style='color:#666;font-size:12px'>{html.escape(n)}</div>" for n in self.notes)
        super().__init__([header, bar, self.notes_html, self.progress, self.status, self.help, self.grid])
        self.show_page(0)

    # ---- rendering ---------------------------------------------------------------------------------
    def _kind_options(self) -> list[tuple[str, str]]:
        return [(f"{KIND_TITLES[k][0]} ({len(self.groups[k])})", k) for k in self.kinds]

    def _on_kind(self, change: dict[str, Any]) -> None:
        if change["new"] and change["new"] != self.kind:
            self.kind = change["new"]
            self.show_page(0)

    @property
    def n_pages(self) -> int:
        n = len(self.groups.get(self.kind, []))
        return max(1, -(-n // self.per_page))

    def page_names(self) -> list[str]:
        """The images on the page shown now, in order."""
        names = self.groups.get(self.kind, [])
        return names[self.page * self.per_page : (self.page + 1) * self.per_page]

    @property
    def cards(self) -> list[_Card]:
        """The cards of the page shown now (one per image, in page order)."""
        return list(self._cards)

    def card(self, name: str) -> _Card:
        """The card of image `name` on the page shown now."""
        for c in self._cards:
            if c.name == name:
                return c
        raise InterpretError(f"{name} is not on the page shown now ({self.kind}, page {self.page + 1}).")

    def show(self, kind: str, page: int = 0) -> None:
        """Show the findings of `kind` (one of `self.kinds`), page `page` (0-based)."""
        if kind not in self.kinds:
            raise InterpretError(f"no findings of kind {kind!r} here; shown kinds: {', '.join(self.kinds) or 'none'}.")
        self.kind = kind
        self.kind_menu.value = kind
        self.show_page(page)

    def show_page(self, page: int) -> None:
        """Render page `page` (clamped to the pages there are) of the current kind."""
        self.page = max(0, min(self.n_pages - 1, page))
        st = self.review.state()
        title, help_text = KIND_TITLES.get(self.kind, ("", ""))
        self._cards = [_Card(self, self.items[n]) for n in self.page_names()]
        for c in self._cards:
            c.update(st)
        self.grid.children = [c.box for c in self._cards]
        if not self.kinds:
            self.help.value = "<p>No findings: nothing to review.</p>"
        else:
            self.help.value = f"<p><b>{html.escape(title)}</b> ({len(self.groups[self.kind])}). {html.escape(help_text)}</p>"
        self.page_label.value = f"page {self.page + 1} of {self.n_pages}"
        self.prev_button.disabled = self.page == 0
        self.next_button.disabled = self.page >= self.n_pages - 1
        self._progress(st)

    def _progress(self, st: Any) -> None:
        decided = sum(1 for n in self.items if st.decision(n))
        self.progress.value = f"{decided} of {len(self.items)} flagged images decided · {len(st.decisions())} pending until Apply"

    def _refresh(self, names: Sequence[str] | None = None) -> Any:
        st = self.review.state()
        for c in self._cards:
            if names is None or c.name in names:
                c.update(st)
        self._progress(st)
        return st

    def say(self, message: str, *, ok: bool = False) -> None:
        """Show `message` above the cards (red for a problem, green for news); "" clears it."""
        color = "#2e7d32" if ok else "#c62828"
        self.status.value = f"<div style='color:{color};padding:2px 0'>{html.escape(message)}</div>" if message else ""

    def thumbnail(self, name: str) -> bytes:
        """JPEG bytes of image `name` (from the dataset, or its quarantine once applied); a grey tile when
        it cannot be shown."""
        if name not in self._thumbs:
            data = None
            for path in (self.root / name, self.root / QUARANTINE_DIR / name):
                if inside_root(self.root.resolve(), path) and path.is_file():
                    try:
                        data = thumbnail_jpeg(path, size=self.thumb)
                    except BadImageError:
                        data = _placeholder(self.thumb, "cannot be shown")
                    break
            self._thumbs[name] = data if data is not None else _placeholder(self.thumb, "missing")
        return self._thumbs[name]

    # ---- actions (the buttons call these; each goes through ursa.review) -------------------------
    def decide(self, name: str, action: str, label: str | None = None) -> bool:
        """Record keep / relabel (to `label`) / delete for image `name`, as its card showed it. Returns
        whether it was recorded; a refusal (a stale card, a bad label) is shown as a message."""
        it = self.items.get(name)
        if it is None:
            self.say(f"{name} is not among these findings.")
            return False
        try:
            self.review.decide(name, action, label=label, current=self.labels_now.get(name, it["label"]), expected_version=self._seen.get(name), labels=self.classes)
        except ReviewConflict:
            st = self._refresh([name])
            now = _describe(st.decision(name)) or "no decision"
            self.say(f"{name} was decided elsewhere since this card showed it (now: {now}). Nothing changed; the card shows the latest, decide again if you still want to.")
            return False
        except ReviewError as exc:
            self.say(str(exc))
            return False
        self.say("")
        self._refresh([name])
        return True

    def undo(self) -> bool:
        """Take back the most recent pending decision (the same as the review page's Undo)."""
        try:
            line = self.review.undo()
        except ReviewError as exc:
            self.say(str(exc))
            return False
        st = self._refresh([line["name"]])
        d = _describe(st.decision(line["name"]))
        self.say(f"undone: the last decision about {line['name']}" + (f" (now: {d})" if d else ""), ok=True)
        return True

    def apply(self) -> dict[str, Any] | None:
        """Apply every pending decision (`ursa.review.Review.apply`): write cleaned.csv, move deleted images
        to .ursa/quarantine/. Returns the journal's apply line, or None (with a message) when refused."""
        try:
            line = self.review.apply()
        except UrsaError as exc:
            self.say(str(exc))
            return None
        self.labels_now = dataset_labels(self.root)
        self.show_page(self.page)
        c = line["counts"]
        self.say(f"Applied: {c['relabel']} relabelled, {c['delete']} moved to quarantine, {c['keep']} kept. Wrote {self.root / line['csv']['path']} ({line['n_images']} images). Undo apply restores the dataset.", ok=True)
        return line

    def undo_apply(self) -> dict[str, Any] | None:
        """Undo the last apply (`ursa.review.Review.undo_apply`): files back, cleaned.csv as it was; its
        decisions are pending again. Returns the apply line undone, or None (with a message)."""
        try:
            line = self.review.undo_apply()
        except UrsaError as exc:
            self.say(str(exc))
            return None
        self.labels_now = dataset_labels(self.root)
        self.show_page(self.page)
        self.say(f"Undone: {len(line['moves'])} images restored, cleaned.csv as before the apply of {line['id']}.", ok=True)
        return line

    def pending(self) -> dict[str, dict[str, Any]]:
        """name -> pending decision (its journal line), for every image of the dataset with one."""
        return self.review.state().decisions()


class _Card:
    """One image's card: thumbnail, name, label, suggestion, what the finding says, the decision, buttons."""

    def __init__(self, cleaner: ImageCleaner, item: dict[str, Any]):
        self.cleaner, self.item, self.name = cleaner, item, item["name"]
        kind = cleaner.kind
        self.finding = next((f for f in item["findings"] if f["kind"] == kind), item["findings"][0])
        size = f"{cleaner.thumb}px"
        self.image = W.Image(value=cleaner.thumbnail(self.name), format="jpeg", layout=W.Layout(width=size, height=size, object_fit="contain"))
        self.info = W.HTML(layout=W.Layout(width="100%"))  # name, split, label, suggestion, what the finding says
        self.decision = W.HTML()
        self.keep_button = W.Button(description="Keep", tooltip="keep it as it is", layout=W.Layout(width="auto"))
        self.delete_button = W.Button(description="Delete", tooltip="move it to quarantine on Apply", button_style="danger", layout=W.Layout(width="auto"))
        suggested = self.finding.get("suggested") or ""
        self.accept_button = W.Button(description=f"→ {suggested}", tooltip=f"relabel to the suggested {suggested}", button_style="info", layout=W.Layout(width="auto")) if suggested else None
        self.relabel = W.Dropdown(options=[("relabel to…", "")] + [(c, c) for c in cleaner.classes], value="", layout=W.Layout(width="100%"))
        self.keep_button.on_click(lambda _: cleaner.decide(self.name, "keep"))
        self.delete_button.on_click(lambda _: cleaner.decide(self.name, "delete"))
        if self.accept_button is not None:
            self.accept_button.on_click(lambda _: cleaner.decide(self.name, "relabel", suggested))
        self.relabel.observe(self._on_relabel, names="value")
        buttons = [self.keep_button, *([self.accept_button] if self.accept_button else []), self.delete_button]
        self.box = W.VBox(
            [self.image, self.info, self.decision, W.HBox(buttons, layout=W.Layout(flex_flow="row wrap", width="100%", justify_content="center")), self.relabel],
            layout=W.Layout(width=f"{cleaner.thumb + 56}px", align_items="center", margin="4px", padding="4px", border="2px solid #ddd"),
        )

    @property
    def buttons(self) -> list[W.Button]:
        return [self.keep_button, *([self.accept_button] if self.accept_button else []), self.delete_button]

    def _on_relabel(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.cleaner.decide(self.name, "relabel", change["new"])
            self.relabel.value = ""  # the menu is an action, not a state: the card shows the decision

    def update(self, st: Any) -> None:
        """Show the image's label and decision as the journal `st` has them; remember its version."""
        c = self.cleaner
        self.cleaner._seen[self.name] = st.versions.get(self.name, 0)
        now = c.labels_now.get(self.name)
        label = now or self.item["label"]
        f = self.finding
        suggestion = f"<div style='font-size:12px'>suggested: <b>{html.escape(f['suggested'])}</b> {_fmt_pct(f.get('confidence'))}</div>" if f.get("suggested") else ""
        self.info.value = (
            f"<div style='font-family:monospace;font-size:11px;word-break:break-all'>{html.escape(self.name)} "
            f"<span style='color:#666'>{html.escape(self.item['split'])}</span></div>"
            f"<div style='font-size:12px'>label: <b>{html.escape(label)}</b></div>{suggestion}"
            f"<div style='font-size:11px;color:#666;line-height:1.2'>{html.escape(f.get('detail') or '')}</div>"
        )
        d = st.decision(self.name)
        if now is None:
            text, color = "in quarantine (applied)" if (c.root / QUARANTINE_DIR / self.name).is_file() else "not in the dataset", "#666"
        else:
            text, color = _describe(d), _COLORS.get(d["action"], "#666") if d else "#666"
        self.decision.value = f"<div style='color:{color};font-weight:bold;min-height:1.2em'>{html.escape(text)}</div>"
        self.box.layout.border = f"2px solid {_COLORS[d['action']]}" if (d and now is not None) else "2px solid #ddd"
        for b in [*self.buttons, self.relabel]:
            b.disabled = now is None
