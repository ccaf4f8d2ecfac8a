"""Turn a dataset root into labelled items: from class folders, from train/valid folders, or from a CSV.

An item is a path relative to the root (POSIX separators) and a label. Files that are not images are
skipped with a row saying why, never a crash.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from PIL import Image, UnidentifiedImageError

from ursa.errors import DataError

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
]

TRAIN_NAMES = ("train", "training")
VALID_NAMES = ("valid", "validation", "val")
# Files that live beside images and are never images; skipped silently.
_QUIET_SUFFIXES = {".csv", ".txt", ".json", ".md", ".db", ".ini", ".log"}


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
    """Items read from a root; `skipped` lists the files that could not be used."""

    items: list[Item] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Sorted distinct labels."""
        return sorted({it.label for it in self.items})


def check_image(path: Path) -> str | None:
    """None when `path` opens as an image (header only, cheap), else the reason it does not.

    Pillow's decompression-bomb guard stays on: an image over its pixel limit is refused here.
    """
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (parsing the header is the check)
    except Image.DecompressionBombError as exc:
        return f"decompression bomb refused: {exc}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image: {type(exc).__name__}: {exc}".strip()
    return None


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__pycache__"


def scan_class_folders(root: Path, *, sub: str | None = None) -> ItemSet:
    """Items from `root[/sub]/<class>/**/<file>`; the class is the first folder under `root[/sub]`.

    Hidden folders (such as `.ursa/`) are ignored; files directly under the top folder are ignored.
    Names in the result are relative to `root`, so train and valid sub-folders share one namespace.
    """
    top = root / sub if sub else root
    if not top.is_dir():
        raise DataError(f"{top} is not a folder. Pass the folder that holds one sub-folder per class.")
    out = ItemSet()
    for class_dir in sorted(p for p in top.iterdir() if p.is_dir() and not _is_hidden(p.name)):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for fname in sorted(filenames):
                if _is_hidden(fname):
                    continue
                path = Path(dirpath) / fname
                name = path.relative_to(root).as_posix()
                if path.suffix.lower() in _QUIET_SUFFIXES:
                    continue
                reason = check_image(path)
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


def read_labels_csv(
    root: Path,
    csv_path: Path,
    *,
    known_labels: list[str] | None = None,
    allow_new_labels: bool = False,
) -> ItemSet:
    """Items from a CSV with columns `name,label` (names relative to `root`), as `cleaned.csv` is written.

    Also accepts an absolute name under `root`, Windows backslash paths, and a leading `./`.
    Missing files and labels outside `known_labels` are errors (listed, with the fix), so a stale CSV
    never trains silently on a different dataset. Unreadable images become `skipped` rows.
    """
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} does not exist. Pass a CSV with columns name,label.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a readable CSV ({exc}). Save it as UTF-8 text with columns name,label.") from None
    if not rows:
        raise DataError(f"{csv_path} has no rows. It needs a header `name,label` and one row per image.")
    if "name" not in header or "label" not in header:
        raise DataError(f"{csv_path} has columns {header}; it needs `name` and `label` (as cleaned.csv has).")
    out = ItemSet()
    missing: list[str] = []
    unknown: set[str] = set()
    root_abs = root.resolve()
    for row in rows:
        row = {k.strip().lower(): (v or "") for k, v in row.items() if k}
        name, label = _normalise_name(row["name"]), row["label"].strip()
        if not name:
            continue
        path = Path(name)
        if path.is_absolute():
            try:
                name = path.resolve().relative_to(root_abs).as_posix()
            except ValueError:
                raise DataError(f"{csv_path}: {name} is outside the dataset root {root}. Names must be relative to it.") from None
        if not label:
            raise DataError(f"{csv_path}: row for {name} has an empty label. Give every row a label, or remove the row.")
        if known_labels is not None and not allow_new_labels and label not in known_labels:
            unknown.add(label)
            continue
        full = root / name
        if not full.is_file():
            missing.append(name)
            continue
        reason = check_image(full)
        if reason is None:
            out.items.append(Item(name, label))
        else:
            out.skipped.append(Skipped(name, reason))
    if unknown:
        raise DataError(
            f"{csv_path} has labels that are not classes of {root}: {sorted(unknown)} (classes: {known_labels}). "
            "Fix the labels, or pass --allow-new-labels to accept them as new classes."
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{csv_path} names {len(missing)} files that do not exist under {root}: {shown}. "
            "Pass the dataset root the CSV was written for (names are relative to it), or remove those rows."
        )
    return out
