"""Turn a dataset root into labelled items: from class folders, from train/valid folders, or from a CSV.

An item is a path relative to the root (POSIX separators) and a label. Files that are not images are
skipped with a row saying why, never a crash.

The dataset root is a boundary: nothing outside it is ever read. A name from a CSV or split.json
that leaves the root (`..`, an absolute path elsewhere, a symlink pointing out) is refused before any
file is opened; when listing folders, directory symlinks are never followed (a link back to the root
would list every image again under a new class) and file symlinks that point outside the root or
nowhere are skipped, each with a row saying why.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from PIL import UnidentifiedImageError

from ursa.errors import BadImageError, DataError
from ursa.imageio import NON_IMAGE_SUFFIXES, open_checked

__all__ = [
    "Item",
    "Skipped",
    "ItemSet",
    "TRAIN_NAMES",
    "VALID_NAMES",
    "check_image",
    "scan_class_folders",
    "read_labels_csv",
    "find_split_folders",
    "folder_classes",
    "inside_root",
    "check_name",
    "OUTPUT_MARKER",
]

TRAIN_NAMES = ("train", "training")
VALID_NAMES = ("valid", "validation", "val")
# A top-level folder holding a file of this name holds outputs (the studio's runs/ and models/), not a class.
OUTPUT_MARKER = ".ursa-outputs"
# Files that live beside images and are never images; skipped silently.


@dataclass(frozen=True, order=True)
class Item:
    """One labelled image: `name` is relative to the dataset root, with '/' separators."""

    name: str
    label: str


@dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, and why."""

    name: str
    reason: str


