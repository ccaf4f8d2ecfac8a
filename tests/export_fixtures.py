"""Builders shared by the export and serving tests: one tiny trained run and its export per session.

Memoized at module level (not only by fixture scope) because several test modules import these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import draw_example, make_dataset


@dataclass
class Built:
    data: Path  # dataset root
    run: Path  # training run folder
    export: Path  # export folder (fp32)
    result: Any  # ursa.train.recipe.RunResult (the in-memory model)
    onnx_bytes: bytes  # model.onnx, for tests that re-export without converting again
    photo: Path  # a 500x375 JPEG of class 0 ("bear")


_BUILT: dict[str, Built] = {}


def build(base: Path) -> Built:
    """Train efficientnet_lite0 at 64 px for 2 epochs on 3 classes x 8 generated images, and export it."""
    if "b" in _BUILT:
        return _BUILT["b"]
    from ursa.config import DataConfig, TrainConfig
    from ursa.export import export_run
    from ursa.train.recipe import train_run

    data = make_dataset(base / "data", classes=3, per_class=8, size=64, fmt="jpg")
    res = train_run(data, base / "runs" / "tiny", data=DataConfig(seed=0), train=TrainConfig(arch="efficientnet_lite0", size=64, epochs=2, views=2), progress=False)
    exp = export_run(res.out, base / "models" / "tiny")
    photo = base / "photo.jpg"
    draw_example(0, 99, size=400).resize((500, 375)).save(photo, quality=90)
    _BUILT["b"] = Built(data, res.out, exp.out, res, (exp.out / "model.onnx").read_bytes(), photo)
    return _BUILT["b"]
