"""Training callbacks: the Recorder (history.csv, loss curves), progress bars, checkpoints.

A callback gets the Learner at fixed points: before_fit, after_batch, after_epoch, after_fit.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ursa._io import atomic_write_bytes

if TYPE_CHECKING:
    from ursa.train.learner import Learner

__all__ = ["Callback", "Recorder", "ProgressCallback", "CheckpointCallback", "HISTORY_COLUMNS"]

HISTORY_COLUMNS = ["stage", "epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "lr", "seconds"]


class Callback:
    """Base class; every hook is optional."""

    def before_fit(self, learn: "Learner") -> None: ...
    def after_batch(self, learn: "Learner") -> None: ...
    def after_epoch(self, learn: "Learner") -> None: ...
    def after_fit(self, learn: "Learner") -> None: ...


class Recorder(Callback):
    """Keeps per-batch training losses and per-epoch rows (HISTORY_COLUMNS) across every fit of a Learner."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.batch_losses: list[float] = []
        self.lrs: list[float] = []
        self._t0 = 0.0

    def before_fit(self, learn: "Learner") -> None:
        self._t0 = time.perf_counter()

    def after_batch(self, learn: "Learner") -> None:
        self.batch_losses.append(learn.last_loss)
        self.lrs.append(learn.last_lr)

    def after_epoch(self, learn: "Learner") -> None:
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

    def before_fit(self, learn: "Learner") -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = self.console or Console()
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(f"{learn.stage}", total=learn.n_epoch * learn.batches_per_epoch, info="")

    def after_batch(self, learn: "Learner") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=f"loss {learn.last_loss:.4f}")

    def after_epoch(self, learn: "Learner") -> None:
        if self._progress is None:
            return
        m = learn.last_metrics
        self._progress.console.print(
            f"  {learn.stage:<8} epoch {learn.epoch + 1:>3}/{learn.n_epoch}  train_loss {learn.epoch_train_loss:.4f}  "
            f"valid_loss {m.get('valid_loss', float('nan')):.4f}  error_rate {m.get('error_rate', float('nan')):.4f}",
            highlight=False,
        )

    def after_fit(self, learn: "Learner") -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class CheckpointCallback(Callback):
    """Saves the model as safetensors after every epoch (`last`) and whenever validation loss improves (`best`)."""

    def __init__(self, *, name: str = "model") -> None:
        self.name = name
        self.best = float("inf")

    def after_epoch(self, learn: "Learner") -> None:
        learn.save(f"{self.name}-last")
        vl = learn.last_metrics.get("valid_loss", float("inf"))
        if vl < self.best:
            self.best = vl
            learn.save(f"{self.name}-best")
