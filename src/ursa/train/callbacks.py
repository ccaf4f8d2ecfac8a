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
`learn.training` False. Here: the Recorder (history.csv, loss curves), the progress display, and the
three that make the same loop fast on any machine: channels-last batches, mixed precision (autocast,
with gradient scaling for fp16) and DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from pathlib import Path
from typing import Any

import torch

from ursa._io import atomic_write_bytes
from ursa.train import distributed as dist

__all__ = ["Callback", "CancelStep", "Recorder", "ProgressCallback", "ChannelsLast", "MixedPrecision", "DistributedTraining", "HISTORY_COLUMNS"]

HISTORY_COLUMNS = ["stage", "epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "lr", "seconds"]


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


class Recorder(Callback):
    """Keeps per-batch training losses and per-epoch rows (HISTORY_COLUMNS) across every fit of a Learner."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.batch_losses: list[float] = []
        self.lrs: list[float] = []
        self._t0 = 0.0

    def before_fit(self, learn: Any) -> None:
        self._t0 = time.perf_counter()

    def after_batch(self, learn: Any) -> None:
        self.batch_losses.append(learn.last_loss)
        self.lrs.append(learn.last_lr)

    def after_epoch(self, learn: Any) -> None:
        now = time.perf_counter()
        done = sum(r.get("batches", 0) for r in self.rows)
        row = {"stage": learn.stage, "epoch": len(self.rows), "train_loss": learn.epoch_train_loss, "lr": learn.last_lr, "seconds": round(now - self._t0, 3), "batches": len(self.batch_losses) - done}
        row.update(learn.last_metrics)
        self.rows.append(row)
        self._t0 = now

    @property
    def valid_losses(self) -> list[float]:
        return [r["valid_loss"] for r in self.rows]

    def to_csv(self, path: str | Path) -> Path:
        """Write the epoch rows as CSV (atomic)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        return atomic_write_bytes(path, buf.getvalue().encode())

    def plot_loss(self, out: str | Path | None = None) -> Any:
        """Training loss per batch and validation loss per epoch; saved to `out` when given."""
        from ursa.interpret.plots import plot_losses

        return plot_losses(self.batch_losses, self.rows, out=out)


class ProgressCallback(Callback):
    """A Rich progress bar over batches and a printed row per epoch; silent when `enabled` is False."""

    def __init__(self, *, enabled: bool = True, console: Any = None) -> None:
        self.enabled, self.console = enabled, console
        self._progress: Any = None

    def before_fit(self, learn: Any) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = self.console or Console()
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(f"{learn.stage}", total=learn.n_epoch * learn.batches_per_epoch, info="")

    def after_batch(self, learn: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=f"loss {learn.last_loss:.4f}")

    def after_epoch(self, learn: Any) -> None:
        if self._progress is None:
            return
        m = learn.last_metrics
        self._progress.console.print(
            f"  {learn.stage:<8} epoch {learn.epoch + 1:>3}/{learn.n_epoch}  train_loss {learn.epoch_train_loss:.4f}  "
            f"valid_loss {m.get('valid_loss', float('nan')):.4f}  error_rate {m.get('error_rate', float('nan')):.4f}",
            highlight=False,
        )

    def after_fit(self, learn: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


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
