"""Frozen dataclasses, one per stage. The CLI fills them; library functions take them.

Each field has one comment saying what it means and its unit. Defaults are the recipe a user gets
when they pass nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataConfig", "TrainConfig", "to_dict"]


@dataclass(frozen=True)
class DataConfig:
    """How a dataset is read and split."""

    train: str | None = None  # sub-folder holding the training class folders (None: one folder, split at random)
    valid: str | None = None  # sub-folder holding the validation class folders (with `train`)
    labels: str | None = None  # CSV `name,label` (names relative to the root) instead of class folders
    valid_pct: float = 0.2  # share of each class held out for validation when splitting at random, in (0, 1)
    seed: int = 42  # seeds the split, the augmentations and the training
    flip: bool = True  # horizontal flips in augmentation (turn off for digits, text, left/right classes)
    allow_new_labels: bool = False  # accept CSV labels that are not class folders under the root


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. The default trains on cached backbone features, then optionally fine-tunes."""

    arch: str = "efficientnet_lite0"  # registry name (see `ursa.models.ARCHS`) or any timm model name
    weights: str | None = None  # weights file (.safetensors or .pth state dict) for a non-packaged backbone
    epochs: int = 12  # epochs of head training on the feature cache
    lr: float | None = None  # peak learning rate of the head stage; None: the recipe's default
    views: int = 4  # augmented views per training image in the feature cache (plus the plain view)
    tune_blocks: int = 1  # last backbone stages trained on cached activations (0: a linear head only)
    fine_tune: int = 0  # epochs of full fine-tuning after the cached stage (unfrozen, discriminative lrs)
    fine_tune_lr: float = 1e-3  # peak learning rate of the last layer group in full fine-tuning
    batch_size: int = 64  # images per batch for feature extraction and fine-tuning
    threads: int | None = None  # torch CPU threads; None: all cores
    tta: bool = True  # average plain and flipped views when evaluating (only with DataConfig.flip)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form options recorded in config.json


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)
