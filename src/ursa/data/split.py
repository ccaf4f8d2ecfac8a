"""Seeded, stratified train/valid splits, and the dataset definition written to `split.json`.

The split is computed per class over sorted names with a generator seeded by (seed, class), so it does
not depend on listing order, and adding a class does not reshuffle the others. Byte-identical files
(same sha256) form one group and always land on the same side, so a duplicate cannot leak into valid.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ursa._io import atomic_write_json, sha256_file
from ursa.config import DataConfig
from ursa.data.items import Item, Skipped, check_name, find_split_folders, folder_classes, read_labels_csv, scan_class_folders
from ursa.errors import DataError

__all__ = ["Split", "split_items", "build_split", "save_split", "load_split", "content_groups", "dataset_sizes"]


@dataclass
class Split:
    """A dataset root with its train and valid items and the ordered class list."""

    root: Path
    train: list[Item]
    valid: list[Item]
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    how: str = "random"  # "random" (seeded split), "folders" (train/valid folders) or "csv" (valid_pct 0: sides given)
    seed: int = 42
    valid_pct: float = 0.2

    def label_ids(self, items: Sequence[Item]) -> np.ndarray:
        """Class indices (int64) of `items` in `classes` order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[it.label] for it in items], dtype=np.int64)

    def counts(self) -> dict[str, tuple[int, int]]:
        """class -> (n_train, n_valid)."""
        out = {c: [0, 0] for c in self.classes}
        for it in self.train:
            out[it.label][0] += 1
        for it in self.valid:
            out[it.label][1] += 1
        return {c: (a, b) for c, (a, b) in out.items()}


def content_groups(root: Path, items: Sequence[Item]) -> dict[str, str]:
    """name -> sha256 of the file's bytes; equal values mark byte-identical files."""
    return {it.name: sha256_file(root / it.name) for it in items}


def split_items(
    items: Sequence[Item],
    *,
    valid_pct: float = 0.2,
    seed: int = 42,
    groups: Mapping[str, str] | None = None,
) -> tuple[list[Item], list[Item]]:
    """Split `items` into (train, valid), stratified by label; both lists sorted by name.

    Each class puts round(n * valid_pct) items (at least 1, at most n - 1) into valid, choosing whole
    groups (items with the same `groups[name]`) in a seeded random order; a group whose items carry
    different labels stays in train. Raises DataError for a
    `valid_pct` outside (0, 1) or a class with fewer than 2 items.
    """
    if not 0.0 < valid_pct < 1.0:
        raise DataError(f"--valid-pct must be between 0 and 1 (exclusive), got {valid_pct}. Try 0.2 for 20%.")
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(set(items)):
        by_class[it.label].append(it)
    train: list[Item] = []
    valid: list[Item] = []
    # The same picture under two labels (a labelling conflict) stays in training, whole, so it can
    # neither leak across the split nor give validation a contradictory target.
    spans: dict[str, set[str]] = defaultdict(set)
    if groups:
        for it in items:
            spans[groups.get(it.name, it.name)].add(it.label)
    cross = {k for k, labs in spans.items() if len(labs) > 1}
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        if n < 2:
            raise DataError(
                f"class {label!r} has {n} image; a class needs at least 2 (one to train on, one to validate). "
                "Add images to it, or remove the class."
            )
        target = min(max(1, round(n * valid_pct)), n - 1)
        units: dict[str, list[Item]] = defaultdict(list)
        for it in members:
            units[groups.get(it.name, it.name) if groups else it.name].append(it)
        keys = sorted(k for k in units if k not in cross)
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(keys))
        chosen: list[Item] = []
        for k in order:
            unit = units[keys[k]]
            if len(chosen) >= target:
                break
            if len(chosen) + len(unit) > n - 1:
                continue  # never empty the training side of a class
            chosen.extend(unit)
        chosen_names = {it.name for it in chosen}
        valid.extend(chosen)
        train.extend(it for it in members if it.name not in chosen_names)
    return sorted(train), sorted(valid)


