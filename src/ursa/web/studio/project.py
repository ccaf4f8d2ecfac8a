"""The studio's project folder: a dataset root with one folder per class, plus runs/ and models/.

```
PATH/<class>/*.jpg             one folder per class (a train/valid layout is refused: use the CLI)
PATH/cleaned.csv               after "Apply fixes" (ursa.review writes it; kept in step by update_cleaned)
PATH/runs/<name>/              training runs (train_run's folders)
PATH/models/<name>/            exports, one per run, named as the run
PATH/runs/.ursa-outputs        markers: the class listing skips runs/ and models/ (ursa.data.items.OUTPUT_MARKER)
PATH/.ursa/...                 manifest, journal, quarantine, caches, the studio's job table
```

Every change to the class folders is a journal line (`ursa.journal`: ops "add_class", "rename_class",
"remove_class", "restore_class"), written before the change. Removing a class moves its folder to
`.ursa/quarantine/classes/<stamp>/<name>` (nothing is deleted) and can be undone with `restore_class`.
Class operations hold the journal's lock and the dataset lock (`ursa._io.dataset_lock`), so they never run
while a download or verify writes into the folder, or while a review is being applied.

Listing is cheap enough to poll: the scan (`ursa.data.items.scan_class_folders`) is redone only when a
class folder's modification time changes, and file hashes (for the duplicate warning) are cached by
(path, size, mtime).
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ursa._io import atomic_write_bytes, dataset_lock, sha256_file
from ursa.collect.local import SOURCES, Added
from ursa.collect.local import add_images as _add_images
from ursa.data.items import (
    OUTPUT_MARKER,
    TRAIN_NAMES,
    VALID_NAMES,
    find_split_folders,
    inside_root,
    scan_class_folders,
)
from ursa.errors import BadImageError, CollectError, ReviewError, StudioError
from ursa.imageio import NON_IMAGE_SUFFIXES, decode_image
from ursa.journal import Journal
from ursa.review import CLEANED_CSV, check_class_change, update_cleaned

__all__ = ["IMBALANCE", "MIN_IMAGES", "RESERVED", "Conflict", "Forbidden", "NotFound", "Project"]

RESERVED = ("runs", "models")  # top-level folders of outputs, never classes
MIN_IMAGES = 10  # a class with fewer gets a warning
IMBALANCE = 5  # a class this many times smaller than the biggest gets a warning
MAX_NAME = 64  # longest class name, in characters
THUMBS = 8  # newest images shown per class
_THUMB_CACHE = 512  # thumbnails kept in memory (about 5 KB each at 160 px)
REMOVED_DIR = Path(".ursa") / "quarantine" / "classes"  # removed classes: <stamp>/<name>/


class NotFound(StudioError):
    """A class, image, run or job that does not exist (HTTP 404)."""


class Conflict(StudioError):
    """The request clashes with the project's state: a class that exists already, a job already finished (HTTP 409)."""


class Forbidden(StudioError):
    """A path that exists but is not the studio's to serve: outside the class folders and the quarantine (HTTP 403)."""


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


