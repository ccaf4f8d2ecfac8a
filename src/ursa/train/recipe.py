"""The default training recipe, CPU-fast: cached backbone features -> head, then optional fine-tuning.

It is the notebook's Learner (`ursa.train.learner.vision_learner`) driven by a TrainConfig, so `ursa
train` and a notebook train through one path:

1. Split the dataset (seeded); every bad input fails here, before anything is written.
2. `learn.features()`: backbone features once per image and view (cached on disk; see `features.py`).
   Small datasets get several augmented views per image, up to `view_budget` cached training samples,
   so a 10-shot set trains on ~10x more variety at the cost of one forward pass per view.
3. The head on the frozen body, on the whole cache: by default `learn.fit_lbfgs()`, a linear head fitted
   to convergence by L-BFGS (`head.py`; no learning rate or epoch count), or with `head="one_cycle"`
   `learn.fit_one_cycle(epochs)`. Evaluate with the plain and mirrored view averaged (test-time
   augmentation) when flips are allowed.
4. Optionally (`fine_tune` > 0) `learn.unfreeze()` and `learn.fit_one_cycle` on images with
   discriminative learning rates (mixed precision, channels-last and DDP are the Learner's callbacks).
5. Write the run folder, whole and only once the run has succeeded: config.json, split.json,
   history.csv, metrics.json, losses.png, predictions.csv, models/model.safetensors and (unless fine-tuned)
   models/open_set.safetensors; metrics.json carries the temperature and ECE fitted out of fold (`trust.py`).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ursa._io import atomic_write_bytes, atomic_write_json
from ursa.config import DataConfig, TrainConfig, to_dict
from ursa.data.split import Split, build_split, save_split
from ursa.errors import TrainError
from ursa.models import Backbone
from ursa.train import distributed as dist
from ursa.train.callbacks import Recorder
from ursa.train.features import FeatureData, prepare_backbone
from ursa.train.learner import Learner, vision_learner
from ursa.train.metrics import accuracy, error_rate

__all__ = ["RunResult", "train_run", "head_learner", "next_free_dir"]

FINE_TUNE_WD = 0.01  # AdamW weight decay of full fine-tuning (TrainConfig.wd is the one-cycle head's)


@dataclass
class RunResult:
    """What a run produced: its folder, final metrics and the trained model."""

    out: Path
    metrics: dict[str, Any]
    model: nn.Module
    classes: list[str]
    split: Split
    backbone: Backbone
    history: list[dict[str, Any]] = field(default_factory=list)


def next_free_dir(out: Path) -> Path:
    """`out` if it is absent or empty, else `out-2`, `out-3`, ...: a run never overwrites another."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    i = 2
    while True:
        cand = out.with_name(f"{out.name}-{i}")
        if not cand.exists():
            return cand
        i += 1


def head_learner(root: str | Path, data: DataConfig = DataConfig(), train: TrainConfig = TrainConfig(), *, progress: bool = True, console: Any = None) -> Learner:
    """The recipe's Learner, frozen, with its feature cache computed (for lr_find or custom schedules on
    the head: they run on the cache); nothing else written."""
    split = build_split(root, data)
    train, _ = _resolve_arch(split, train, data)
    backbone = prepare_backbone(train)
    learn = recipe_learner(split, backbone, train, data, out=Path("."), progress=progress, console=console)
    learn.features()
    return learn


def recipe_learner(split: Split, backbone: Backbone, train: TrainConfig, data: DataConfig, *, out: Path, progress: bool = True, console: Any = None, device: torch.device = torch.device("cpu"),
                   events: Callable[[dict[str, Any]], None] | None = None) -> Learner:  # fmt: skip
    """The image Learner a TrainConfig describes: `vision_learner` on `split`'s DataBunch (fine-tuning's
    batch size, input side, workers and augmentation) with the config's cache views, head batch size,
    dropout, weight decay and label smoothing, device, precision (when fine-tuning), channels-last and DDP.
    `events` receives progress and epoch dicts (see `ursa.train.callbacks.ProgressCallback`)."""
    from ursa.data.loaders import ImageDataLoaders

    dls = ImageDataLoaders.from_split(split, backbone.data_config, bs=train.batch_size, flip=data.flip, size=train.fine_tune_size, num_workers=train.num_workers, aug=data.aug)
    precision = dist.choose_precision(train.precision, device)[0] if train.fine_tune > 0 else "fp32"
    channels_last = device.type == "cuda" if train.channels_last is None else train.channels_last
    return vision_learner(dls, backbone, train=train, data=data, dropout=train.dropout, path=out, progress=progress, console=console, wd=train.wd, label_smoothing=train.label_smoothing,
                          device=device, precision=precision, channels_last=channels_last, ddp=dist.world_size() > 1, events=events)  # fmt: skip