@dataclass
class ItemSet:
    """Items read from a root; `skipped` lists the files that could not be used.

    `sides` maps a name to "train" or "valid" when the source says which (a labels CSV on a
    train/valid dataset, or with a `split` / `is_valid` column); empty when the split is left to chance.
    """

    items: list[Item] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    sides: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Sorted distinct labels."""
        return sorted({it.label for it in self.items})


def check_image(path: Path) -> str | None:
    """None when `path` opens as an image (header only, cheap), else the reason it does not.

    An image over the one pixel limit every stage uses (`ursa.imageio.MAX_PIXELS`) is refused here.
    """
    try:
        with open_checked(path) as im:
            im.size  # noqa: B018  (parsing the header is the check)
    except BadImageError as exc:
        return str(exc)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image: {type(exc).__name__}: {exc}".strip()
    return None


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__pycache__"


def inside_root(root_abs: Path, path: Path) -> bool:
    """True when `path`, with every symlink resolved, is `root_abs` (already resolved) or below it."""
    try:
        path.resolve().relative_to(root_abs)
    except (ValueError, OSError, RuntimeError):  # outside, or a symlink loop
        return False
    return True


def _link_reason(root_abs: Path, path: Path) -> str | None:
    """Why symlink `path` is left out of a listing, or None for a file symlink that stays inside the root."""
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return f"dangling symlink (its target {os.readlink(path)} does not exist)"
    except (OSError, RuntimeError):
        return "symlink loop (the link points back at itself)"
    if target.is_dir():
        if inside_root(root_abs, target):
            return f"symlink to a folder inside the dataset ({target}); not followed, so its images are not listed twice"
        return f"symlink to a folder outside the dataset root ({target}); copy the folder into the dataset to use it"
    if not inside_root(root_abs, target):
        return f"symlink to a file outside the dataset root ({target}); copy the file into the dataset to use it"
    return None


def _class_dirs(root: Path, top: Path, skipped: list[Skipped] | None = None) -> list[Path]:
    """The class folders directly under `top` (= `root[/sub]`): not hidden, not symlinks, not holding an
    `OUTPUT_MARKER` file (runs/ and models/ beside the classes). A folder symlink or a dangling one becomes
    a `skipped` row; file symlinks here are ignored like files."""
    root_abs = root.resolve()
    out = []
    for p in sorted(top.iterdir()):
        if _is_hidden(p.name):
            continue
        if p.is_symlink():
            if skipped is not None and not p.is_file():
                skipped.append(Skipped(p.relative_to(root).as_posix(), _link_reason(root_abs, p) or "symlink"))
            continue
        if p.is_dir() and not (p / OUTPUT_MARKER).is_file():
            out.append(p)
    return out


def folder_classes(root: Path, *, sub: str | None = None) -> list[str]:
    """Names of the class folders of `root[/sub]` (what `scan_class_folders` would label), sorted."""
    top = root / sub if sub else root
    return [p.name for p in _class_dirs(root, top)] if top.is_dir() else []


def scan_class_folders(root: Path, *, sub: str | None = None) -> ItemSet:
    """Items from `root[/sub]/<class>/**/<file>`; the class is the first folder under `root[/sub]`.

    Hidden folders (such as `.ursa/`) are ignored; files directly under the top folder are ignored.
    Symlinked folders are not followed and symlinks that point outside the root or nowhere are not
    read: each becomes a `skipped` row. Names in the result are relative to `root`, so train and
    valid sub-folders share one namespace.
    """
    top = root / sub if sub else root
    if not top.is_dir():
        raise DataError(f"{top} is not a folder. Pass the folder that holds one sub-folder per class.")
    root_abs = root.resolve()
    if sub and (top.is_symlink() or not inside_root(root_abs, top)):
        raise DataError(f"{top} is a symlink or leads outside the dataset root {root}; symlinked folders are not followed. Put the {sub} folder itself inside the dataset.")
    out = ItemSet()
    for class_dir in _class_dirs(root, top, out.skipped):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            keep = []
            for d in sorted(dirnames):
                if _is_hidden(d):
                    continue
                path = Path(dirpath) / d
                if path.is_symlink():  # os.walk lists folder links but does not enter them
                    out.skipped.append(Skipped(path.relative_to(root).as_posix(), _link_reason(root_abs, path) or "symlink"))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for fname in sorted(filenames):
                if _is_hidden(fname):
                    continue
                path = Path(dirpath) / fname
                name = path.relative_to(root).as_posix()
                if path.suffix.lower() in NON_IMAGE_SUFFIXES:
                    continue
                reason = _link_reason(root_abs, path) if path.is_symlink() else None
                reason = reason or check_image(path)
                if reason is None:
                    out.items.append(Item(name, class_dir.name))
                else:
                    out.skipped.append(Skipped(name, reason))
    return out


def find_split_folders(root: Path) -> tuple[str, str] | None:
    """(train, valid) sub-folder names when `root` is laid out as train/ and valid/ folders, else None."""
    names = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    train = next((names[n] for n in TRAIN_NAMES if n in names), None)
    valid = next((names[n] for n in VALID_NAMES if n in names), None)
    if train and valid:
        return train, valid
    return None


def _normalise_name(raw: str) -> str:
    # The lesson's cleaner wrote paths with the OS separator; on Windows that is a backslash.
    name = raw.strip().strip('"')
    if "\\" in name:
        name = PureWindowsPath(name).as_posix()
    while name.startswith("./"):
        name = name[2:]
    return name


def check_name(root: Path, raw: str, *, root_abs: Path | None = None) -> str:
    """`raw` (a name from a CSV or split.json) as a name relative to `root`, with '/' separators.

    Accepts Windows backslashes, a leading `./` and an absolute path under the root. Raises DataError
    (a short reason, for the caller to put in context) when the name has a `..` part, is absolute
    elsewhere, or resolves outside the root through a symlink; nothing is opened.
    """
    root_abs = root_abs or root.resolve()
    name = _normalise_name(raw)
    path = Path(name)
    if path.is_absolute():
        rel = None
        for base in (Path(os.path.abspath(root)), root_abs):
            try:
                rel = path.relative_to(base)
                break
            except ValueError:
                continue
        if rel is None:
            raise DataError("is an absolute path outside the dataset root")
        name = rel.as_posix()
    if ".." in Path(name).parts:
        raise DataError("leaves the dataset root (it has a '..' part)")
    if name and not inside_root(root_abs, root_abs / name):
        raise DataError("leads outside the dataset root through a symlink")
    return name


_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


def _side(row: dict[str, str], name: str, folders: tuple[str, str] | None) -> str | None:
    """"train" / "valid" for a CSV row: from its `split` or `is_valid` column, else from the first part
    of its name when the dataset has train/valid folders; None when nothing says. Raises DataError."""
    if "split" in row:
        value = row["split"].strip().lower()
        if value in TRAIN_NAMES or value in VALID_NAMES:
            return "train" if value in TRAIN_NAMES else "valid"
        raise DataError(f"has split {row['split']!r}; use train or valid")
    if "is_valid" in row:
        value = row["is_valid"].strip().lower()
        if value in _TRUE or value in _FALSE:
            return "valid" if value in _TRUE else "train"
        raise DataError(f"has is_valid {row['is_valid']!r}; use true or false (1 or 0)")
    if folders is not None:
        train, valid = (f.replace("\\", "/").strip("/") for f in folders)
        if name.startswith(f"{train}/"):
            return "train"
        if name.startswith(f"{valid}/"):
            return "valid"
        raise DataError(f"is in neither {folders[0]}/ nor {folders[1]}/; move it into one, or add a split column (train/valid)")
    return None


def _listing(rows: list[tuple[int, str, str]]) -> str:
    shown = "; ".join(f"row {line}: {raw!r} {why}" for line, raw, why in rows[:5])
    return shown + (f"; and {len(rows) - 5} more" if len(rows) > 5 else "")


def read_labels_csv(
    root: Path,
    csv_path: Path,
    *,
    known_labels: list[str] | None = None,
    allow_new_labels: bool = False,
    folders: tuple[str, str] | None = None,
) -> ItemSet:
    """Items from a CSV with columns `name,label` (names relative to `root`), as `cleaned.csv` is written.

    Also accepts an absolute name under `root`, Windows backslash paths, and a leading `./`. Every
    name is checked before any file is opened: one that leaves the root (`..`, a symlink pointing out)
    is an error naming its row. Missing files and labels outside `known_labels` are errors (listed,
    with the fix), so a stale CSV never trains silently on a different dataset. Unreadable images
    become `skipped` rows.

    Which side a row is on (`ItemSet.sides`) comes from a `split` column (train / valid) or an
    `is_valid` column (true / false, as fastai's `ColSplitter` reads it), else, when `folders` names
    the dataset's (train, valid) sub-folders, from the first part of the name; otherwise it is left
    to the seeded split.
    """
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} does not exist. Pass a CSV with columns name,label.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a readable CSV ({exc}). Save it as UTF-8 text with columns name,label.") from None
    if not rows:
        raise DataError(f"{csv_path} has no rows. It needs a header `name,label` and one row per image.")
    if "name" not in header or "label" not in header:
        raise DataError(f"{csv_path} has columns {header}; it needs `name` and `label` (as cleaned.csv has).")
    if "split" in header and "is_valid" in header:
        raise DataError(f"{csv_path} has both a `split` and an `is_valid` column. Keep one of them.")
    root_abs = root.resolve()
    escapes: list[tuple[int, str, str]] = []
    bad_sides: list[tuple[int, str, str]] = []
    unknown: set[str] = set()
    todo: list[tuple[str, str, str | None]] = []
    for line, cells in rows:
        row = {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header) if h}
        raw, label = row["name"], row["label"].strip()
        try:
            name = check_name(root, raw, root_abs=root_abs)
        except DataError as exc:
            escapes.append((line, raw.strip(), str(exc)))
            continue
        if not name:
            continue
        if not label:
            raise DataError(f"{csv_path} row {line}: {name} has an empty label. Give every row a label, or remove the row.")
        try:
            side = _side(row, name, folders)
        except DataError as exc:
            bad_sides.append((line, name, str(exc)))
            continue
        if known_labels is not None and not allow_new_labels and label not in known_labels:
            unknown.add(label)
            continue
        todo.append((name, label, side))
    if escapes:  # checked before any file is opened
        raise DataError(
            f"{csv_path} names {len(escapes)} files outside the dataset root {root}: {_listing(escapes)}. "
            "Names must be paths inside the dataset root, symlinks included: remove those rows, or copy the files into the dataset and name them relative to it."
        )
    if bad_sides:
        raise DataError(f"{csv_path} has {len(bad_sides)} rows on no side of the split: {_listing(bad_sides)}.")
    if unknown:
        raise DataError(
            f"{csv_path} has labels that are not classes of {root}: {sorted(unknown)} (classes: {known_labels}). "
            "Fix the labels, or pass --allow-new-labels to accept them as new classes."
        )
    missing = [name for name, _, _ in todo if not (root / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{csv_path} names {len(missing)} files that do not exist under {root}: {shown}. "
            "Pass the dataset root the CSV was written for (names are relative to it), or remove those rows."
        )
    out = ItemSet()
    for name, label, side in todo:
        if side is not None:
            out.sides[name] = side
        reason = check_image(root / name)
        if reason is None:
            out.items.append(Item(name, label))
        else:
            out.skipped.append(Skipped(name, reason))
    return out
