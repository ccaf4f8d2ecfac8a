"""Training callbacks: what happens around the Learner's short loop, one idea per class.

The Learner (`ursa.train.learner`) calls every callback's hooks, in order, at fixed points, passing itself:

    after_create                         once, when the Learner is made
    before_fit                           each fit (fit_one_cycle, fit, fine_tune's stages)
      before_epoch
        before_batch                     learn.xb / learn.yb are on the learner's device
        (forward: learn.pred = learn.net(learn.xb))
        after_pred                       also when the forward raised
        (learn.loss = learn.loss_grad = loss_func(pred, yb))
        before_backward                  (learn.loss_grad.backward())
        before_step                      raise CancelStep to skip the optimizer's own step
        after_batch                      learn.last_loss, learn.last_lr
      after_train                        learn.loss_sum / learn.n_samples: the epoch's training loss
      after_epoch                        learn.last_metrics: the validation
    after_fit                            also when the fit failed

get_preds and predict run before_batch and after_pred around their forward pass too, with
`learn.training` False. Here: the Recorder (history.csv, which path trained, loss and lr_find curves),
the progress displays (epochs and feature extraction), and the three that make the same loop fast on
any machine: channels-last batches, mixed precision (autocast, with gradient scaling for fp16) and
DistributedDataParallel under torchrun.

The progress displays are Rich's: in a terminal they draw in place, and in Jupyter Rich draws them in
the notebook (through ipywidgets), so no second progress library is needed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ursa._io import atomic_write_bytes
from ursa.errors import TrainError
from ursa.train import distributed as dist

__all__ = ["Callback", "CancelStep", "Recorder", "LRFind", "ProgressCallback", "FeatureProgress", "ChannelsLast", "MixedPrecision", "DistributedTraining", "HISTORY_COLUMNS", "CACHED", "NETWORK"]

# `path`: what ran the epoch, "cached-features" (the head on the feature cache) or "network" (images
# through the whole model); other metrics a Learner was given follow these columns
HISTORY_COLUMNS = ["stage", "epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "lr", "seconds", "path"]
CACHED, NETWORK = "cached-features", "network"
_NOT_COLUMNS = {"batches", "iterations"}  # row bookkeeping, not written to history.csv


class CancelStep(Exception):
    """Raised by a before_step hook that stepped the optimizer itself (MixedPrecision's gradient scaler)."""


class Callback:
    """Base class; every hook is optional. `learn` is the `ursa.train.learner.Learner` being trained."""

    def after_create(self, learn: Any) -> None: ...
    def before_fit(self, learn: Any) -> None: ...
    def before_epoch(self, learn: Any) -> None: ...
    def before_batch(self, learn: Any) -> None: ...
    def after_pred(self, learn: Any) -> None: ...
    def before_backward(self, learn: Any) -> None: ...
    def before_step(self, learn: Any) -> None: ...
    def after_batch(self, learn: Any) -> None: ...
    def after_train(self, learn: Any) -> None: ...
    def after_epoch(self, learn: Any) -> None: ...
    def after_fit(self, learn: Any) -> None: ...


@dataclass
class LRFind:
    """An lr_find sweep: learning rates, their smoothed losses and the suggestions."""

    lrs: Any  # np.ndarray (n,)
    losses: Any  # np.ndarray (n,), smoothed
    suggestion: Any  # ursa.train.schedule.SuggestedLRs

    def plot(self, out: str | Path | None = None) -> Any:
        """Loss against learning rate (log scale) with the suggestions marked; saved to `out` when given."""
        from ursa.interpret.plots import plot_lr_find

        return plot_lr_find(self.lrs, self.losses, self.suggestion, out=out)


class Recorder(Callback):
    """Keeps per-batch training losses and per-epoch rows (HISTORY_COLUMNS and the Learner's metrics; `epoch`
    counts within its fit, as fastai's table does) across every fit of a Learner, which path ran them
    (`path`, also a column), and the last lr_find sweep."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.batch_losses: list[float] = []
        self.lrs: list[float] = []
        self.path: str | None = None  # CACHED or NETWORK: what ran the last fit
        self.lr_find: LRFind | None = None
        self._t0 = 0.0

    def before_fit(self, learn: Any) -> None:
        self._t0 = time.perf_counter()
        self.path = getattr(learn, "source", NETWORK)

    def after_batch(self, learn: Any) -> None:
        self.batch_losses.append(learn.last_loss)
        self.lrs.append(learn.last_lr)

    def after_epoch(self, learn: Any) -> None:
        now = time.perf_counter()
        done = sum(r.get("batches", 0) for r in self.rows)
        row = {"stage": learn.stage, "epoch": learn.epoch, "train_loss": learn.epoch_train_loss, "lr": learn.last_lr, "seconds": round(now - self._t0, 3), "batches": len(self.batch_losses) - done, "path": self.path}
        row.update(learn.last_metrics)
        self.rows.append(row)
        self._t0 = now

    def add_row(self, row: dict[str, Any], *, path: str) -> None:
        """Record an epoch row a fit made without the loop (a head solved in one go has no batches)."""
        self.path = path
        self.rows.append({"batches": 0, **row, "path": path})

    @property
    def valid_losses(self) -> list[float]:
        return [r["valid_loss"] for r in self.rows]

    @property
    def columns(self) -> list[str]:
        """HISTORY_COLUMNS, then any other metric the rows hold, in order of appearance."""
        extra = [k for r in self.rows for k in r if k not in HISTORY_COLUMNS and k not in _NOT_COLUMNS]
        return HISTORY_COLUMNS + list(dict.fromkeys(extra))

    def to_csv(self, path: str | Path) -> Path:
        """Write the epoch rows as CSV (atomic)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        return atomic_write_bytes(path, buf.getvalue().encode())

    def plot_loss(self, out: str | Path | None = None) -> Any:
        """Training loss per batch and validation loss per epoch; saved to `out` when given."""
        from ursa.interpret.plots import plot_losses

        return plot_losses(self.batch_losses, self.rows, out=out)

    def plot_losses(self, out: str | Path | None = None) -> Any:
        """fastai's name for `plot_loss`."""
        return self.plot_loss(out)

    def record_lr_find(self, lrs: Sequence[float], losses: Sequence[float], suggestion: Any) -> LRFind:
        self.lr_find = LRFind(lrs, losses, suggestion)
        return self.lr_find

    def plot_lr_find(self, out: str | Path | None = None) -> Any:
        """The last lr_find sweep: loss against learning rate, the suggestions marked; saved to `out` when given."""
        if self.lr_find is None:
            raise TrainError("there is no learning-rate sweep to plot: run learn.lr_find() first.")
        return self.lr_find.plot(out)

    def plot(self, out: str | Path | None = None) -> Any:
        """The lesson's `learn.recorder.plot()` after `lr_find`: the same as `plot_lr_find`."""
        return self.plot_lr_find(out)


class ProgressCallback(Callback):
    """A Rich progress bar over batches and a printed row per epoch (the loss, the validation loss and every
    metric); silent when `enabled` is False. `events` (None: none), whether enabled or not, is called with
    {"type": "progress", "stage", "epoch", "n_epoch", "done", "total"} after each batch (done / total batches
    of this fit) and {"type": "epoch", **the Recorder's row} after each epoch (the studio's live progress)."""

    def __init__(self, *, enabled: bool = True, console: Any = None, events: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.enabled, self.console, self.events = enabled, console, events
        self._progress: Any = None
        self._done = 0

    def before_fit(self, learn: Any) -> None:
        self._done = 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = self.console or Console()
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(f"{learn.stage}", total=learn.n_epoch * learn.batches_per_epoch, info="")

    def after_batch(self, learn: Any) -> None:
        self._done += 1
        if self.events is not None:
            self.events({"type": "progress", "stage": learn.stage, "epoch": learn.epoch + 1, "n_epoch": learn.n_epoch, "done": self._done, "total": learn.n_epoch * learn.batches_per_epoch})
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=f"loss {learn.last_loss:.4f}")

    def after_epoch(self, learn: Any) -> None:
        if self.events is not None and learn.recorder.rows:
            self.events({"type": "epoch", **learn.recorder.rows[-1]})  # the Recorder runs first: this epoch's row
        if self._progress is None:
            return
        m = learn.last_metrics
        shown = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float)))
        self._progress.console.print(f"  {learn.stage:<8} epoch {learn.epoch + 1:>3}/{learn.n_epoch}  train_loss {learn.epoch_train_loss:.4f}  {shown}", highlight=False)

    def after_fit(self, learn: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class FeatureProgress:
    """One Rich progress bar per pass over the data that is not an epoch (a feature-extraction view, the
    lr_find sweep); `update(label, done, total)` is the progress function `ursa.train.features.cached_features`
    takes. Silent when `enabled` is False; `events` (None: none), whether enabled or not, is called with
    {"type": "progress", "stage": label, "done", "total"} on every update."""

    def __init__(self, *, enabled: bool, console: Any = None, events: Callable[[dict[str, Any]], None] | None = None):
        self.enabled, self.console, self.events = enabled, console, events
        self._p: Any = None
        self._tasks: dict[str, Any] = {}

    def update(self, label: str, done: int, total: int) -> None:
        if self.events is not None:
            self.events({"type": "progress", "stage": label, "done": done, "total": total})
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
            self._p = None


class ChannelsLast(Callback):
    """The model and its 4-d input batches in channels-last memory layout (faster convolutions on GPUs and recent CPUs)."""

    def after_create(self, learn: Any) -> None:
        learn.model.to(memory_format=torch.channels_last)

    def before_batch(self, learn: Any) -> None:
        if learn.xb.dim() == 4:
            learn.xb = learn.xb.contiguous(memory_format=torch.channels_last)


class MixedPrecision(Callback):
    """The forward pass under autocast in `precision` ("bf16" or "fp16"); for fp16 the loss is scaled and
    the step taken by a GradScaler (a fresh one per fit; lr_find makes one when it needs it), so small
    gradients do not underflow. The loss itself is computed in fp32, outside autocast."""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.scaler: Any = None
        self._autocast: contextlib.ExitStack | None = None

    def before_fit(self, learn: Any) -> None:
        self.scaler = torch.amp.GradScaler(_device(learn).type) if self.precision == "fp16" else None

    def before_batch(self, learn: Any) -> None:
        self._autocast = contextlib.ExitStack()
        self._autocast.enter_context(dist.autocast(_device(learn), self.precision))

    def after_pred(self, learn: Any) -> None:
        if self._autocast is not None:
            self._autocast, stack = None, self._autocast
            stack.close()

    def before_backward(self, learn: Any) -> None:
        if self.precision == "fp16":
            if self.scaler is None:
                self.before_fit(learn)
            learn.loss_grad = self.scaler.scale(learn.loss)

    def before_step(self, learn: Any) -> None:
        if self.scaler is not None:
            self.scaler.step(learn.opt)  # skips the step when the scaled gradients overflowed
            self.scaler.update()
            raise CancelStep

    def after_fit(self, learn: Any) -> None:
        self.scaler = None


class DistributedTraining(Callback):
    """Under torchrun (a process group of more than one process): the model trains wrapped in
    DistributedDataParallel (gradients all-reduced; built in before_fit, after freeze/unfreeze, which DDP
    needs), a DistributedSampler reshuffles each epoch the same way on every rank, and the epoch's training
    loss and sample count are summed over every rank. A no-op for one process."""

    def before_fit(self, learn: Any) -> None:
        if dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            dev = learn.device
            learn.net = DistributedDataParallel(learn.model, device_ids=[dev.index] if dev is not None and dev.type == "cuda" else None)

    def before_epoch(self, learn: Any) -> None:
        sampler = getattr(learn.train_dl, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(learn.epoch)  # DistributedSampler: a new shuffle each epoch, the same on every rank

    def after_train(self, learn: Any) -> None:
        if dist.is_distributed():
            parts = dist.gather((learn.loss_sum, learn.n_samples))
            learn.loss_sum, learn.n_samples = sum(p[0] for p in parts), sum(p[1] for p in parts)

    def after_fit(self, learn: Any) -> None:
        learn.net = learn.model


def _device(learn: Any) -> torch.device:
    return learn.device or torch.device("cpu")
