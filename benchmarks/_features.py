"""The default recipe's cached features of a dataset, for the benchmarks that work on features (run as scripts,
so this folder is on sys.path): label_noise.py and active_learning.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ursa.config import DataConfig, TrainConfig
from ursa.data.split import build_split
from ursa.train.features import cached_features, prepare_backbone


def default_features(root: Path, *, train: str, valid: str) -> tuple[Any, Any, DataConfig, TrainConfig, float]:
    """(split, FeatureData, DataConfig, TrainConfig, seconds the features took) of `root` laid out as
    `train`/`valid` folders, with `ursa train`'s defaults; the features come from the on-disk cache, computed
    once when missing."""
    data, tcfg = DataConfig(train=train, valid=valid), TrainConfig()
    split = build_split(root, data)
    backbone = prepare_backbone(tcfg)
    t0 = time.perf_counter()
    fd = cached_features(split, backbone, tcfg, data)
    return split, fd, data, tcfg, time.perf_counter() - t0
