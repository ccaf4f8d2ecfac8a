"""Verify a dataset folder: decode every image fully, repair what can be repaired, quarantine the rest.

Nothing is deleted. An unreadable file is moved to `<root>/.ursa/quarantine/<its path>`; a repaired file's
original bytes are kept in `<root>/.ursa/quarantine/originals/<its path>` before the file is rewritten. Each
move or rewrite is one line of the dataset's journal, `<root>/.ursa/journal.jsonl` (`ursa.journal`, shared
with the review: `seq`, `at`, `op` "quarantine" or "repair", `file`, where the bytes went, `reason`), enough
to undo it. Rows of `<root>/.ursa/manifest.csv`, when there is one, are updated to match.

Repairs: EXIF orientation applied; CMYK, palette, 16-bit, alpha and other modes converted to RGB (grey
images stay grey); truncated files that still decode re-saved whole; images whose longest side is over
`max_size` shrunk. A repaired file keeps its name and format, except formats that cannot hold RGB (GIF),
which become PNG beside it. Exact duplicates (same bytes, or same pixels in different files) are reported,
across class folders too, and left in place for the split and the review to handle.

File names are not trusted: `00000145.jpg;w=960`, names without an extension and upper-case `.JPG` are all
read by their content.

What is not a file to check is skipped with a row saying why, never a crash and never changed: a dangling
symlink, a symlink loop, a symlink to a folder (never followed: one back to the root would list every
image twice) or to anything outside the root (verify changes files only under the root), a named pipe or
device, a file that cannot be read. A symlink to a file inside the root is left as it is (its target is
checked by its own path) and still counted in the duplicates, since training reads it as one more image.

One run at a time: verify holds the dataset folder's lock (`ursa._io.dataset_lock`), as download does, so
a verify during a download or a second verify stops at once with a message instead of changing files the
other run is recording.

Duplicates after an interrupted run: each repair's journal line records the hash of the bytes and of the
upright pixels as found, so a file repaired by an earlier (perhaps killed) run is grouped by the picture
it was, exactly as a run that saw it unrepaired would group it. A change is written to the journal before
the file is touched, so no repair goes unrecorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ursa._io import atomic_write_bytes, dataset_lock, file_mode
from ursa.collect.manifest import META_DIR, Manifest
from ursa.config import VerifyConfig
from ursa.errors import VerifyError
from ursa.imageio import NON_IMAGE_SUFFIXES, too_many_pixels
from ursa.journal import Journal, journal_path

__all__ = [
    "FileResult",
    "DuplicateGroup",
    "VerifyReport",
    "verify_folder",
    "find_files",
    "journal_path",
    "quarantine_dir",
]

# Files that live beside images and are never images; left alone.
# Pillow format -> the format a repaired file is written in (None: cannot hold RGB, write PNG instead).
_SAVE_AS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "BMP": "BMP", "TIFF": "TIFF"}
_KEEP_MODES = {"RGB", "L"}
_ORIENTATION = 0x0112


@dataclass
class FileResult:
    """What happened to one file. `file` is relative to the root; `new_file` is set when a repair renamed it."""

    file: str
    status: str  # "ok", "repaired", "quarantined", "skipped" (left as it is: see the module docstring), or "unreadable" (a report-only run: left in place)
    changes: list[str] = field(default_factory=list)  # repairs made, or the reason for quarantine or skipping
    sha256: str = ""  # of the bytes as found
    new_file: str | None = None

    @property
    def label(self) -> str:
        """The class folder (first path part), or '' for a file directly under the root."""
        return self.file.split("/", 1)[0] if "/" in self.file else ""


@dataclass
class DuplicateGroup:
    """Files with identical content: `kind` is 'bytes' (identical files) or 'pixels' (same picture, other bytes)."""

    kind: str
    files: list[str]

    @property
    def labels(self) -> list[str]:
        return sorted({f.split("/", 1)[0] if "/" in f else "" for f in self.files})

    @property
    def cross_class(self) -> bool:
        """True when the same picture sits in two or more class folders (a labelling conflict)."""
        return len(self.labels) > 1


@dataclass
class VerifyReport:
    """The outcome of `verify_folder`: one `FileResult` per file checked, and the duplicate groups."""

    root: Path
    results: list[FileResult] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    journal: Path | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def shrunk(self) -> int:
        return sum(any(c.startswith("shrunk") for c in r.changes) for r in self.results)

    def by_label(self) -> dict[str, dict[str, int]]:
        """Per class folder: files, ok, repaired, shrunk, quarantined, unreadable, skipped, duplicates (its files that have an exact copy)."""
        table: dict[str, dict[str, int]] = {}
        for r in self.results:
            row = table.setdefault(r.label, dict.fromkeys(("files", "ok", "repaired", "shrunk", "quarantined", "unreadable", "skipped", "duplicates"), 0))
            row["files"] += 1
            row[r.status] += 1
            row["shrunk"] += any(c.startswith("shrunk") for c in r.changes)
        for group in self.duplicates:
            for f in group.files:
                table[f.split("/", 1)[0] if "/" in f else ""]["duplicates"] += 1
        return dict(sorted(table.items()))


def quarantine_dir(root: str | os.PathLike[str]) -> Path:
    """`<root>/.ursa/quarantine`."""
    return Path(root) / META_DIR / "quarantine"


def find_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every file under `root` that could be an image, sorted; hidden files and folders and text files are left
    out, and symlinked folders are not followed (they are listed, as links, among the files)."""
    return _walk(Path(root))


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: a folder symlink is not entered
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__" and d not in links)
        for name in [*filenames, *links]:
            if not name.startswith(".") and Path(name).suffix.lower() not in NON_IMAGE_SUFFIXES:
                out.append(here / name)
    return sorted(out)


