"""Frozen dataclasses, one per stage. The CLI fills them; library functions take them.

Each field has one comment saying what it means and its unit. Defaults are the recipe a user gets
when they pass nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataConfig", "TrainConfig", "CollectConfig", "VerifyConfig", "to_dict"]


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
    head: str = "lbfgs"  # head solver: "lbfgs" (linear head fitted to convergence) or "one_cycle" (SGD epochs)
    c: float = 0.5  # inverse L2 strength of the lbfgs head (as scikit-learn's C): larger fits the cache harder
    epochs: int = 12  # epochs of head training on the feature cache (head="one_cycle")
    lr: float | None = None  # peak learning rate of the one-cycle head stage; None: 3e-3
    views: int = 8  # most augmented views per training image in the feature cache (small sets get more)
    fine_tune: int = 0  # epochs of full fine-tuning after the cached stage (unfrozen, discriminative lrs)
    fine_tune_lr: float = 1e-4  # peak learning rate of the head in full fine-tuning (the body gets 1/10 and 1/100)
    size: int | None = None  # input side in pixels; None: the backbone's own (224 for EfficientNet-Lite0)
    batch_size: int = 64  # images per batch for feature extraction and fine-tuning
    threads: int | None = None  # torch CPU threads; None: all cores
    tta: bool = True  # average plain and flipped views when evaluating (only with DataConfig.flip)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form options recorded in config.json


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


# A current desktop browser's User-Agent: many image hosts refuse or throttle clients that do not send one.
_BROWSER_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


@dataclass(frozen=True)
class CollectConfig:
    """How images are downloaded: limits, politeness and retries. See `ursa.collect.download`."""

    max_images: int | None = None  # most good images to keep per class, counting earlier runs (None: every URL)
    concurrency: int = 64  # downloads in flight at once, over all hosts
    per_host: int = 8  # downloads in flight at once to one host (scheme, name and port)
    timeout: float = 10.0  # seconds to connect, and seconds allowed between two reads of a response
    total_timeout: float = 30.0  # seconds allowed for a whole response, so a slow drip cannot hold a slot
    retries: int = 2  # extra tries after a transient failure (connection reset, 429, 5xx); read timeouts are not retried
    backoff: float = 0.25  # seconds before the first retry, doubled for each further retry (or the server's Retry-After, up to 30 s)
    max_redirects: int = 5  # redirects followed per URL before it fails
    max_bytes: int = 20 * 2**20  # largest response body kept, in bytes (20 MiB)
    max_pixels: int = 89_478_485  # largest width x height accepted (Pillow's decompression-bomb limit)
    user_agent: str = _BROWSER_UA  # User-Agent header sent with every request
    retry_failed: bool = False  # also try again the URLs an earlier run recorded as failed
    processes: int | None = None  # processes doing the HTTP work, this one included (None: up to 4 by CPU count, for 400+ URLs; 1: this one only)


@dataclass(frozen=True)
class VerifyConfig:
    """How a dataset folder is checked and repaired. See `ursa.verify`."""

    max_size: int | None = None  # longest side in pixels; larger images are shrunk to it (None: keep sizes)
    max_pixels: int = 89_478_485  # largest width x height decoded; larger files are quarantined as decompression bombs
    quality: int = 90  # JPEG/WebP quality (1-95) used when a repaired or shrunk image is written again
    repair: bool = True  # fix orientation, colour mode and truncation; False: only report and quarantine
