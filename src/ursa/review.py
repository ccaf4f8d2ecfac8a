"""Review decisions, applying them to a dataset, and undoing them.

Besides `ursa.verify` (which repairs and quarantines broken files), this is the only code that changes a
dataset, and both record every change in the same journal, `<root>/.ursa/journal.jsonl` (`ursa.journal`).
Decisions (keep / relabel / delete, one per image, the latest wins) are lines of that append-only journal,
written and fsync'ed the moment they are made, so a closed page, a crash or a reload loses nothing. Undoing
a decision is another line; nothing is rewritten. A journal from before, `<root>/.ursa/review/journal.jsonl`,
is still read (first), so decisions and applies recorded there can still be applied and undone.

Applying the pending decisions:
- writes `<root>/cleaned.csv` (`name,label`, names relative to the root) listing every image that
  stays, with its new label; an existing cleaned.csv is first copied to `.ursa/review/backups/`;
- moves each "deleted" image to `<root>/.ursa/quarantine/<name>` (never deletes a file);
- records the whole plan in the journal *before* touching anything (an "apply" line listing every
  move with its sha256, and the new cleaned.csv staged in `.ursa/review/`), and an "applied" line once
  the last move is made and cleaned.csv is in place. An apply that was killed in between is finished by
  the next `apply` (the moves not yet made, each file checked against its sha256, then cleaned.csv), and
  `undo_apply` can always restore the dataset byte for byte, finished or not (files are moved back,
  verified by sha256; cleaned.csv is put back as it was, or set aside if there was none).

Each image also has a version (how many journal lines touched it). A decision made from a stale view
(another tab or person decided first) is refused with `ReviewConflict` and changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ursa._io import atomic_write_bytes, dataset_lock, sha256_file
from ursa.errors import ReviewError
from ursa.journal import Journal, journal_path

__all__ = [
    "ACTIONS",
    "REVIEW_DIR",
    "QUARANTINE_DIR",
    "CLEANED_CSV",
    "ReviewConflict",
    "ReviewState",
    "Review",
    "dataset_labels",
    "apply_decisions",
    "undo_apply",
    "update_cleaned",
    "check_class_change",
    "PoolStatus",
    "pool_status",
    "label_from_pool",
    "skip_pool_image",
    "undo_pool_image",
]

ACTIONS = ("keep", "relabel", "delete")
REVIEW_DIR = Path(".ursa") / "review"
QUARANTINE_DIR = Path(".ursa") / "quarantine"
CLEANED_CSV = "cleaned.csv"


class ReviewConflict(ReviewError):
    """A decision was based on a stale view of an image: someone else decided first. Nothing changed."""


@dataclass
class ReviewState:
    """The journal folded into the present: pending decisions and the applies that can be undone."""

    pending: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> its decision lines, latest last
    versions: dict[str, int] = field(default_factory=dict)  # name -> journal lines that touched it
    applies: list[tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]] = field(default_factory=list)  # (apply line, pending before it)
    unfinished: dict[str, Any] | None = None  # an apply line with no "applied" line yet (the process was killed)
    seq: int = 0  # last sequence number used

    def decision(self, name: str) -> dict[str, Any] | None:
        """The pending decision of `name` (its latest line), or None."""
        stack = self.pending.get(name)
        return stack[-1] if stack else None

    def decisions(self) -> dict[str, dict[str, Any]]:
        """name -> pending decision, for every image with one."""
        return {n: s[-1] for n, s in self.pending.items() if s}

    def last(self) -> dict[str, Any] | None:
        """The most recent pending decision line (what `undo` takes back)."""
        lines = [ln for s in self.pending.values() for ln in s]
        return max(lines, key=lambda ln: ln["seq"]) if lines else None


def dataset_labels(root: str | Path) -> dict[str, str]:
    """name -> label of every image of the dataset as it stands: `cleaned.csv` when there is one (the last
    cleaning round), else the class folders (or train/ and valid/ class folders). Names sorted."""
    from ursa.data.items import find_split_folders, read_labels_csv, scan_class_folders
    from ursa.errors import DataError

    root = Path(root)
    if not root.is_dir():
        raise ReviewError(f"dataset folder {root} does not exist. Pass the folder that holds the images.")
    try:
        csv_path = root / CLEANED_CSV
        if csv_path.is_file():
            found = read_labels_csv(root, csv_path, allow_new_labels=True)
            items = found.items
        else:
            folders = find_split_folders(root)
            if folders:
                items = scan_class_folders(root, sub=folders[0]).items + scan_class_folders(root, sub=folders[1]).items
            else:
                items = scan_class_folders(root).items
    except DataError as exc:
        raise ReviewError(str(exc)) from None
    return {it.name: it.label for it in sorted(items)}


class Review:
    """The review of one dataset root, kept in its journal; safe to share between threads and processes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ReviewError(f"dataset folder {self.root} does not exist. Pass the folder that holds the images.")
        self.dir = self.root / REVIEW_DIR  # backups and the staged cleaned.csv
        self.journal = journal_path(self.root)
        self.log = Journal(self.root, error=ReviewError)

    def locked(self) -> AbstractContextManager[None]:
        """A context manager holding the journal's lock (threads and processes); re-entrant."""
        return self.log.locked()

    def lines(self) -> list[dict[str, Any]]:
        """Every journal line, oldest first. A torn last line (a crash mid-write) is ignored."""
        return self.log.lines()

    def state(self) -> ReviewState:
        """Fold the journal into the present state."""
        st = ReviewState()
        for ln in self.lines():
            st.seq = max(st.seq, int(ln.get("seq", 0)))
            op = ln.get("op")
            name = ln.get("name")
            if op == "decide":
                st.pending.setdefault(name, []).append(ln)
                st.versions[name] = st.versions.get(name, 0) + 1
            elif op == "undo":
                st.pending[name] = [d for d in st.pending.get(name, []) if d["seq"] != ln["undoes"]]
                st.versions[name] = st.versions.get(name, 0) + 1
            elif op == "apply":
                st.applies.append((ln, st.pending))
                for n in st.pending:
                    st.versions[n] = st.versions.get(n, 0) + 1
                st.pending = {}
                # An apply line that stages cleaned.csv is followed by an "applied" line once it is done;
                # older apply lines had no such line and count as done (undo still restores them).
                st.unfinished = ln if ln.get("csv", {}).get("staged") else None
            elif op == "applied":
                if st.unfinished is not None and st.unfinished["id"] == ln.get("id"):
                    st.unfinished = None
            elif op in ("unapply", "rollback"):
                if st.unfinished is not None and st.unfinished["id"] == ln.get("id"):
                    st.unfinished = None
                if st.applies and st.applies[-1][0]["id"] == ln["id"]:
                    _, st.pending = st.applies.pop()
                    for n in st.pending:
                        st.versions[n] = st.versions.get(n, 0) + 1
        return st

    # ---- decisions ---------------------------------------------------------------------------------
    def decide(self, name: str, action: str, *, label: str | None = None, current: str | None = None, expected_version: int | None = None, labels: list[str] | None = None) -> dict[str, Any]:
        """Record a decision about image `name` (relative to the root): keep, relabel (to `label`) or delete.

        `current` is its label as the reviewer saw it; `expected_version` the image's version as the
        reviewer saw it (None: do not check); `labels` the labels a relabel may use. Returns the journal
        line, with the image's new `version`. Raises ReviewConflict on a stale version.
        """
        if action not in ACTIONS:
            raise ReviewError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}.")
        if action == "relabel":
            if not label:
                raise ReviewError("relabel needs the new label.")
            if labels is not None and label not in labels:
                raise ReviewError(f"label {label!r} is not a class of this dataset ({', '.join(labels)}). Pick one of them.")
        elif label is not None and action != "relabel":
            label = None
        if not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
            raise ReviewError(f"image name {name!r} is not a path inside the dataset.")
        with self.locked():
            st = self.state()
            version = st.versions.get(name, 0)
            if expected_version is not None and expected_version != version:
                raise ReviewConflict(f"{name} changed since this page loaded it (version {version}, page had {expected_version}). Reload to see the latest decision, then decide again.")
            return self.log.append("decide", name=name, action=action, label=label, **{"from": current}, version=version + 1)

    def undo(self) -> dict[str, Any]:
        """Take back the most recent pending decision; returns the undo line (with `name` and `version`)."""
        with self.locked():
            st = self.state()
            last = st.last()
            if last is None:
                raise ReviewError("nothing to undo: there is no pending decision. (`ursa review DATA --undo` undoes an applied review.)")
            name = last["name"]
            return self.log.append("undo", undoes=last["seq"], name=name, version=st.versions.get(name, 0) + 1)

    # ---- apply / undo ------------------------------------------------------------------------------
    def apply(self) -> dict[str, Any]:
        """Apply every pending decision (see the module docstring). Returns the journal's apply line.

        An apply that was interrupted (killed between its plan and its "applied" line) is finished first;
        with no decision pending since, its line is returned, marked `"resumed": True`; otherwise the new
        apply's line is returned with `"finished"`: the id of the apply that was finished first.
        """
        with self.locked(), dataset_lock(self.root, "review --apply", error=ReviewError):
            st = self.state()
            resumed = None
            if st.unfinished is not None:
                resumed = self._finish(st.unfinished)
                st = self.state()
            decisions = st.decisions()
            if not decisions:
                if resumed is not None:
                    return {**resumed, "resumed": True}
                raise ReviewError("nothing to apply: no pending decisions. Review images first (`ursa review DATA --run RUN`).")
            labels = dataset_labels(self.root)
            gone = sorted(n for n in decisions if n not in labels)
            if gone:
                raise ReviewError(f"{len(gone)} reviewed images are no longer in the dataset: {', '.join(gone[:5])}. Put them back, or undo those decisions.")
            apply_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{st.seq + 1}"
            moves = []
            for name, d in sorted(decisions.items()):
                if d["action"] == "relabel":
                    labels[name] = d["label"]
                elif d["action"] == "delete":
                    del labels[name]
                    dst = QUARANTINE_DIR / name
                    if (self.root / dst).exists():
                        dst = QUARANTINE_DIR / f"{name}.{apply_id}"
                    moves.append({"name": name, "to": dst.as_posix(), "sha256": sha256_file(self.root / name)})
            backup = _backup_cleaned(self.root, apply_id)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["name", "label"])
            w.writerows(sorted(labels.items()))
            data = buf.getvalue().encode("utf-8")
            # The new cleaned.csv waits beside the journal until the moves are made, so a killed apply can be finished.
            staged = (REVIEW_DIR / f"cleaned-{apply_id}.staged.csv").as_posix()
            atomic_write_bytes(self.root / staged, data)
            if backup is not None:
                shutil.copymode(self.root / backup, self.root / staged)  # the new cleaned.csv keeps the old one's mode
            line = self.log.append(  # the plan is on disk before anything moves
                "apply", id=apply_id,
                decisions=[d["seq"] for d in decisions.values()],
                moves=moves,
                csv={"path": CLEANED_CSV, "backup": backup, "sha256": hashlib.sha256(data).hexdigest(), "staged": staged},
                counts={a: sum(1 for d in decisions.values() if d["action"] == a) for a in ACTIONS},
                n_images=len(labels),
            )  # fmt: skip
            out = self._finish(line)
            return {**out, "finished": resumed["id"]} if resumed is not None else out

    def _finish(self, line: dict[str, Any]) -> dict[str, Any]:
        """Make the moves of apply `line` not made yet, put its staged cleaned.csv in place, and write its
        "applied" line. Idempotent: a killed run of this is finished by the next. Every file is checked
        (by presence and sha256) before anything moves; a file that is not where and what the plan says
        stops it with nothing changed. An OSError while moving rolls the whole apply back."""
        todo = []
        for mv in line["moves"]:
            src, dst = self.root / mv["name"], self.root / mv["to"]
            if dst.is_file() and not src.exists():
                if sha256_file(dst) != mv["sha256"]:
                    raise ReviewError(f"{dst} was changed after it was quarantined by the interrupted apply {line['id']}; restore it by hand to {src}. Nothing was changed.")
            elif src.is_file() and not dst.exists():
                if sha256_file(src) != mv["sha256"]:
                    raise ReviewError(f"{src} changed after the apply {line['id']} was planned, so it is not moved unseen. Undo that apply (`ursa review DATA --undo`) and decide again. Nothing was changed.")
                todo.append(mv)
            else:
                raise ReviewError(f"cannot finish the interrupted apply {line['id']}: {mv['name']} should be at {src} or {dst} (only one of them). Put it back, or undo that apply (`ursa review DATA --undo`). Nothing was changed.")
        csv_path, staged = self.root / line["csv"]["path"], self.root / line["csv"]["staged"]
        if staged.is_file():
            if sha256_file(staged) != line["csv"]["sha256"]:
                raise ReviewError(f"{staged} (the cleaned.csv staged by apply {line['id']}) was changed. Undo that apply (`ursa review DATA --undo`) and apply again. Nothing was changed.")
        elif not (csv_path.is_file() and sha256_file(csv_path) == line["csv"]["sha256"]):
            raise ReviewError(f"cannot finish the interrupted apply {line['id']}: its staged cleaned.csv {staged} is gone. Undo that apply (`ursa review DATA --undo`) and apply again. Nothing was changed.")
        try:
            for mv in todo:
                dst = self.root / mv["to"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.root / mv["name"], dst)
            if staged.is_file():
                os.replace(staged, csv_path)
        except OSError as exc:
            self._roll_back(line, reason=str(exc))
            raise ReviewError(f"applying failed and was rolled back: {exc}. Check the dataset folder is writable, then apply again.") from None
        self.log.append("applied", id=line["id"])
        return line

    def _roll_back(self, line: dict[str, Any], *, reason: str) -> None:
        """Move back every file apply `line` moved, put cleaned.csv back, and write a "rollback" line."""
        for mv in reversed(line["moves"]):
            src, dst = self.root / mv["name"], self.root / mv["to"]
            if dst.is_file() and not src.exists():
                os.replace(dst, src)
        csv_path, backup = self.root / line["csv"]["path"], line["csv"]["backup"]
        if csv_path.is_file() and sha256_file(csv_path) == line["csv"]["sha256"]:  # the new one got in place
            if backup is not None:
                atomic_write_bytes(csv_path, (self.root / backup).read_bytes())
                shutil.copystat(self.root / backup, csv_path)
            else:
                os.replace(csv_path, self.root / line["csv"]["staged"])  # back to where it waited; nothing is deleted
        self.log.append("rollback", id=line["id"], reason=reason)

    def undo_apply(self) -> dict[str, Any]:
        """Undo the most recent apply: move quarantined files back, put cleaned.csv back as it was.

        Also undoes an apply that was interrupted before it finished (only the files it moved go back).
        Checks every file first; if one cannot be restored safely nothing is changed. Returns the
        apply line that was undone. Its decisions become pending again.
        """
        with self.locked(), dataset_lock(self.root, "review --undo", error=ReviewError):
            st = self.state()
            if not st.applies:
                raise ReviewError(f"nothing to undo: {self.root} has no applied review in {self.journal}.")
            line, _ = st.applies[-1]
            unfinished = st.unfinished is not None and st.unfinished["id"] == line["id"]
            todo = []
            for mv in line["moves"]:
                src, dst = self.root / mv["name"], self.root / mv["to"]
                if dst.is_file() and not src.exists():
                    if sha256_file(dst) != mv["sha256"]:
                        raise ReviewError(f"{dst} was changed after it was quarantined; restore it by hand to {src}. Nothing was undone.")
                    todo.append((dst, src))
                elif src.is_file() and ((unfinished and not dst.exists()) or sha256_file(src) == mv["sha256"]):
                    continue  # never moved (an interrupted apply) or already back (an interrupted undo)
                else:
                    raise ReviewError(f"cannot restore {mv['name']}: expected it at {dst}. Nothing was undone.")
            csv_path = self.root / line["csv"]["path"]
            for dst, src in todo:
                src.parent.mkdir(parents=True, exist_ok=True)
                os.replace(dst, src)
            if csv_path.exists():  # set aside, never deleted
                aside = self.dir / "backups" / f"cleaned-undone-{line['id']}-{int(time.time())}.csv"
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(csv_path, aside)
            if line["csv"]["backup"]:
                backup = self.root / line["csv"]["backup"]
                atomic_write_bytes(csv_path, backup.read_bytes())
                shutil.copystat(backup, csv_path)
            self.log.append("unapply", id=line["id"], restored=[mv["name"] for mv in line["moves"]])
            return line


