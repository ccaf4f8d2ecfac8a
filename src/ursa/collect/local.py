"""Add image bytes from this machine (an upload, a webcam frame, a pasted picture) to a class folder.

Every body is checked before anything is written: its size, its format from the bytes themselves
(`ursa.imageio.sniff_image`, which also refuses decompression bombs from the header), and a full decode
(a truncated JPEG is refused here, not at training time). A file is stored under a name Ursa makes from
its content, `<source>-<sha256[:12]><ext>` (e.g. `cats/upload-3f2a9c01b2de.jpg`), never under the name
the client sent: the same picture sent twice is stored once, and these names can never collide with the
downloader's numbered files (`00000001.jpg`), so no lock is needed. Files are written atomically.

A body that fails is a row with a reason, never an exception; a bad class name or a folder that cannot be
written is a `CollectError`. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ursa._io import atomic_write_bytes, make_durable, sha256_file
from ursa.errors import BadImageError, CollectError
from ursa.imageio import NON_IMAGE_SUFFIXES, open_checked, sniff_image

__all__ = ["MAX_BYTES", "SOURCES", "Added", "add_images", "stored_name"]

SOURCES = ("upload", "webcam", "paste")  # where the bytes came from: the first part of the stored name
MAX_BYTES = 20 * 2**20  # largest body accepted by default (20 MiB), as CollectConfig.max_bytes


@dataclass
class Added:
    """What became of one file given to `add_images`."""

    given: str  # the client's file name, for the answer only (never used as a path)
    status: str  # "ok" | "duplicate" | "refused"
    reason: str = ""  # why refused / "same picture as <file>"
    file: str = ""  # stored name relative to the root, e.g. "cats/upload-3f2a9c01b2de.jpg" (also for a duplicate: the copy kept)

    def as_dict(self) -> dict[str, str]:
        return {"given": self.given, "status": self.status, "reason": self.reason, "file": self.file}


def stored_name(data: bytes, ext: str, *, source: str = "upload") -> str:
    """`<source>-<sha256[:12]><ext>`: the file name Ursa gives `data`."""
    return f"{source}-{hashlib.sha256(data).hexdigest()[:12]}{ext}"


def _check_class(root: Path, cls: str) -> Path:
    if not isinstance(cls, str) or not cls or cls in (".", "..") or cls.startswith(".") or any(c in cls for c in "/\\\0"):
        raise CollectError(f"{cls!r} is not a class folder name. Use a plain folder name such as 'cats' (no slashes, not starting with '.').")
    folder = root / cls
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CollectError(f"{folder} is not a folder. Move that file away, or choose another class name.")
    return folder


def _full_decode(data: bytes) -> str | None:
    """None when `data` decodes completely, else why not (truncated, damaged)."""
    try:
        with open_checked(data, name="the file") as im:
            im.load()
    except BadImageError as exc:
        return str(exc)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        return f"damaged or truncated image ({type(exc).__name__}: {exc})"
    return None


def _folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 -> file name of every image file directly in `folder` (the first by name wins)."""
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_symlink() or not p.is_file() or p.suffix.lower() in NON_IMAGE_SUFFIXES:
            continue
        try:
            out.setdefault(sha256_file(p), p.name)
        except OSError:
            continue  # unreadable: verify's business, not a duplicate
    return out


def add_images(root: str | os.PathLike[str], cls: str, files: Iterable[tuple[str, bytes]], *, source: str = "upload", max_bytes: int = MAX_BYTES) -> list[Added]:
    """Store each (client file name, bytes) of `files` in `root/cls/` (created if missing); one `Added` per file, in order.

    `source` (one of SOURCES) starts the stored names; `max_bytes` is the largest body accepted. Refused:
    bodies over `max_bytes`, bodies that are not an image (by content), decompression bombs and images that
    do not decode completely. Bytes already in the folder (by name, or by the sha256 of its files) are a
    "duplicate", stored once. Raises CollectError for a bad class name, a bad `source`, or a folder that
    cannot be written.
    """
    if source not in SOURCES:
        raise CollectError(f"source {source!r} is not one of {', '.join(SOURCES)}.")
    root = Path(root)
    folder = _check_class(root, cls)
    hashes: dict[str, str] | None = None  # computed on the first good file only
    out: list[Added] = []
    written: list[Path] = []
    for given, data in files:
        given = str(given)[:200]
        if len(data) > max_bytes:
            out.append(Added(given, "refused", f"{len(data) / 2**20:.1f} MiB is over the limit of {max_bytes / 2**20:g} MiB; send a smaller file"))
            continue
        try:
            ext, _, _ = sniff_image(bytes(data))
        except BadImageError as exc:
            out.append(Added(given, "refused", str(exc).replace("the server sent", "the file has")))
            continue
        why = _full_decode(bytes(data))
        if why is not None:
            out.append(Added(given, "refused", why))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if hashes is None:
            hashes = _folder_hashes(folder)
        same = hashes.get(digest)
        if same is not None:
            out.append(Added(given, "duplicate", f"same picture as {cls}/{same}", f"{cls}/{same}"))
            continue
        name = f"{source}-{digest[:12]}{ext}"
        for n in (16, 24, 64):  # a file of that name with other bytes (edited by hand) is never overwritten
            if not (folder / name).exists():
                break
            name = f"{source}-{digest[:n]}{ext}"
        rel = f"{cls}/{name}"
        try:
            path = atomic_write_bytes(folder / name, bytes(data), durable=False)
        except OSError as exc:
            raise CollectError(f"cannot write {folder / name}: {exc.strerror or exc}. Check that {folder} is a folder you can write to.") from None
        hashes[digest] = name
        written.append(path)
        out.append(Added(given, "ok", "", rel))
    if written:
        try:
            make_durable(written, root=folder)  # one sync for the whole batch (a webcam burst is dozens of frames)
        except OSError as exc:
            raise CollectError(f"cannot sync {folder}: {exc.strerror or exc}.") from None
    return out
