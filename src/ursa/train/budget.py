"""`--arch auto` and `--budget SECONDS`: the most accurate packaged backbone whose cached features fit a time budget.

On a frozen backbone nearly all of a run's time is the feature pass (one forward per image and view), so
the cost of a backbone on a dataset is, per cached sample, its decode (the evaluation transform for the
plain and mirrored views and the validation images, the training augmentation for the other views)
plus the forward pass, and a few seconds for the head, calibration and writing. The
forward time is measured at the start with a quick probe of EfficientNet-Lite0 on this machine, now
(three batches of 16 at its input side, after a warm-up), and scaled for Lite1 and Lite2 by a stored
table of their relative cost (RELATIVE_COST: the ratio of their floating-point operations per image at
their own input sides, 0.77, 1.20 and 1.72 GFLOP by torch's FlopCounterMode; a stored ratio is steadier
than timing three backbones on a busy machine); decoding is timed on a few of the dataset's own images.

The choice, most accurate first (ImageNet top-1: Lite2 > Lite1 > Lite0), keeps at least the plain and
mirrored views while a larger backbone fits, then gives Lite0 fewer views, down to one. A budget under
what Lite0 with one view needs is an error naming that minimum. With no budget, "auto" takes 1.5x the
estimate of the default recipe (Lite0, its usual views), so auto never costs much more than today's
default. The pick, the estimates and the reason are recorded in config.json and metrics.json
(`budget`); the run is then trained as if that backbone had been named, so it is deterministic given
the seed and the choice. A named `--arch` always wins over `--budget`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import torch

from ursa.config import DataConfig, TrainConfig
from ursa.data.split import Split
from ursa.errors import BadImageError, TrainError
from ursa.train import distributed as dist
from ursa.train.features import views_for

__all__ = ["ACCURACY_ORDER", "RELATIVE_COST", "OVERHEAD_S", "resolve_arch", "estimate", "probe"]

ACCURACY_ORDER = ("efficientnet_lite2", "efficientnet_lite1", "efficientnet_lite0")  # most accurate first
RELATIVE_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.56, "efficientnet_lite2": 2.24}  # FLOPs per image vs Lite0, each at its own input side
OVERHEAD_S = 3.0  # loading the backbone, fitting and calibrating the head, writing the run (seconds)
DEFAULT_FACTOR = 1.5  # "auto" with no budget: this times the default recipe's estimate


def probe(split: Split, *, aug: Any = None, n_images: int = 8, repeats: int = 3, batch: int = 16) -> dict[str, float]:
    """Seconds per image on this machine now: `forward` of EfficientNet-Lite0 at its input side (the median
    of `repeats` timed batches of `batch` after a warm-up: on a shared machine the run will see the load
    the probe sees, and the fastest pass underestimated whole runs by 2x),
    `decode` (open + evaluation transform: the plain and mirrored views) and `augment` (open + the
    training augmentation `aug`: every other view), each the mean over up to `n_images` of the dataset's
    training images."""
    from ursa.data.transforms import eval_transform, open_image, train_transform
    from ursa.imageio import eval_min_side
    from ursa.models import create_backbone

    bb = create_backbone("efficientnet_lite0")
    side = int(bb.data_config["input_size"][-1])
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        bb.model(x)  # warm-up: the first pass allocates and picks kernels
        for _ in range(repeats):
            t = time.perf_counter()
            bb.model(x)
            times.append((time.perf_counter() - t) / len(x))
    sample = [split.root / it.name for it in split.train[:: max(1, len(split.train) // n_images)][:n_images]]

    def timed(tf: Any, min_side: int) -> float:
        took: list[float] = []
        for path in sample:
            t = time.perf_counter()
            try:
                tf(open_image(path, min_side=min_side))
            except BadImageError:
                continue
            took.append(time.perf_counter() - t)
        return statistics.fmean(took) if took else 0.0

    decode = timed(eval_transform(bb.data_config), eval_min_side(bb.data_config))
    augment = timed(train_transform(bb.data_config, **({"aug": aug} if aug is not None else {})), side)
    return {"forward": statistics.median(times), "decode": decode, "augment": augment}


def _samples(split: Split, train: TrainConfig, data: DataConfig, n_views: int | None = None) -> tuple[tuple[int, int], int]:
    """((plain samples, augmented samples), train views) of a run: the plain (and mirrored) views of the
    training images and the validation images' evaluation views, then the augmented training views."""
    views = views_for(len(split.train), max_views=train.views, budget=train.view_budget, flip=data.flip)
    v = len(views) if n_views is None else n_views
    n_plain = 2 if data.flip else 1  # the plain and mirrored views come from the evaluation transform
    eval_views = 2 if (train.tta and data.flip) else 1
    n_tr = len(split.train)
    return (n_tr * min(v, n_plain) + len(split.valid) * eval_views, n_tr * max(0, v - n_plain)), v