def _what_it_is(root_abs: Path, path: Path) -> tuple[str, str]:
    """("file", "") for a regular file to check; ("link", reason) for a symlink to a file inside the root
    (read, never changed); ("skip", reason) for anything else (see the module docstring)."""
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return "skip", f"dangling symlink: its target {os.readlink(path)} does not exist. Remove the link or restore the file"
        except (OSError, RuntimeError):
            return "skip", "symlink loop: the link leads back to itself. Remove the link"
        try:
            inside = target.relative_to(root_abs).as_posix()
        except ValueError:
            inside = None
        if target.is_dir():
            if inside is not None:
                return "skip", f"symlink to a folder inside the dataset ({inside or '.'}); not followed: its images are checked once, by their own path"
            return "skip", f"symlink to a folder outside the dataset ({target}); not followed: verify changes files only under the dataset root"
        if inside is None:
            return "skip", f"symlink to a file outside the dataset ({target}); not checked: verify changes files only under the dataset root. Copy the file in to keep it"
        return "link", f"symlink to {inside}; left as it is (the file is checked by its own path)"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return "skip", f"cannot read: {exc.strerror or exc}. Fix its permissions and verify again"
    if not stat.S_ISREG(mode):
        return "skip", "not a regular file (a named pipe, socket or device); left in place"
    return "file", ""


@contextlib.contextmanager
def _load_truncated() -> Iterator[None]:
    """Let Pillow decode what it can of a truncated file. Global in Pillow, so verify decodes on one thread."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


class _Unreadable(Exception):
    """A file to quarantine; the message is the reason."""


def _decode(data: bytes, max_pixels: int) -> tuple[Image.Image, str, list[str]]:
    """(fully decoded image, Pillow format, notes) or `_Unreadable`. Notes say 'truncated' when it was."""
    if not data:
        raise _Unreadable("empty file (0 bytes)")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or ""
            problem = too_many_pixels(*img.size, max_pixels)
            if problem is not None:
                raise _Unreadable(f"decompression bomb: {problem}")
            try:
                img.load()
            except (OSError, SyntaxError, ValueError):
                with _load_truncated():
                    img = Image.open(io.BytesIO(data))
                    img.load()
                notes.append("truncated: re-saved what could be decoded")
    except Image.DecompressionBombError as exc:
        raise _Unreadable("decompression bomb: the header claims more pixels than Pillow will decode") from exc
    except UnidentifiedImageError as exc:
        raise _Unreadable("not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _Unreadable(f"cannot decode: {exc}") from exc
    if getattr(img, "n_frames", 1) > 1:
        notes.append("animated: kept the first frame")
    return img, fmt, notes


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit or float grey -> 8-bit grey, scaling by the type's range (or the data's, for 32-bit ints and floats)."""
    arr = np.asarray(img)
    top = 65535.0 if img.mode.startswith("I;16") else float(max(arr.max(), 1))
    if top <= 255:
        top = 255.0
    return Image.fromarray(np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8), "L")