class Project:
    """One project folder (see the module docstring); safe to share between threads.

    `create`: make `root` (and runs/, models/ with their markers) when missing; with False a missing root
    is NotFound. A train/valid layout, or a runs/ or models/ folder that holds images, is a StudioError.
    """

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            if not create:
                raise NotFound(f"project folder {root} does not exist. Pass an existing folder, or let the studio create it.")
            try:
                root.mkdir(parents=True)
            except OSError as exc:
                raise StudioError(f"cannot create the project folder {root}: {exc.strerror or exc}. Choose a folder you can write to.") from None
        if not root.is_dir():
            raise StudioError(f"{root} is a file, not a folder. Pass a folder (one sub-folder per class).")
        self.root = root.resolve()
        if find_split_folders(self.root):
            raise StudioError(f"{self.root} is laid out as train/ and valid/ folders; the studio works on one folder per class. Use the CLI for this dataset, or one folder per class.")
        for name in RESERVED:
            self._outputs_dir(name)
        try:
            (self.root / ".ursa").mkdir(exist_ok=True)  # the journal's, the locks' and the job table's home
        except OSError as exc:
            raise StudioError(f"cannot create {self.root / '.ursa'}: {exc.strerror or exc}. Choose a project folder you can write to.") from None
        self.journal = Journal(self.root, error=StudioError)
        self._lock = threading.RLock()
        self._scan_key: Any = None
        self._scan: Any = None
        self._hashes: dict[str, tuple[int, int, str]] = {}  # rel -> (size, mtime_ns, sha256)
        self._thumbs: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._journal_key: Any = None
        self._cleaned_key: Any = None
        self._cleaned: set[str] = set()
        self._journal_fold: tuple[dict[str, int], dict[str, dict[str, Any]]] = ({}, {})

    def _outputs_dir(self, name: str) -> Path:
        """Make `root/name/` with its marker; refuse a folder of that name that holds a class's images."""
        d = self.root / name
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise StudioError(f"{d} is not a folder; the studio keeps its {name} there. Move it away, then start the studio again.")
        if d.is_dir() and not (d / OUTPUT_MARKER).is_file():
            images = [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NON_IMAGE_SUFFIXES]
            if images:
                raise StudioError(f"{d} holds images ({images[0].name}, ...), but the studio keeps its {name} there. Rename that class folder (e.g. {name}-class), then start the studio again.")
        try:
            d.mkdir(exist_ok=True)
            if not (d / OUTPUT_MARKER).is_file():
                atomic_write_bytes(d / OUTPUT_MARKER, b"Ursa keeps outputs here (not a class folder); see ursa.data.items.OUTPUT_MARKER.\n")
        except OSError as exc:
            raise StudioError(f"cannot create {d}: {exc.strerror or exc}. Choose a project folder you can write to.") from None
        return d

    # ---- names -------------------------------------------------------------------------------------
    def check_class_name(self, name: str) -> str:
        """`name` when it is a class name the studio accepts, else StudioError saying why and what to use."""
        hint = "Use a short plain name such as 'grizzly' or 'teddy bear'."
        if not isinstance(name, str) or not name:
            raise StudioError(f"a class needs a name. {hint}")
        if len(name) > MAX_NAME:
            raise StudioError(f"class name {name[:20]!r}... is {len(name)} characters long; the limit is {MAX_NAME}. {hint}")
        if any(c in name for c in "/\\\0") or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
            raise StudioError(f"class name {name!r} has a slash, a backslash or a control character; it must be one folder name. {hint}")
        if name != name.strip():
            raise StudioError(f"class name {name!r} starts or ends with a space. {hint}")
        if name.startswith(".") or name in (".", ".."):
            raise StudioError(f"class name {name!r} starts with '.', which hides the folder. {hint}")
        low = name.casefold()
        if low in RESERVED:
            raise StudioError(f"{name!r} is where the studio keeps its {low}; it cannot be a class. {hint}")
        if low in TRAIN_NAMES or low in VALID_NAMES:
            raise StudioError(f"{name!r} names a train/valid split folder, not a class. {hint}")
        if name == "__pycache__":
            raise StudioError(f"{name!r} is a folder Ursa ignores. {hint}")
        return name

    def _class_dir(self, name: str) -> Path:
        """root/name for an existing class, else NotFound (StudioError for a bad name)."""
        d = self.root / self.check_class_name(name)
        if not d.is_dir() or d.is_symlink():
            raise NotFound(f"there is no class {name!r}. Classes: {', '.join(self._class_names()) or 'none yet'}.")
        return d

    def _class_names(self) -> list[str]:
        return [c["name"] for c in self.classes()]

    # ---- listing -----------------------------------------------------------------------------------
    def _listing(self) -> Any:
        """scan_class_folders(root), redone only when the root or a class folder (or a folder below one) changed."""
        key = []
        for dirpath, dirnames, _ in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            top = rel.split(os.sep, 1)[0]
            if rel == ".":
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in RESERVED]
            elif top.startswith(".") or top in RESERVED:
                dirnames[:] = []
                continue
            try:
                key.append((rel, os.stat(dirpath).st_mtime_ns))
            except OSError:
                continue
        key_t = tuple(key)
        with self._lock:
            if key_t != self._scan_key:
                self._scan = scan_class_folders(self.root)
                self._scan_key = key_t
            return self._scan

    def _sha(self, rel: str) -> str | None:
        path = self.root / rel
        try:
            st = path.stat()
        except OSError:
            return None
        hit = self._hashes.get(rel)
        if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
            return hit[2]
        try:
            digest = sha256_file(path)
        except OSError:
            return None
        self._hashes[rel] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def _journal_state(self) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
        """(class -> files verify quarantined as unreadable that are still in the quarantine, class -> its latest
        removal line not restored since), folded from the journal; refolded only when the journal changed."""
        path = self.journal.path
        try:
            st = path.stat()
            key: Any = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        with self._lock:
            if key != self._journal_key or key is None:
                quarantined: dict[str, int] = {}
                removed: dict[str, dict[str, Any]] = {}
                for ln in self.journal.lines() if key is not None else []:
                    op = ln.get("op")
                    if op == "quarantine" and isinstance(ln.get("file"), str) and "/" in ln["file"] and isinstance(ln.get("to"), str):
                        if (self.root / ln["to"]).is_file():
                            cls = ln["file"].split("/", 1)[0]
                            quarantined[cls] = quarantined.get(cls, 0) + 1
                    elif op == "remove_class" and isinstance(ln.get("name"), str):
                        removed[ln["name"]] = ln
                    elif op == "restore_class":
                        removed.pop(ln.get("name"), None)
                self._journal_fold, self._journal_key = (quarantined, removed), key
            return self._journal_fold

    def classes(self) -> list[dict[str, Any]]:
        """[{"name", "count", "warnings": [str], "thumbs": [relative names, <= 8, newest first]}], by name.

        Warnings: fewer than MIN_IMAGES images; IMBALANCE times fewer than the biggest class; exact
        duplicates (a copy of an image elsewhere in the project; the first copy by name is not counted);
        files verify quarantined as unreadable."""
        with self._lock:
            found = self._listing()
            names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name != "__pycache__" and not (p / OUTPUT_MARKER).is_file())
            per: dict[str, list[str]] = {n: [] for n in names}
            for it in found.items:
                per.setdefault(it.label, []).append(it.name)
            groups: dict[str, list[str]] = {}
            for it in sorted(found.items):
                digest = self._sha(it.name)
                if digest is not None:
                    groups.setdefault(digest, []).append(it.name)
            dup: dict[str, int] = {}
            for members in groups.values():
                for rel in members[1:]:
                    cls = rel.split("/", 1)[0]
                    dup[cls] = dup.get(cls, 0) + 1
            quarantined = self._journal_state()[0]
            biggest = max(per.items(), key=lambda kv: (len(kv[1]), kv[0]), default=("", []))
            out = []
            for name, files in sorted(per.items()):
                n = len(files)
                warnings = []
                if n < MIN_IMAGES:
                    warnings.append(f"only {n} images ({MIN_IMAGES} or more recommended)")
                if biggest[0] != name and len(biggest[1]) >= IMBALANCE * max(n, 1) and len(biggest[1]) > 0:
                    ratio = len(biggest[1]) // max(n, 1)
                    warnings.append(f"{ratio}x fewer images than {biggest[0]} ({n} vs {len(biggest[1])})")
                if dup.get(name):
                    warnings.append(f"{dup[name]} exact duplicates")
                if quarantined.get(name):
                    warnings.append(f"{quarantined[name]} unreadable files in quarantine")
                newest = sorted(files, key=lambda rel: (self._mtime(rel), rel), reverse=True)[:THUMBS]
                out.append({"name": name, "count": n, "warnings": warnings, "thumbs": newest})
            return out

    def _mtime(self, rel: str) -> int:
        try:
            return (self.root / rel).stat().st_mtime_ns
        except OSError:
            return 0

    def _runs(self) -> list[dict[str, Any]]:
        """Finished runs (folders of runs/ with metrics.json), oldest first."""
        out = []
        runs = self.root / "runs"
        for d in runs.iterdir() if runs.is_dir() else []:
            m = d / "metrics.json"
            if d.name.startswith(".") or not d.is_dir() or not m.is_file():
                continue
            try:
                metrics = json.loads(m.read_text(encoding="utf-8"))
                mtime = m.stat().st_mtime
            except (OSError, ValueError):
                continue
            out.append({
                "name": d.name,
                "error_rate": metrics.get("error_rate"),
                "accuracy": metrics.get("accuracy"),
                "created": datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"),
                "exported": (self.root / "models" / d.name / "model.json").is_file(),
                "_t": mtime,
            })  # fmt: skip
        out.sort(key=lambda r: (r["_t"], r["name"]))
        for r in out:
            del r["_t"]
        return out

    def _removed(self) -> list[dict[str, Any]]:
        """Removed classes that can be restored: [{"name", "at", "seq"}], the latest removal of each name."""
        out = []
        for name, ln in self._journal_state()[1].items():
            if (self.root / ln["to"]).is_dir() and not (self.root / name).exists():
                out.append({"name": name, "at": ln["at"], "seq": ln["seq"]})
        return sorted(out, key=lambda r: r["seq"])

    def summary(self) -> dict[str, Any]:
        """{"root", "classes", "removed", "runs", "latest_run", "cleaned_csv", "warnings"}: the project in one answer."""
        classes = self.classes()
        runs = self._runs()
        warnings = []
        ready = [c for c in classes if c["count"] >= 2]
        if len(ready) < 2:
            warnings.append("add at least 2 classes with 2 or more images each, then train")
        scan = self._scan  # the listing classes() has just made
        skipped = scan.skipped if scan is not None else []
        if skipped:
            warnings.append(f"{len(skipped)} files in the class folders are not usable images (e.g. {skipped[0].name}: {skipped[0].reason})")
        listed = self._cleaned_names()
        if listed is not None and scan is not None:
            outside = sorted(it.name for it in scan.items if it.name not in listed)
            if outside:
                warnings.append(f"{len(outside)} images in the class folders are not in cleaned.csv (e.g. {outside[0]}), so training leaves them out. "
                                "Add them with `ursa review`, or move cleaned.csv away to train on the class folders.")  # fmt: skip
        return {
            "root": str(self.root),
            "classes": classes,
            "removed": self._removed(),
            "runs": runs,
            "latest_run": runs[-1]["name"] if runs else None,
            "cleaned_csv": (self.root / CLEANED_CSV).is_file(),
            "warnings": warnings,
        }

    def _cleaned_names(self) -> set[str] | None:
        """The names cleaned.csv lists (None without one), re-read only when it changed."""
        path = self.root / CLEANED_CSV
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key != self._cleaned_key:
                try:
                    with open(path, newline="", encoding="utf-8-sig") as fh:
                        rows = list(csv.reader(fh))
                except (OSError, UnicodeDecodeError, csv.Error):
                    return None  # training will say what is wrong with it
                cols = [h.strip().lower() for h in rows[0]] if rows else []
                i = cols.index("name") if "name" in cols else 0
                self._cleaned, self._cleaned_key = {r[i].strip() for r in rows[1:] if len(r) > i}, key
            return self._cleaned

    def _class_info(self, name: str) -> dict[str, Any]:
        for c in self.classes():
            if c["name"] == name:
                return c
        return {"name": name, "count": 0, "warnings": [], "thumbs": []}

    # ---- class operations --------------------------------------------------------------------------
    def _changing(self, what: str) -> Any:
        """The locks held while a class folder changes: the journal's (threads and processes), then the dataset
        lock (no download, verify or review apply at the same time), in the order review's apply takes them."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(self.journal.locked())
        try:
            stack.enter_context(dataset_lock(self.root, what, error=Conflict))
        except BaseException:
            stack.close()
            raise
        return stack

    def add_class(self, name: str) -> dict[str, Any]:
        """Make the folder of a new class; Conflict when it exists (as a class, a removed-and-kept file, anything)."""
        name = self.check_class_name(name)
        d = self.root / name
        with self._changing(f"add class {name}"):
            if d.exists() or d.is_symlink() or any(p.name.casefold() == name.casefold() for p in self.root.iterdir()):
                raise Conflict(f"class {name!r} already exists (or a file of that name does). Choose another name.")
            self.journal.append("add_class", name=name)
            try:
                d.mkdir()
            except OSError as exc:
                raise StudioError(f"cannot create {d}: {exc.strerror or exc}. Check that {self.root} is writable.") from None
        return self._class_info(name)

    def rename_class(self, name: str, to: str) -> dict[str, Any]:
        """Rename class `name` to `to` (its folder, and its rows in cleaned.csv). NotFound / Conflict / StudioError."""
        src = self._class_dir(name)
        to = self.check_class_name(to)
        dst = self.root / to
        with self._changing(f"rename class {name}"):
            if to == name:
                raise Conflict(f"class {name!r} already has that name.")
            if dst.exists() or dst.is_symlink() or (to.casefold() != name.casefold() and any(p.name.casefold() == to.casefold() for p in self.root.iterdir())):
                raise Conflict(f"class {to!r} already exists. Choose another name, or move the images into it.")
            try:
                check_class_change(self.root, name, what="rename")
            except ReviewError as exc:
                raise Conflict(str(exc)) from None
            self.journal.append("rename_class", name=name, to=to)
            try:
                os.rename(src, dst)
            except OSError as exc:
                raise StudioError(f"cannot rename {src} to {dst}: {exc.strerror or exc}.") from None
            self._update_cleaned(rename_class=(name, to))
        return self._class_info(to)

    def remove_class(self, name: str) -> dict[str, Any]:
        """Move class `name` to `.ursa/quarantine/classes/<stamp>/<name>` (undo: `restore_class`); drops its rows
        from cleaned.csv. Returns {"removed": name, "to": where, "count": images moved}."""
        src = self._class_dir(name)
        with self._changing(f"remove class {name}"):
            try:
                check_class_change(self.root, name, what="remove")
            except ReviewError as exc:
                raise Conflict(str(exc)) from None
            count = sum(1 for it in self._listing().items if it.label == name)
            to = (REMOVED_DIR / _stamp() / name).as_posix()
            self.journal.append("remove_class", name=name, to=to, count=count)
            try:
                (self.root / to).parent.mkdir(parents=True, exist_ok=True)
                os.rename(src, self.root / to)
            except OSError as exc:
                raise StudioError(f"cannot move {src} to {self.root / to}: {exc.strerror or exc}.") from None
            self._update_cleaned(drop_class=name)
        return {"removed": name, "to": to, "count": count}

    def restore_class(self, name: str) -> dict[str, Any]:
        """Undo the latest removal of class `name` (its folder and cleaned.csv rows come back). NotFound when
        nothing of that name was removed; Conflict when a class of that name exists again."""
        name = self.check_class_name(name)
        with self._changing(f"restore class {name}"):
            lines = self.journal.lines()
            removal, cleaned = None, None
            for ln in lines:
                op = ln.get("op")
                if op == "remove_class" and ln.get("name") == name:
                    removal, cleaned = ln, None
                elif op == "restore_class" and ln.get("name") == name:
                    removal, cleaned = None, None
                elif op == "cleaned" and removal is not None and ln.get("drop_class") == name and ln.get("seq", 0) > removal["seq"]:
                    cleaned = cleaned or ln
            if removal is None or not (self.root / removal["to"]).is_dir():
                raise NotFound(f"no removed class {name!r} to restore.")
            dst = self.root / name
            if dst.exists() or dst.is_symlink():
                raise Conflict(f"a class {name!r} exists again; rename it first, then restore the removed one.")
            self.journal.append("restore_class", name=name, **{"from": removal["to"]}, undoes=removal["seq"])
            try:
                os.rename(self.root / removal["to"], dst)
            except OSError as exc:
                raise StudioError(f"cannot move {removal['to']} back to {dst}: {exc.strerror or exc}.") from None
            if cleaned is not None and cleaned.get("dropped"):
                self._update_cleaned(add=[tuple(r) for r in cleaned["dropped"]])
        return self._class_info(name)

    def _update_cleaned(self, **change: Any) -> dict[str, Any] | None:
        try:
            return update_cleaned(self.root, **change)
        except ReviewError as exc:
            raise Conflict(str(exc)) from None
        except OSError as exc:
            raise StudioError(f"the class folders changed, but cleaned.csv could not be updated: {exc.strerror or exc}. Fix its permissions, then repeat the change.") from None

    # ---- images ------------------------------------------------------------------------------------
    def add_images(self, cls: str, files: Iterable[tuple[str, bytes]], *, source: str = "upload") -> list[Added]:
        """Store image bytes in class `cls` (see `ursa.collect.local.add_images`: each file "ok", "duplicate"
        or "refused" with a reason); the new files are appended to cleaned.csv when there is one."""
        folder = self._class_dir(cls)
        if source not in SOURCES:
            raise StudioError(f"source {source!r} is not one of {', '.join(SOURCES)}.")
        try:
            rows = _add_images(self.root, folder.name, files, source=source)
        except CollectError as exc:
            raise StudioError(str(exc)) from None
        new = [(r.file, folder.name) for r in rows if r.status == "ok"]
        if new:
            try:
                update_cleaned(self.root, add=new)
            except (ReviewError, OSError) as exc:
                raise StudioError(f"the images were stored, but cleaned.csv could not be updated ({exc}). Fix cleaned.csv, then add them again.") from None
        return rows

    def image_path(self, name: str) -> Path:
        """The file `name` (relative to the root, '/' separators) in a class folder or in `.ursa/quarantine/`.
        StudioError for a malformed name, Forbidden for a file elsewhere (the journal, runs, a symlink out),
        NotFound for a file that is not there."""
        if not isinstance(name, str) or not name or "\0" in name or "\\" in name or name.startswith("/") or len(name) > 1024:
            raise StudioError(f"image name {name!r} is not a path relative to the project folder.")
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise StudioError(f"image name {name!r} has an empty, '.' or '..' part.")
        path = self.root / name
        in_quarantine = parts[:2] == [".ursa", "quarantine"] and len(parts) > 2
        in_class = len(parts) > 1 and not parts[0].startswith(".") and parts[0] not in RESERVED and not any(p.startswith(".") for p in parts)
        if not (in_quarantine or in_class) or path.suffix.lower() in NON_IMAGE_SUFFIXES:
            raise Forbidden(f"{name} is not an image of this project's classes or quarantine.")
        if not inside_root(self.root, path):
            raise Forbidden(f"{name} leads outside the project folder.")
        if not path.is_file():
            raise NotFound(f"no image {name} in this project.")
        return path

    def thumbnail(self, name: str, side: int = 160) -> bytes:
        """A JPEG of image `name` at most `side` px on its longer side (16..512), upright; cached in memory by
        (name, mtime, side). StudioError (BadImage's message) for a file that does not decode."""
        if isinstance(side, bool) or not isinstance(side, int) or not 16 <= side <= 512:
            raise StudioError(f"thumbnail side must be a whole number from 16 to 512, got {side!r}.")
        path = self.image_path(name)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            raise NotFound(f"no image {name} in this project.") from None
        key = (name, mtime, side)
        with self._lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        try:
            im = decode_image(path, min_side=side)
        except BadImageError as exc:
            raise StudioError(f"{name} cannot be shown: {exc}") from None
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        data = buf.getvalue()
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    # ---- runs and exports --------------------------------------------------------------------------
    def _check_run_name(self, name: str) -> str:
        if not isinstance(name, str) or not name or len(name) > 128 or name.startswith(".") or any(c in name for c in "/\\\0") or any(unicodedata.category(c) == "Cc" for c in name):
            raise StudioError(f"{name!r} is not a run name (a folder name under runs/, such as 'run' or 'run-2').")
        return name

    def run_dir(self, name: str | None = None) -> Path:
        """runs/<name> (a finished run: it has metrics.json), or the latest finished run when `name` is None.
        NotFound when there is none."""
        if name is None:
            runs = self._runs()
            if not runs:
                raise NotFound("no trained model yet: add images to at least 2 classes, then train.")
            return self.root / "runs" / runs[-1]["name"]
        d = self.root / "runs" / self._check_run_name(name)
        if not d.is_dir() or d.is_symlink() or not (d / "metrics.json").is_file():
            raise NotFound(f"no finished run {name!r}. Runs: {', '.join(r['name'] for r in self._runs()) or 'none yet'}.")
        return d

    def export_dir(self, run_name: str) -> Path:
        """models/<run_name>: where the export of run `run_name` goes (it may not exist yet)."""
        return self.root / "models" / self._check_run_name(run_name)