def estimate(arch: str, samples: tuple[int, int], costs: dict[str, float]) -> float:
    """Seconds a run with (plain, augmented) cached feature `samples` takes on `arch`, from the probe's `costs`."""
    plain, augmented = samples
    forward = costs["forward"] * RELATIVE_COST[arch]
    return OVERHEAD_S + plain * (costs["decode"] + forward) + augmented * (costs.get("augment", costs["decode"]) + forward)


def resolve_arch(split: Split, train: TrainConfig, data: DataConfig, *, costs: dict[str, float] | None = None) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(the TrainConfig to train with, the `budget` record or None). With arch="auto", the backbone and
    views the budget allows (see the module docstring), probed on rank 0 and shared with every rank; with a
    named arch and a budget, the named arch (recorded as such); otherwise `train` unchanged and None."""
    if train.arch != "auto":
        if train.budget is None:
            return train, None
        return train, {"seconds": train.budget, "arch": train.arch, "why": f"--arch {train.arch} was named: it wins over --budget (no probe)"}
    if dist.is_main():
        choice = _choose(split, train, data, costs if costs is not None else probe(split, aug=data.aug))
    else:
        choice = None
    choice = dist.broadcast(choice)
    if "error" in choice:
        raise TrainError(choice["error"])
    n_views = choice["views"]
    picked = dataclasses.replace(train, arch=choice["arch"], view_budget=max(1, len(split.train) * n_views))
    return picked, choice


def _choose(split: Split, train: TrainConfig, data: DataConfig, costs: dict[str, float]) -> dict[str, Any]:
    full_samples, full_views = _samples(split, train, data)
    default_s = estimate("efficientnet_lite0", full_samples, costs)
    budget = train.budget if train.budget is not None else DEFAULT_FACTOR * default_s
    keep = min(full_views, 2)  # a larger backbone keeps at least the plain and mirrored views
    candidates = [(a, v) for a in ACCURACY_ORDER for v in range(full_views, keep - 1, -1)]
    candidates += [("efficientnet_lite0", v) for v in range(keep - 1, 0, -1)]
    estimates = {a: round(estimate(a, full_samples, costs), 1) for a in ACCURACY_ORDER}
    record: dict[str, Any] = {
        "seconds": round(budget, 1),
        "default_budget": train.budget is None,
        "probe_s_per_image": {k: round(v, 5) for k, v in costs.items()},
        "relative_cost": dict(RELATIVE_COST),
        "estimates_s": estimates,  # each backbone with the recipe's usual views
    }
    for arch, v in candidates:
        samples, _ = _samples(split, train, data, v)
        est = estimate(arch, samples, costs)
        if est <= budget:
            better = [a for a in ACCURACY_ORDER[: ACCURACY_ORDER.index(arch)]]
            why = f"{arch} with {v} view(s) per training image is estimated at {est:.0f} s, within {budget:.0f} s"
            if better:
                why += f"; the more accurate {', '.join(better)} would not fit"
            return {**record, "arch": arch, "views": v, "estimate_s": round(est, 1), "why": why}
    smallest, _ = _samples(split, train, data, 1)
    need = math.ceil(estimate("efficientnet_lite0", smallest, costs))
    return {"error": f"--budget {budget:g} s is below what the smallest backbone needs for this dataset on this machine now: about {need} s (efficientnet_lite0, one view of {len(split.train)} training and {len(split.valid)} validation images). Pass --budget {need} or more, or leave --budget out."}