def _tta_probs(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.stack([model(v).softmax(-1) for v in views]).mean(0)


def _write_predictions(path: Path, names: list[str], y: torch.Tensor, probs: torch.Tensor, classes: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "label", "pred", "prob", *[f"p_{c}" for c in classes]])
    for n, t, p in zip(names, y.tolist(), probs.tolist()):
        k = int(np.argmax(p))
        w.writerow([n, classes[t], classes[k], f"{p[k]:.6f}", *[f"{v:.6f}" for v in p]])
    atomic_write_bytes(path, buf.getvalue().encode())


def train_run(
    root: str | Path,
    out: str | Path,
    *,
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    progress: bool = True,
    console: Any = None,
    backbone: Backbone | None = None,
    split: Split | None = None,
    events: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train with the default recipe and write the run folder. Everything that can fail on bad input
    (dataset, weights) is checked first, and the run folder appears only once the run has succeeded,
    complete (`out`, or `out-2`, ... when that already holds a run; see `RunResult.out`).

    `events` (None: none) is called with dicts as the run goes: {"type": "stage", "stage"} at each step,
    {"type": "progress", "stage", "done", "total"} per feature chunk and per batch (feature passes are
    labelled "features train view 2 (pass 3/12)"), {"type": "epoch", **history row} per epoch."""
    say = events or (lambda ev: None)
    t0 = time.perf_counter()
    if train.head not in ("lbfgs", "one_cycle"):
        raise TrainError(f"unknown head solver {train.head!r}; use 'lbfgs' or 'one_cycle'.")
    if train.threads:
        torch.set_num_threads(train.threads)
    # under torchrun: join the process group; only rank 0 shows progress and writes the run folder
    device = dist.pick_device(train.device)
    dist.init(device)
    progress = progress and dist.is_main()
    say({"type": "stage", "stage": "reading the dataset"})
    split = split or build_split(root, data)
    train, choice = _resolve_arch(split, train, data) if backbone is None else (train, None)
    say({"type": "stage", "stage": "loading the backbone"})
    backbone = prepare_backbone(train, backbone)
    out = Path(out)  # nothing is written there until the run has succeeded (see _publish_run)
    learn = recipe_learner(split, backbone, train, data, out=out, progress=progress, console=console, device=device, events=events)

    t_feat = time.perf_counter()
    fd = learn.features()
    feat_s = time.perf_counter() - t_feat
    if len(fd.y_valid) == 0:
        first = "; ".join(f"{s.name}: {s.reason}" for s in fd.failed[:3])
        raise TrainError(f"no validation image could be decoded ({len(fd.failed)} files failed; {first}). Check them with `ursa verify {split.root}`, then train again.")

    # ---- stage 1: the head on cached features (the body is frozen) ----
    say({"type": "stage", "stage": "training the head"})
    if train.head == "lbfgs":
        learn.fit_lbfgs(c=train.c)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.seed)
            learn.fit_one_cycle(train.epochs, train.lr or 3e-3)
    model, head = learn.model, learn.model[1]
    probs = _tta_probs(head, fd.x_valid)
    stage = "head"
    trust = _fit_trust(fd, head, split.classes, train, data) if train.fine_tune == 0 and dist.is_main() else None

    # ---- stage 2 (optional): full fine-tuning on images ----
    runtime: dict[str, Any] = {"device": str(device), "world_size": dist.world_size()}
    if train.fine_tune > 0:
        say({"type": "stage", "stage": "fine-tuning"})
        probs = _fine_tune(learn, split, fd, train, data, device=device, runtime=runtime)
        stage = "fine_tune"
    model.cpu().eval()
    history, batch_losses = list(learn.recorder.rows), list(learn.recorder.batch_losses)

    y = fd.y_valid
    wall = time.perf_counter() - t0
    metrics = {
        "error_rate": error_rate(probs, y),
        "accuracy": accuracy(probs, y),
        "valid_loss": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y)),
        "n_train": len(fd.train_names),
        "n_valid": len(fd.valid_names),
        "n_skipped": len(split.skipped) + len(fd.failed),
        "classes": split.classes,
        "views": fd.views,
        "tta": len(fd.x_valid) > 1,
        "final_stage": stage,
        "feature_s": round(feat_s, 2),
        "wall_s": round(wall, 2),
    }
    metrics.update(_trust_metrics(trust, probs, y, fine_tuned=train.fine_tune > 0))
    if choice is not None:
        metrics["budget"] = choice  # what --arch auto / --budget picked, the estimates and why
    say({"type": "stage", "stage": "writing the run folder"})
    if dist.is_main():
        out = _publish_run(out, lambda folder: _write_run(folder, split, backbone, train, data, model, history, batch_losses, metrics, fd, probs, runtime=runtime, trust=trust))
    out = dist.broadcast(out)  # rank 0's folder, so every rank names the same one
    dist.barrier()  # the run folder is complete before any rank returns
    return RunResult(out, metrics, model, split.classes, split, backbone, history)


def _resolve_arch(split: Split, train: TrainConfig, data: DataConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """`ursa.train.budget.resolve_arch`: the backbone --arch auto / --budget picks (the config unchanged otherwise)."""
    from ursa.train.budget import resolve_arch

    return resolve_arch(split, train, data)


def _fit_trust(fd: FeatureData, head: nn.Module, classes: list[str], train: TrainConfig, data: DataConfig) -> Any:
    """The run's temperature and open-set detector, fitted out of fold on the training features
    (`ursa.train.trust`); on the single process that writes the run."""
    from ursa.train.trust import fit_trust

    return fit_trust(fd, head, n_classes=len(classes), solver=train.head, c=train.c, seed=data.seed)


def _trust_metrics(trust: Any, probs: torch.Tensor, y: torch.Tensor, *, fine_tuned: bool) -> dict[str, Any]:
    """metrics.json's `temperature`, `ece` (validation, 15 bins, before and after scaling) and `open_set`.
    A fine-tuned run is not calibrated: the cached features describe the body before fine-tuning."""
    from ursa.trust import ECE_BINS, expected_calibration_error

    if trust is not None:
        return dict(trust.info)
    e = round(expected_calibration_error(probs.numpy(), y.numpy()), 4)
    why = "not calibrated: the fine-tuned body is not the one the cached features describe" if fine_tuned else "calibrated by the process that writes the run (rank 0)"
    return {"temperature": 1.0, "ece": {"before": e, "after": e, "bins": ECE_BINS}, "calibration_note": why}


def _fine_tune(learn: Learner, split: Split, fd: FeatureData, train: TrainConfig, data: DataConfig, *, device: torch.device = torch.device("cpu"), runtime: dict[str, Any] | None = None) -> torch.Tensor:
    """`learn.unfreeze()` and one-cycle on images; returns the validation probabilities (with the mirrored
    view averaged in when flips and TTA are on). The images that failed to decode in the feature pass are
    left out of the loaders. Under torchrun: DDP, a DistributedSampler, and the global batch kept at the
    single-process size (each of N ranks takes bs / N), so the schedule means the same on 1 or N processes.
    `runtime` receives the precision chosen (and why) and the training throughput in images/s."""
    from ursa.data.loaders import ImageDataLoaders

    dls = learn.dls
    if fd.failed:
        good_train, good_valid = set(fd.train_names), set(fd.valid_names)
        clean = Split(split.root, [it for it in split.train if it.name in good_train], [it for it in split.valid if it.name in good_valid], split.classes, split.skipped, split.how, split.seed, split.valid_pct)
        dls = ImageDataLoaders.from_split(clean, learn.backbone.data_config, bs=train.batch_size, flip=data.flip, size=train.fine_tune_size, num_workers=train.num_workers, aug=data.aug)
    bs, train_dl, world = train.batch_size, dls.train, dist.world_size()
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(train_dl.dataset, num_replicas=world, rank=dist.rank(), shuffle=True, seed=data.seed)
        per = max(1, bs // world)
        nw = train_dl.num_workers
        train_dl = DataLoader(train_dl.dataset, batch_size=per, sampler=sampler, drop_last=len(sampler) > per, collate_fn=train_dl.collate_fn, num_workers=nw, persistent_workers=nw > 0)
    learn.dls, learn.train_dl, learn.valid_dl, learn.preprocess = dls, train_dl, dls.valid, dls.preprocess
    learn.loss_func = lambda out, y: F.cross_entropy(out, y, label_smoothing=train.fine_tune_label_smoothing)
    learn.wd, learn.bn_eval = FINE_TUNE_WD, learn.model  # every BatchNorm, the head's too, keeps its statistics
    learn.unfreeze()
    lr = train.fine_tune_lr
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        learn.fit_one_cycle(train.fine_tune, slice(lr / 100, lr), pct_start=0.3, div=10)
    probs, _ = learn.get_preds()
    if data.flip and train.tta:
        from ursa.data.transforms import flip_view

        flipped, _ = learn.get_preds((flip_view(xb), yb) for xb, yb in dls.valid)
        probs = (probs + flipped) / 2
    if runtime is not None:
        precision, why = dist.choose_precision(train.precision, device)
        ips = learn.train_samples / learn.train_seconds if learn.train_seconds > 0 else float("nan")
        runtime.update({"precision": why, "channels_last": learn.channels_last, "fine_tune_images_per_s": round(ips, 2), "fine_tune_train_s": round(learn.train_seconds, 3)})
    return probs


def _publish_run(out: Path, write: Callable[[Path], None]) -> Path:
    """Write a run into a hidden staging folder beside `out`, then rename it to `next_free_dir(out)`.

    A run that fails or is killed half-way never leaves a half-written run folder under the name
    asked for: the folder appears whole, or not at all. Returns the folder written.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    stage.mkdir()
    try:
        write(stage)
        while True:
            target = next_free_dir(out)
            try:
                if target.is_dir():
                    target.rmdir()  # empty (next_free_dir); fails if a file arrived meanwhile
                os.rename(stage, target)
                return target
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another run took that name meanwhile: take the next one
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)  # only this run's own staging files


