"""Ursa: make your own image classifier on a laptop CPU.

The public API is re-exported lazily so `import ursa` stays cheap (the CLI and web server import
only what they use). The lesson's notebook lines import from here with fastai's names:
`from ursa import download_images, verify_images, ImageDataLoaders, aug_transforms, vision_learner,
error_rate, accuracy, ClassificationInterpretation, ImageCleaner, load_learner`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "UrsaError": "ursa.errors",
    "download_images": "ursa.notebook",
    "verify_images": "ursa.notebook",
    "ImageDataLoaders": "ursa.data.loaders",
    "DataBunch": "ursa.data.loaders",
    "aug_transforms": "ursa.data.transforms",
    "Learner": "ursa.train.learner",
    "NotebookLearner": "ursa.notebook",
    "vision_learner": "ursa.notebook",
    "cnn_learner": "ursa.notebook",
    "train_run": "ursa.train.recipe",
    "error_rate": "ursa.train.metrics",
    "accuracy": "ursa.train.metrics",
    "create_backbone": "ursa.models",
    "ClassificationInterpretation": "ursa.interpret.analysis",
    "ImageCleaner": "ursa.interpret.widgets",
    "load_learner": "ursa.notebook",
    "load_model": "ursa.export",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ursa' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