def _check_classes(split: Split) -> None:
    if not split.train:
        raise DataError(
            f"no images found under {split.root}. Put images in one sub-folder per class "
            "(for example data/bears/grizzly/001.jpg), or pass --labels with a CSV."
        )
    if len(split.classes) < 2:
        raise DataError(
            f"{split.root} has a single class ({split.classes[0]!r}); a classifier needs at least 2. "
            "Add a sub-folder of images for each other class."
        )
    counts = split.counts()
    empty_valid = [c for c, (_, v) in counts.items() if v == 0]
    if split.how != "random" and empty_valid and not split.valid:
        raise DataError(f"the validation side of {split.root} has no images. Put class folders of images in its validation folder (or rows marked valid in the CSV).")
    if not split.valid:
        # every image has a byte-identical copy under another label (kept in training), e.g. a folder
        # listed twice: nothing is left to validate on
        raise DataError(
            f"no image of {split.root} could go to validation: each one has a byte-identical copy under another class. "
            "Remove the duplicated folder or files (see `ursa info`), then train again."
        )


def _split_from_csv(root: Path, cfg: DataConfig, folders: tuple[str, str] | None) -> Split:
    """Items and labels from the CSV `cfg.labels`; sides as the CSV or the train/valid folders say, else seeded."""
    csv_path = Path(cfg.labels or "")
    if not csv_path.is_absolute() and not csv_path.exists():
        csv_path = root / csv_path
    # the classes of the dataset as it is laid out: the class folders (of the train and valid folders)
    known = sorted(set(folder_classes(root, sub=folders[0])) | set(folder_classes(root, sub=folders[1]))) if folders else folder_classes(root)
    found = read_labels_csv(root, csv_path, known_labels=known or None, allow_new_labels=cfg.allow_new_labels, folders=folders)
    if not found.sides:
        groups = content_groups(root, found.items)
        train, valid = split_items(found.items, valid_pct=cfg.valid_pct, seed=cfg.seed, groups=groups)
        return Split(root, train, valid, found.labels, found.skipped, "csv", cfg.seed, cfg.valid_pct)
    train = sorted(it for it in found.items if found.sides[it.name] == "train")
    valid = sorted(it for it in found.items if found.sides[it.name] == "valid")
    untrained = sorted({it.label for it in valid} - {it.label for it in train})
    if untrained:
        raise DataError(f"{csv_path} has labels with validation rows but no training rows: {untrained}. Add training images for them, or remove those rows.")
    return Split(root, train, valid, found.labels, found.skipped, "csv", cfg.seed, 0.0)


