"""The default training recipe, CPU-fast: cached backbone features -> head, then optional fine-tuning.

1. Split the dataset (seeded); every bad input fails here, before anything is written.
2. Compute backbone features once per image and view (cached on disk; see `features.py`). Small
   datasets get several augmented views per image, up to `view_budget` cached training samples, so
   a 10-shot set trains on ~10x more variety at the cost of one forward pass per view.
3. Fit the head on the whole cache: by default a linear head fitted to convergence by L-BFGS
   (`head.py`; no learning rate or epoch count), or with `head="one_cycle"` by mini-batch epochs on the
   same Learner. Evaluate with the plain and mirrored view averaged (test-time augmentation) when flips
   are allowed.
4. Optionally (`fine_tune` > 0) fine-tune the whole network on images with discriminative learning rates,
   on the same Learner class (mixed precision, channels-last and DDP are its callbacks).
5. Write the run folder, whole and only once the run has succeeded: config.json, split.json,
   history.csv, metrics.json, losses.png, predictions.csv and models/model.safetensors.
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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ursa._io import atomic_write_bytes, atomic_write_json
from ursa.config import DataConfig, TrainConfig, to_dict
from ursa.data.split import Split, build_split, save_split
from ursa.errors import TrainError
from ursa.models import Backbone, Head, body_groups
from ursa.train import distributed as dist
from ursa.train.callbacks import Recorder
from ursa.train.features import FeatureData, cached_features, prepare_backbone
from ursa.train.head import fit_linear_head
from ursa.train.learner import Learner
from ursa.train.metrics import accuracy, error_rate

__all__ = ["RunResult", "train_run", "head_learner", "next_free_dir"]


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
    """A Learner for the head stage on cached features (for lr_find or custom schedules); nothing written."""
    split = build_split(root, data)
    backbone = prepare_backbone(train)
    bar = _FeatureProgress(enabled=progress, console=console)
    fd = cached_features(split, backbone, train, data, progress=bar.update)
    bar.close()
    return _make_head_learner(fd, split, backbone, train, data, Path("."), progress)


def _make_head_learner(fd: FeatureData, split: Split, backbone: Backbone, train: TrainConfig, data: DataConfig, out: Path, progress: bool) -> Learner:
    gen = torch.Generator().manual_seed(data.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        head = Head(backbone.num_features, len(split.classes), dropout=train.dropout)
    bs = train.head_batch_size
    train_dl = DataLoader(TensorDataset(fd.x_train, fd.y_train), batch_size=bs, shuffle=True, generator=gen, drop_last=len(fd.y_train) > bs)
    valid_dl = DataLoader(TensorDataset(fd.x_valid[0], fd.y_valid), batch_size=512)
    return Learner(head, train_dl, valid_dl, classes=split.classes, path=out, progress=progress, stage="head", wd=train.wd, label_smoothing=train.label_smoothing)


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
) -> RunResult:
    """Train with the default recipe and write the run folder. Everything that can fail on bad input
    (dataset, weights) is checked first, and the run folder appears only once the run has succeeded,
    complete (`out`, or `out-2`, ... when that already holds a run; see `RunResult.out`)."""
    t0 = time.perf_counter()
    if train.threads:
        torch.set_num_threads(train.threads)
    # under torchrun: join the process group; only rank 0 shows progress and writes the run folder
    device = dist.pick_device(train.device)
    dist.init(device)
    progress = progress and dist.is_main()
    split = split or build_split(root, data)
    backbone = prepare_backbone(train, backbone)
    out = Path(out)  # nothing is written there until the run has succeeded (see _publish_run)

    bar = _FeatureProgress(enabled=progress, console=console)
    t_feat = time.perf_counter()
    fd = cached_features(split, backbone, train, data, progress=bar.update, device=device)
    bar.close()
    feat_s = time.perf_counter() - t_feat
    if len(fd.y_valid) == 0:
        first = "; ".join(f"{s.name}: {s.reason}" for s in fd.failed[:3])
        raise TrainError(f"no validation image could be decoded ({len(fd.failed)} files failed; {first}). Check them with `ursa verify {split.root}`, then train again.")

    # ---- stage 1: the head on cached features ----
    learn = _make_head_learner(fd, split, backbone, train, data, out, progress)
    head = learn.model
    if train.head == "lbfgs":
        fit_linear_head(learn, c=train.c)
    elif train.head == "one_cycle":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.seed)
            learn.fit_one_cycle(train.epochs, train.lr or 3e-3)
    else:
        raise TrainError(f"unknown head solver {train.head!r}; use 'lbfgs' or 'one_cycle'.")
    probs = _tta_probs(head, fd.x_valid)
    history = list(learn.recorder.rows)
    batch_losses = list(learn.recorder.batch_losses)
    model = nn.Sequential(backbone.model, head).eval()
    stage = "head"

    # ---- stage 2 (optional): full fine-tuning on images ----
    runtime: dict[str, Any] = {"device": str(device), "world_size": dist.world_size()}
    if train.fine_tune > 0:
        probs, ft_rows, ft_losses = _fine_tune(model, backbone, head, split, fd, train, data, out, progress, device=device, runtime=runtime)
        history += ft_rows
        batch_losses += ft_losses
        stage = "fine_tune"
    model.cpu()

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
    if dist.is_main():
        out = _publish_run(out, lambda folder: _write_run(folder, split, backbone, train, data, model, history, batch_losses, metrics, fd, probs, runtime=runtime))
    out = dist.broadcast(out)  # rank 0's folder, so every rank names the same one
    dist.barrier()  # the run folder is complete before any rank returns
    return RunResult(out, metrics, model, split.classes, split, backbone, history)


def _fine_tune(model: nn.Module, backbone: Backbone, head: Head, split: Split, fd: FeatureData, train: TrainConfig, data: DataConfig, out: Path, progress: bool, *, device: torch.device = torch.device("cpu"), runtime: dict[str, Any] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]], list[float]]:
    """Full fine-tuning on images. Under torchrun: DDP, a DistributedSampler, and the global batch kept at
    the single-process size (each of N ranks takes bs / N), so the schedule means the same on 1 or N processes.
    `runtime` receives the precision chosen (and why) and the training throughput in images/s."""
    from ursa.data.loaders import ImageDataLoaders

    if train.head == "lbfgs":
        head.drop.p = 0.0  # the fitted head never saw dropout; keep its logits as they were fitted
    good_train = set(fd.train_names)
    good_valid = set(fd.valid_names)
    clean = Split(split.root, [it for it in split.train if it.name in good_train], [it for it in split.valid if it.name in good_valid], split.classes, split.skipped, split.how, split.seed, split.valid_pct)
    bs = train.batch_size
    dls = ImageDataLoaders.from_split(clean, backbone.data_config, bs=bs, flip=data.flip, size=train.fine_tune_size, num_workers=train.num_workers)
    train_dl, world = dls.train, dist.world_size()
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(train_dl.dataset, num_replicas=world, rank=dist.rank(), shuffle=True, seed=data.seed)
        per = max(1, bs // world)
        nw = train_dl.num_workers
        train_dl = DataLoader(train_dl.dataset, batch_size=per, sampler=sampler, drop_last=len(sampler) > per, collate_fn=train_dl.collate_fn, num_workers=nw, persistent_workers=nw > 0)
    channels_last = device.type == "cuda" if train.channels_last is None else train.channels_last
    model.to(device=device, memory_format=torch.contiguous_format)  # feature extraction left the backbone channels-last; start from one layout
    precision, why = dist.choose_precision(train.precision, device)
    learn = Learner(model, train_dl, dls.valid, classes=split.classes, groups=[*body_groups(backbone.model, 2), list(head.parameters())], path=out, progress=progress, stage="fine_tune",
                    label_smoothing=train.fine_tune_label_smoothing, preprocess=dls.preprocess, bn_eval=model, device=device, precision=precision, channels_last=channels_last, ddp=world > 1)  # fmt: skip
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
        ips = learn.train_samples / learn.train_seconds if learn.train_seconds > 0 else float("nan")
        runtime.update({"precision": why, "channels_last": channels_last, "fine_tune_images_per_s": round(ips, 2), "fine_tune_train_s": round(learn.train_seconds, 3)})
    return probs, list(learn.recorder.rows), list(learn.recorder.batch_losses)


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


def _write_run(out: Path, split: Split, backbone: Backbone, train: TrainConfig, data: DataConfig, model: nn.Module, history: list[dict[str, Any]], batch_losses: list[float], metrics: dict[str, Any], fd: FeatureData, probs: torch.Tensor, *, runtime: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save

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
    }
    atomic_write_json(out / "config.json", config)
    save_split(split, out / "split.json")
    rec = Recorder()
    rec.rows, rec.batch_losses = history, batch_losses
    rec.to_csv(out / "history.csv")
    rec.plot_loss(out / "losses.png")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "models" / "model.safetensors", save(state, metadata={"classes": json.dumps(split.classes), "arch": backbone.arch}))
    _write_predictions(out / "predictions.csv", fd.valid_names, fd.y_valid, probs, split.classes)
    skipped = [[s.name, s.reason] for s in split.skipped] + [[s.name, s.reason] for s in fd.failed]
    if skipped:
        buf = io.StringIO()
        csv.writer(buf).writerows([["name", "reason"], *skipped])
        atomic_write_bytes(out / "skipped.csv", buf.getvalue().encode())
    atomic_write_json(out / "metrics.json", metrics)


class _FeatureProgress:
    """One Rich progress bar per feature-extraction pass."""

    def __init__(self, *, enabled: bool, console: Any = None):
        self.enabled, self.console = enabled, console
        self._p: Any = None
        self._tasks: dict[str, Any] = {}

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._p is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=self.console)
            self._p.start()
        if label not in self._tasks:
            self._tasks[label] = self._p.add_task(label, total=total)
        self._p.update(self._tasks[label], completed=done)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
