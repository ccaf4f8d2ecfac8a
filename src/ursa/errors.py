"""Errors Ursa raises on bad input. Every message says what was wrong and what to do about it.

The CLI turns any `UrsaError` into its message on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

__all__ = [
    "UrsaError",
    "CollectError",
    "VerifyError",
    "DataError",
    "ModelError",
    "TrainError",
    "InterpretError",
    "ReviewError",
    "ExportError",
    "ServeError",
    "StudioError",
    "LessonError",
    "BadImageError",
    "NotAnImageError",
    "ImageTooLargeError",
]


class UrsaError(Exception):
    """Base class: a problem with the user's input or environment, with a message that names the fix."""

    exit_code = 2


class CollectError(UrsaError):
    """URL lists, search providers, downloads."""


class VerifyError(UrsaError):
    """Image verification and repair."""


class DataError(UrsaError):
    """Datasets: folders, label CSVs, splits, transforms."""


class ModelError(UrsaError):
    """Backbones and weights."""


class TrainError(UrsaError):
    """Training runs, checkpoints, schedules."""


class InterpretError(UrsaError):
    """Interpretation and issue finding."""


class ReviewError(UrsaError):
    """Reviewing and applying dataset changes."""


class ExportError(UrsaError):
    """Export folders and predictors."""


class ServeError(UrsaError):
    """The web apps."""


class StudioError(UrsaError):
    """The studio: its project folder (class names, images, runs) and its jobs."""


class LessonError(UrsaError):
    """The teaching lessons."""


class BadImageError(UrsaError):
    """Decode errors, in every stage: a file or upload that is not an image Pillow can decode, or is damaged."""


class NotAnImageError(BadImageError):
    """The bytes are in no image format Pillow knows (an HTML page, text, an unknown format)."""


class ImageTooLargeError(BadImageError):
    """The header claims more pixels than the one limit every stage shares (a decompression-bomb guard)."""
