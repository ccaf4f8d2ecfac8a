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
    "LessonError",
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


class LessonError(UrsaError):
    """The teaching lessons."""