def _normalise(img: Image.Image, data: bytes, fmt: str) -> tuple[Image.Image, list[str]]:
    """The image upright and in RGB or L, and the changes that took."""
    changes = []
    orientation = img.getexif().get(_ORIENTATION, 1)
    if orientation not in (1, 0, None):
        img = ImageOps.exif_transpose(img)
        changes.append(f"rotated per EXIF orientation {orientation}")
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _to_8bit(img)
        changes.append(f"16-bit {mode} -> 8-bit" if mode.startswith("I;16") else f"{mode} -> 8-bit")
    elif fmt == "PNG" and len(data) > 24 and data[24] == 16:  # 48/64-bit PNG, read by Pillow as 8-bit
        changes.append("16-bit -> 8-bit")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if img.mode not in _KEEP_MODES or has_alpha:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba).convert("RGB")
            changes.append(f"{mode} with transparency -> RGB on white")
        else:
            img = img.convert("RGB")
            changes.append(f"{mode} -> RGB")
    return img, changes


def _shrink(img: Image.Image, max_size: int | None) -> tuple[Image.Image, list[str]]:
    """The image with its longest side at most `max_size` pixels (aspect kept), and the change if any."""
    if max_size is None or max(img.size) <= max_size:
        return img, []
    before = img.size
    img = img.copy()
    img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    return img, [f"shrunk from {before[0]}x{before[1]} to {img.size[0]}x{img.size[1]}"]