def _write_run(out: Path, split: Split, backbone: Backbone, train: TrainConfig, data: DataConfig, model: nn.Module, history: list[dict[str, Any]], batch_losses: list[float], metrics: dict[str, Any], fd: FeatureData, probs: torch.Tensor, *, runtime: dict[str, Any] | None = None, trust: Any = None) -> None:
    from safetensors.torch import save

    from ursa.trust import DETECTOR_FILE, detector_to_bytes

    config = {
        "root": str(split.root.resolve()),  # absolute: export, interpret and report may run from another folder
        "data": to_dict(data),
        "train": to_dict(train),
        "arch": backbone.arch,
        "timm_name": backbone.timm_name,
        "weights": backbone.weights,
        "num_features": backbone.num_features,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()},
        "classes": split.classes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "runtime": runtime or {},  # device, processes, precision and its reason, fine-tuning images/s
        "budget": metrics.get("budget"),  # --arch auto / --budget: what was picked and why (None: the arch was named)
    }
    atomic_write_json(out / "config.json", config)
    save_split(split, out / "split.json")
    rec = Recorder()
    rec.rows, rec.batch_losses = history, batch_losses
    rec.to_csv(out / "history.csv")
    rec.plot_loss(out / "losses.png")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "models" / "model.safetensors", save(state, metadata={"classes": json.dumps(split.classes), "arch": backbone.arch}))
    if trust is not None and trust.detector is not None:
        atomic_write_bytes(out / "models" / DETECTOR_FILE, detector_to_bytes(trust.detector))
    _write_predictions(out / "predictions.csv", fd.valid_names, fd.y_valid, probs, split.classes)
    skipped = [[s.name, s.reason] for s in split.skipped] + [[s.name, s.reason] for s in fd.failed]
    if skipped:
        buf = io.StringIO()
        csv.writer(buf).writerows([["name", "reason"], *skipped])
        atomic_write_bytes(out / "skipped.csv", buf.getvalue().encode())
    atomic_write_json(out / "metrics.json", metrics)
