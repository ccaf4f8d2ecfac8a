"""Ursa: make your own image classifier on a laptop CPU.

The public API is re-exported lazily so `import ursa` stays cheap (the CLI and web server import
only what they use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "UrsaError": "ursa.errors",
    "ImageDataLoaders": "ursa.data.loaders",
    "DataBunch": "ursa.data.loaders",
    "Learner": "ursa.train.learner",
    "vision_learner": "ursa.train.learner",
    "train_run": "ursa.train.recipe",
    "error_rate": "ursa.train.metrics",
    "accuracy": "ursa.train.metrics",
    "create_backbone": "ursa.models",
    "load_model": "ursa.export",
    "ClassificationInterpretation": "ursa.interpret.analysis",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ursa' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