def _pixel_hash(img: Image.Image) -> str:
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt in ("JPEG", "WEBP"):
        img.save(buf, fmt, quality=quality)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _free_path(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... whichever does not exist yet (the quarantine never overwrites)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


Identity = tuple[str, str]  # (sha256 of the bytes, hash of the upright pixels) of a picture as first found


class _Verifier:
    def __init__(self, root: Path, cfg: VerifyConfig, *, report_only: bool = False) -> None:
        self.root = root
        self.report_only = report_only  # move, rewrite and journal nothing
        self.root_abs = root.resolve()
        self.cfg = cfg
        self.manifest = Manifest.load(root) if (root / META_DIR / "manifest.csv").exists() else None
        self.rows_by_file = self.manifest.by_file() if self.manifest is not None else {}
        self.manifest_changed = False
        self.journal = Journal(root, error=VerifyError)
        self.repairs = _earlier_repairs(self.journal)  # sha256 after a repair -> its journal line

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def check(self, path: Path) -> tuple[FileResult, Identity | None]:
        """The file's result and the identity it is grouped by for duplicates (None when there is no picture)."""
        rel = self.rel(path)
        kind, reason = _what_it_is(self.root_abs, path)
        if kind == "skip":
            return FileResult(rel, "skipped", [reason]), None
        try:
            data = path.read_bytes()
        except OSError as exc:
            return FileResult(rel, "skipped", [f"cannot read: {exc.strerror or exc}. Fix its permissions and verify again"]), None
        sha = hashlib.sha256(data).hexdigest()
        try:
            img, fmt, notes = _decode(data, self.cfg.max_pixels)
        except _Unreadable as exc:
            if kind == "link":  # never moved: the file it points to is quarantined by its own path
                return FileResult(rel, "skipped", [f"{reason}; not an image: {exc}"], sha), None
            if self.report_only:
                return FileResult(rel, "unreadable", [str(exc)], sha), None
            self.quarantine(path, rel, str(exc))
            return FileResult(rel, "quarantined", [str(exc)], sha), None
        with img:
            upright, fixes = _normalise(img, data, fmt)
            pixels = _pixel_hash(upright)  # before shrinking, so sizes do not hide a duplicate
            identity = self.identity(sha, pixels)
            if kind == "link":
                return FileResult(rel, "skipped", [reason], sha), identity
            fixed, shrunk = _shrink(upright, self.cfg.max_size)
            changes = notes + fixes + shrunk
            if not changes or not self.cfg.repair or self.report_only:
                return FileResult(rel, "ok", changes, sha), identity  # with no repair: the repairs it needs
            new_rel = self.rewrite(path, rel, data, fixed, fmt, changes, pixels)
        return FileResult(rel, "repaired", changes, sha, new_rel if new_rel != rel else None), identity

    def identity(self, sha: str, pixels: str) -> Identity:
        """(sha, pixels) of the picture as first found: for bytes an earlier repair wrote, those the repair
        started from (following repairs of repairs), so an interrupted run groups duplicates as a whole one."""
        seen = set()
        while sha in self.repairs and sha not in seen:
            seen.add(sha)
            entry = self.repairs[sha]
            before = str(entry.get("pixels") or "") or self._pixels_of_original(entry)
            if not before:
                break
            sha, pixels = str(entry["sha256_before"]), before
        return sha, pixels

    def _pixels_of_original(self, entry: dict[str, object]) -> str:
        """The pixel hash of a repair's original (journal lines written before they recorded it), or ''."""
        try:
            data = (self.root / str(entry["original"])).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256_before"]:
                return ""
            img, fmt, _ = _decode(data, self.cfg.max_pixels)
            with img:
                return _pixel_hash(_normalise(img, data, fmt)[0])
        except (KeyError, OSError, _Unreadable, ValueError):
            return ""

    def quarantine(self, path: Path, rel: str, reason: str) -> None:
        target = _free_path(quarantine_dir(self.root) / rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        moved_to = self.rel(target)
        # the journal first: a run killed between the two lines leaves a line for a move not yet made, never a move without one
        self.journal.append("quarantine", file=rel, to=moved_to, reason=reason)
        os.replace(path, target)
        self.update_rows(rel, status="quarantined", reason=f"verify: {reason} (moved to {moved_to})")

    def rewrite(self, path: Path, rel: str, data: bytes, img: Image.Image, fmt: str, changes: list[str], pixels: str) -> str:
        save_as = _SAVE_AS.get(fmt)
        new_path = path
        if save_as is None:  # GIF and the like cannot hold RGB: write a PNG beside it
            save_as = "PNG"
            new_path = path.with_suffix(".png") if path.suffix else path.with_name(path.name + ".png")
            if new_path.exists():
                new_path = _free_path(path.with_name(path.name + ".png"))
        new_bytes = _encode(img, save_as, self.cfg.quality)
        mode = file_mode(path)  # the repaired file and the kept original get the original's permissions
        original = _free_path(quarantine_dir(self.root) / "originals" / rel)
        atomic_write_bytes(original, data, mode=mode)  # the original is safe before anything is replaced
        new_rel = self.rel(new_path)
        reason = "; ".join(changes)
        entry = self.journal.append(  # before the file changes (see `quarantine`)
            "repair", file=rel, new_file=new_rel, original=self.rel(original), reason=reason,
            sha256_before=hashlib.sha256(data).hexdigest(), sha256_after=hashlib.sha256(new_bytes).hexdigest(), pixels=pixels,
        )  # fmt: skip
        self.repairs[str(entry["sha256_after"])] = entry
        atomic_write_bytes(new_path, new_bytes, mode=mode)
        if new_path != path:
            path.unlink()  # its bytes are in `original`
        self.update_rows(rel, file=new_rel, sha256=entry["sha256_after"], bytes=len(new_bytes), reason=f"verify: {reason}")
        return new_rel

    def update_rows(self, rel: str, **values: object) -> None:
        rows = self.rows_by_file.get(rel, [])
        for row in rows:
            if values.get("status") == "quarantined" and row["status"] not in ("ok", "duplicate"):
                continue
            row.update({k: str(v) for k, v in values.items()})
            row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.manifest_changed = True

    def save_manifest(self) -> None:
        if self.manifest is not None and self.manifest_changed:
            self.manifest.save()


def _earlier_repairs(journal: Journal) -> dict[str, dict[str, object]]:
    """The journal's repair lines by the sha256 of the bytes they wrote (the latest wins); lines of other
    kinds are passed over."""
    out: dict[str, dict[str, object]] = {}
    for entry in journal.lines():
        if entry.get("op") == "repair" and entry.get("sha256_after") and entry.get("sha256_before"):
            out[str(entry["sha256_after"])] = entry
    return out


def _duplicates(found: dict[str, list[tuple[str, str]]]) -> list[DuplicateGroup]:
    """Groups of two or more files from pixel hash -> [(file, sha256 of its bytes as first found)]."""
    groups = []
    for members in found.values():
        if len(members) > 1:
            files = sorted(f for f, _ in members)
            kind = "bytes" if len({sha for _, sha in members}) == 1 else "pixels"
            groups.append(DuplicateGroup(kind=kind, files=files))
    return sorted(groups, key=lambda g: g.files)


def verify_folder(
    root: str | os.PathLike[str],
    *,
    config: VerifyConfig = VerifyConfig(),
    on_progress: Callable[[int, int], None] | None = None,
    subfolder: str | None = None,
    report_only: bool = False,
) -> VerifyReport:
    """Check every image under `root` (see the module docstring) and return what was done.

    `on_progress(done, total)` is called after each file. `subfolder` (a folder under `root`, such as one
    class folder) checks only the files there, still with the root's quarantine, journal, manifest and
    lock. `report_only` decodes and reports but moves, rewrites and journals nothing: an unreadable file
    gets the status "unreadable" and stays where it is, and a file that needs a repair is "ok" with the
    repairs it needs. Raises `VerifyError` when `root` (or `subfolder`) is not a folder or holds no files
    to check, when a download or another verify is changing the folder right now (its lock), or when the
    quarantine or a repaired file cannot be written.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise VerifyError(f"{str(root)!r} {what}. Give the dataset folder, e.g. ursa verify data/bears.")
    if config.max_size is not None and config.max_size < 16:
        raise VerifyError(f"--max-size {config.max_size} is too small; give the longest side in pixels, e.g. 500.")
    where = root
    if subfolder is not None:
        where = root / subfolder
        parts = Path(subfolder).parts
        if not parts or Path(subfolder).is_absolute() or any(part.startswith(".") for part in parts) or where.is_symlink() or not where.is_dir():
            raise VerifyError(f"{str(subfolder)!r} is not a folder under {str(root)!r}. Give a class folder's name, e.g. 'grizzly'.")
    if not find_files(where):
        raise VerifyError(f"No files to check under {str(where)!r}. Download images first (ursa download / ursa search).")
    try:
        (root / META_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise VerifyError(f"Cannot create {str(root / META_DIR)!r}: {exc.strerror or exc}. verify moves and rewrites files under "
                          f"{str(root)!r}; run it as a user who can write there.") from exc  # fmt: skip
    with dataset_lock(root, "verify", error=VerifyError):
        return _verify(root, where, config, on_progress, report_only=report_only)


def _verify(root: Path, where: Path, config: VerifyConfig, on_progress: Callable[[int, int], None] | None, *, report_only: bool) -> VerifyReport:
    files = find_files(where)  # again, now that no download can be adding files
    verifier = _Verifier(root, config, report_only=report_only)
    report = VerifyReport(root=root, journal=journal_path(root))
    by_pixels: dict[str, list[tuple[str, str]]] = {}
    try:
        for i, path in enumerate(files, 1):
            try:
                result, identity = verifier.check(path)
            except OSError as exc:  # reading is checked per file (a skipped row); this is a failed move or write
                raise VerifyError(
                    f"Cannot read or write {str(path)!r}: {exc.strerror or exc}. Check permissions and free space, then run verify again."
                ) from exc
            report.results.append(result)
            if identity is not None:
                sha, pixels = identity
                by_pixels.setdefault(pixels, []).append((result.new_file or result.file, sha))
            if on_progress is not None:
                on_progress(i, len(files))
    finally:
        with contextlib.suppress(OSError):
            verifier.save_manifest()
    report.duplicates = _duplicates(by_pixels)
    return report