def build_split(root: str | Path, cfg: DataConfig = DataConfig()) -> Split:
    """Read `root` the way `cfg` says and split it. The one place a dataset definition is made.

    - `cfg.labels`: items and labels from that CSV. The train/valid side of each row is kept when
      the CSV has a `split` or `is_valid` column, or when the root has train/ and valid/ folders
      (`cfg.train`/`cfg.valid`, or found); otherwise the rows are split at random (seeded).
    - `cfg.train`/`cfg.valid`, or a root that holds train/ and valid/ folders: the given split.
    - otherwise: class folders under `root`, split at random (seeded, stratified, duplicates grouped).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist. Pass the folder that holds one sub-folder per class.")
    if not 0.0 < cfg.valid_pct < 1.0:
        raise DataError(f"--valid-pct must be between 0 and 1 (exclusive), got {cfg.valid_pct}. Try 0.2 for 20%.")
    folders = (cfg.train, cfg.valid) if cfg.train and cfg.valid else None
    if (cfg.train is None) != (cfg.valid is None):
        raise DataError("pass both --train and --valid (the two sub-folders), or neither.")
    if folders is None:
        folders = find_split_folders(root)
    if cfg.labels is not None:
        split = _split_from_csv(root, cfg, folders)
    elif folders is not None:
        tr, va = scan_class_folders(root, sub=folders[0]), scan_class_folders(root, sub=folders[1])
        classes = tr.labels
        stray = sorted(set(va.labels) - set(classes))
        if stray:
            raise DataError(
                f"validation folder {folders[1]!r} has classes with no training folder: {stray}. "
                f"Add {folders[0]}/<class> folders for them, or remove them from {folders[1]!r}."
            )
        split = Split(root, sorted(tr.items), sorted(va.items), classes, tr.skipped + va.skipped, "folders", cfg.seed, 0.0)
    else:
        found = scan_class_folders(root)
        if found.items:
            groups = content_groups(root, found.items)
            train, valid = split_items(found.items, valid_pct=cfg.valid_pct, seed=cfg.seed, groups=groups)
        else:
            train, valid = [], []
        split = Split(root, train, valid, found.labels, found.skipped, "random", cfg.seed, cfg.valid_pct)
    _check_classes(split)
    return split


def save_split(split: Split, path: str | Path) -> Path:
    """Write `split.json`: root (absolute, so later stages work from any folder), how, seed, classes,
    [name, label] pairs per side, skipped files."""
    return atomic_write_json(
        path,
        {
            "root": str(split.root.resolve()),
            "how": split.how,
            "seed": split.seed,
            "valid_pct": split.valid_pct,
            "classes": split.classes,
            "train": [[it.name, it.label] for it in split.train],
            "valid": [[it.name, it.label] for it in split.valid],
            "skipped": [[s.name, s.reason] for s in split.skipped],
        },
    )


def load_split(path: str | Path, *, root: str | Path | None = None) -> Split:
    """Read a `split.json`; `root` overrides the recorded dataset root (a moved dataset).

    Every name must lie inside the root (see `check_name`): later stages open them, so an edited
    split.json cannot point them at other files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist. Run `ursa train` first; it writes split.json into the run folder.")
    data = json.loads(path.read_text(encoding="utf-8"))
    base = Path(root) if root is not None else Path(data["root"])
    base_abs = base.resolve()
    outside = []
    for n, _ in [*data["train"], *data["valid"]]:
        try:
            check_name(base, n, root_abs=base_abs)
        except DataError as exc:
            outside.append(f"{n!r} {exc}")
    if outside:
        raise DataError(
            f"{path} names {len(outside)} files outside the dataset root {base}: {'; '.join(outside[:5])}. "
            "The file was changed after training; train again to write a fresh split.json."
        )
    return Split(
        root=base,
        train=[Item(n, lab) for n, lab in data["train"]],
        valid=[Item(n, lab) for n, lab in data["valid"]],
        classes=list(data["classes"]),
        skipped=[Skipped(n, r) for n, r in data.get("skipped", [])],
        how=data.get("how", "random"),
        seed=int(data.get("seed", 42)),
        valid_pct=float(data.get("valid_pct", 0.2)),
    )


def dataset_sizes(split: Split) -> dict[str, object]:
    """Image sizes (from headers): min / median / max as 'WxH' by area, and the colour modes seen."""
    from collections import Counter

    from PIL import Image

    sizes: list[tuple[int, int]] = []
    modes: Counter[str] = Counter()
    for it in [*split.train, *split.valid]:
        with Image.open(split.root / it.name) as im:
            sizes.append(im.size)
            modes[im.mode] += 1
    if not sizes:
        return {"min": "-", "median": "-", "max": "-", "n_modes": "no images"}
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    fmt = lambda s: f"{s[0]}x{s[1]}"  # noqa: E731
    return {"min": fmt(by_area[0]), "median": fmt(by_area[len(by_area) // 2]), "max": fmt(by_area[-1]), "n_modes": "modes " + ", ".join(f"{m} {n}" for m, n in modes.most_common())}