def _backup_cleaned(root: Path, tag: str) -> str | None:
    """Copy `root/cleaned.csv` (when there is one) to `.ursa/review/backups/cleaned-<tag>.csv`; its name
    relative to the root, or None."""
    csv_path = root / CLEANED_CSV
    if not csv_path.exists():
        return None
    backup = (REVIEW_DIR / "backups" / f"cleaned-{tag}.csv").as_posix()
    (root / backup).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(csv_path, root / backup)
    return backup


def check_class_change(root: str | Path, cls: str, *, what: str = "change") -> None:
    """Raise ReviewError when pending review decisions name images of class `cls` (files under `cls/`, or a
    relabel to `cls`): removing or renaming the class would leave them pointing nowhere. `what` ("remove",
    "rename") words the message."""
    st = Review(root).state()
    named = sorted(n for n, d in st.decisions().items() if n.startswith(f"{cls}/") or (d.get("action") == "relabel" and d.get("label") == cls))
    if named:
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        raise ReviewError(f"cannot {what} class {cls!r}: {len(named)} pending review decisions name its images ({shown}). Apply or undo them first.")


def update_cleaned(root: str | Path, *, add: Any = (), drop: Any = (), drop_class: str | None = None, rename_class: tuple[str, str] | None = None) -> dict[str, Any] | None:
    """Keep `root/cleaned.csv` in step with a change the studio made to the class folders.

    `add`: (name, label) rows to append (names relative to the root; a name already listed is left as it
    is); `drop`: names whose rows are removed (an image taken out again); `drop_class`: remove the rows of a removed class (names under `<class>/`, and rows labelled with
    it); `rename_class` (old, new): rename a class's rows (the `old/` name prefix and the label). Other
    columns of the CSV are kept. Refuses (ReviewError) when pending review decisions name images of the
    class dropped or renamed (see `check_class_change`), also when there is no cleaned.csv. Returns None
    when there is no cleaned.csv, else the journal line (op "cleaned": `added`, `dropped` rows,
    `renamed` count, `backup`, `sha256` of the new file); the old file is first copied to
    `.ursa/review/backups/` as `apply` does, and the new one written atomically.
    """
    root = Path(root)
    review = Review(root)
    with review.locked():
        for cls, what in ((drop_class, "remove"), (rename_class[0] if rename_class else None, "rename")):
            if cls is not None:
                check_class_change(root, cls, what=what)
        csv_path = root / CLEANED_CSV
        if not csv_path.is_file():
            return None
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:
                table = [r for r in csv.reader(fh)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ReviewError(f"cannot read {csv_path} ({exc}). Fix it (columns name,label) or move it away, then try again.") from None
        header = table[0] if table else ["name", "label"]
        cols = [h.strip().lower() for h in header]
        if "name" not in cols or "label" not in cols:
            raise ReviewError(f"{csv_path} has columns {header}; it needs name and label. Fix its header, then try again.")
        ni, li = cols.index("name"), cols.index("label")
        rows = [r + [""] * (len(header) - len(r)) for r in table[1:] if any(c.strip() for c in r)]
        dropped: list[list[str]] = []
        renamed = 0
        gone = set(drop)
        if gone:
            dropped += [[r[ni], r[li]] for r in rows if r[ni] in gone]
            rows = [r for r in rows if r[ni] not in gone]
        if drop_class is not None:
            keep = []
            for r in rows:
                if r[ni].startswith(f"{drop_class}/") or r[li] == drop_class:
                    dropped.append([r[ni], r[li]])
                else:
                    keep.append(r)
            rows = keep
        if rename_class is not None:
            old, new = rename_class
            for r in rows:
                hit = False
                if r[ni].startswith(f"{old}/"):
                    r[ni], hit = f"{new}/{r[ni][len(old) + 1 :]}", True
                if r[li] == old:
                    r[li], hit = new, True
                renamed += hit
        listed = {r[ni] for r in rows}
        added = []
        for name, label in add:
            if name not in listed:
                listed.add(name)
                row = [""] * len(header)
                row[ni], row[li] = name, label
                rows.append(row)
                added.append([name, label])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        data = buf.getvalue().encode("utf-8")
        st = review.state()
        tag = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{st.seq + 1}"
        backup = _backup_cleaned(root, tag)
        line = review.log.append("cleaned", added=added, dropped=dropped, renamed=renamed, rename=list(rename_class) if rename_class else None,
                                 drop_class=drop_class, backup=backup, sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
        atomic_write_bytes(csv_path, data)
        return line


def apply_decisions(root: str | Path) -> dict[str, Any]:
    """Apply the pending review decisions of dataset `root`; see `Review.apply`."""
    return Review(root).apply()


def undo_apply(root: str | Path) -> dict[str, Any]:
    """Undo the last applied review of dataset `root`; see `Review.undo_apply`."""
    return Review(root).undo_apply()


# ---- labelling images of an unlabelled pool (`ursa review DATA --run RUN --pool DIR`) ----------------


@dataclass
class PoolStatus:
    """Where one pool image stands: "open", "labelled" (copied into the dataset as `name` with `label`) or "skipped"."""

    status: str = "open"
    name: str | None = None  # the copy's name relative to the dataset root
    label: str | None = None
    seq: int = 0  # the journal line that set this status


def pool_status(root: str | Path) -> dict[str, PoolStatus]:
    """Absolute pool path -> its status, folded from the journal's pool lines (op pool_label, pool_skip,
    pool_undo); a pool image with no line is "open" (not listed)."""
    out: dict[str, PoolStatus] = {}
    for ln in Review(root).lines():
        op, src = ln.get("op"), ln.get("source")
        if not isinstance(src, str):
            continue
        if op == "pool_label":
            out[src] = PoolStatus("labelled", ln.get("name"), ln.get("label"), int(ln.get("seq", 0)))
        elif op == "pool_skip":
            out[src] = PoolStatus("skipped", seq=int(ln.get("seq", 0)))
        elif op == "pool_undo":
            out[src] = PoolStatus("open", seq=int(ln.get("seq", 0)))
    return out


def _safe_stem(stem: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40].strip("_")
    return keep or "image"


def _class_folder(root: Path, label: str) -> Path:
    """The folder a new image of class `label` goes in: `<root>/<label>`, or `<root>/<train>/<label>` when
    the dataset is laid out as train/ and valid/ folders."""
    from ursa.data.items import find_split_folders

    folders = find_split_folders(root)
    return root / folders[0] / label if folders else root / label


def label_from_pool(root: str | Path, source: str | Path, label: str, *, labels: list[str]) -> dict[str, Any]:
    """Copy pool image `source` into class `label` of dataset `root` under a name Ursa makes
    (`<class>/pool-<stem>-<sha256[:8]><suffix>`), then write the journal line (op pool_label: source, name,
    label, sha256) and add the row to cleaned.csv when there is one. The pool file is never moved or
    changed; the copy is written under a hidden name and renamed, so it appears whole or not at all.
    `labels` are the classes allowed. ReviewError when the label is not a class, the file is gone, or
    the image is labelled already (undo first)."""
    root, src = Path(root), Path(source)
    if label not in labels:
        raise ReviewError(f"label {label!r} is not a class of this dataset ({', '.join(labels)}). Pick one of them.")
    if not src.is_file():
        raise ReviewError(f"{src} is not there any more; it cannot be labelled. Run `ursa next` again for a fresh selection.")
    review = Review(root)
    with review.locked(), dataset_lock(root, "label from the pool", error=ReviewError):
        now = pool_status(root).get(str(src))
        if now is not None and now.status == "labelled":
            raise ReviewError(f"{src.name} is labelled already ({now.label}, copied to {now.name}). Undo that first to label it again.")
        digest = sha256_file(src)
        folder = _class_folder(root, label)
        folder.mkdir(parents=True, exist_ok=True)
        base = f"pool-{_safe_stem(src.stem)}-{digest[:8]}"
        dst, k = folder / f"{base}{src.suffix.lower()}", 2
        while dst.exists():
            dst, k = folder / f"{base}-{k}{src.suffix.lower()}", k + 1
        tmp = folder / f".{dst.name}.copying"
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
        name = dst.relative_to(root).as_posix()
        line = review.log.append("pool_label", source=str(src), name=name, label=label, sha256=digest)
        update_cleaned(root, add=[(name, label)])
        return line


def skip_pool_image(root: str | Path, source: str | Path) -> dict[str, Any]:
    """Record that pool image `source` was looked at and left out (op pool_skip); nothing is copied."""
    review = Review(root)
    with review.locked():
        now = pool_status(root).get(str(source))
        if now is not None and now.status == "labelled":
            raise ReviewError(f"{Path(source).name} is labelled already ({now.label}). Undo that first to skip it.")
        return review.log.append("pool_skip", source=str(source))


def undo_pool_image(root: str | Path, source: str | Path) -> dict[str, Any]:
    """Take back the labelling (or skip) of pool image `source`: its copy in the dataset is moved to the
    quarantine (nothing is deleted) and its cleaned.csv row removed; then the journal line (op pool_undo,
    with `to` for a moved copy). ReviewError when there is nothing to undo."""
    root = Path(root)
    review = Review(root)
    with review.locked(), dataset_lock(root, "undo a pool label", error=ReviewError):
        now = pool_status(root).get(str(source))
        if now is None or now.status == "open":
            raise ReviewError(f"nothing to undo for {Path(source).name}: it is neither labelled nor skipped.")
        to = None
        if now.status == "labelled" and now.name:
            copy = root / now.name
            if copy.is_file():
                dst = QUARANTINE_DIR / now.name
                if (root / dst).exists():
                    dst = QUARANTINE_DIR / f"{now.name}.{now.seq}-{int(time.time())}"
                (root / dst).parent.mkdir(parents=True, exist_ok=True)
                os.replace(copy, root / dst)
                to = dst.as_posix()
            update_cleaned(root, drop=[now.name])
        return review.log.append("pool_undo", source=str(source), name=now.name, label=now.label, to=to, undoes=now.seq)
