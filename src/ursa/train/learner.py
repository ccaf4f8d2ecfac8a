"""The Learner: a model, its data and a short training loop, with the lesson's names.

`Learner` trains any `nn.Module` on any pair of DataLoaders with one-cycle schedules, layer groups for
freeze / unfreeze and discriminative learning rates, `lr_find`, metrics and safetensors checkpoints.
The loop only runs the forward pass, the loss, the backward pass and the step; everything around them
is a callback (`ursa.train.callbacks`): the Recorder, the progress display, channels-last batches, mixed
precision and DistributedDataParallel, as fastai's learner keeps its loop skeletal.

The default recipe (`ursa.train.recipe.train_run`) uses it twice: on cached backbone features for the
head (fitted by L-BFGS, `ursa.train.head`, or trained by one-cycle), then, optionally, on images for
full fine-tuning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ursa._io import atomic_write_bytes
from ursa.errors import TrainError
from ursa.models import Head, body_groups
from ursa.train import distributed as dist
from ursa.train.callbacks import Callback, CancelStep, ChannelsLast, DistributedTraining, MixedPrecision, ProgressCallback, Recorder
from ursa.train.metrics import METRICS
from ursa.train.schedule import LRSuggestion, apply_one_cycle, lr_range, smooth, split_lrs, suggest_lr

__all__ = ["Learner", "LRFind", "vision_learner"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class LRFind:
    """Result of `Learner.lr_find`: the sweep, its smoothed losses and the suggestions."""

    lrs: np.ndarray
    losses: np.ndarray  # smoothed
    suggestion: LRSuggestion

    def plot(self, out: str | Path | None = None) -> Any:
        """Loss against learning rate (log scale) with the suggestions marked; saved to `out` when given."""
        from ursa.interpret.plots import plot_lr_find

        return plot_lr_find(self.lrs, self.losses, self.suggestion, out=out)


class Learner:
    """Trains `model` on `train_dl` / `valid_dl` (batches of (x, y)).

    `groups` are the parameter groups, body first and head last (default: one group). `classes` names
    the outputs. `path` is the run folder: `save`/`load` use `path/models/<name>.safetensors`.
    `device`: where batches go (None: left where the loader puts them). `precision` "bf16"/"fp16",
    `channels_last` and `ddp` add the MixedPrecision, ChannelsLast and DistributedTraining callbacks;
    with `ddp` the loaders should use a DistributedSampler.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dl: DataLoader,
        valid_dl: DataLoader | None,
        *,
        classes: Sequence[str],
        groups: list[list[nn.Parameter]] | None = None,
        loss_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: dict[str, Metric] | None = None,
        wd: float = 0.01,
        path: str | Path = ".",
        label_smoothing: float = 0.0,
        train_bn: bool = True,
        progress: bool = True,
        cbs: Iterable[Callback] = (),
        stage: str = "train",
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        bn_eval: nn.Module | None = None,
        dls: Any = None,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        ddp: bool = False,
    ):
        self.model, self.train_dl, self.valid_dl = model, train_dl, valid_dl
        self.net: nn.Module = model  # what the loop runs: the model, or a wrapper of it while a callback holds one (DDP)
        self.classes = list(classes)
        self.groups = groups or [[p for p in model.parameters()]]
        self.loss_func = loss_func or (lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing))
        self.metrics = dict(METRICS if metrics is None else metrics)
        self.wd, self.path, self.train_bn, self.stage = wd, Path(path), train_bn, stage
        self.preprocess = preprocess
        # BatchNorm layers of `bn_eval` keep their running statistics while training (their scale and
        # shift still learn): small batches of a new domain would otherwise overwrite ImageNet's
        # statistics and break a head that was trained on features computed with them.
        self.bn_eval = bn_eval
        self.dls = dls  # the DataBunch, for image learners
        self.device = None if device is None else torch.device(device)
        self.train_seconds, self.train_samples = 0.0, 0  # time in training batches (no validation), samples over all ranks
        if self.device is not None:
            self.model.to(self.device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise TrainError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}; ursa.train.distributed.choose_precision resolves 'auto' for a device.")
        self.recorder = Recorder()
        scale_out = [*([ChannelsLast()] if channels_last else []), *([MixedPrecision(precision)] if precision != "fp32" else []), *([DistributedTraining()] if ddp else [])]
        self.cbs: list[Callback] = [self.recorder, ProgressCallback(enabled=progress), *scale_out, *cbs]
        self.frozen_to = 0
        self.training = False
        self.last_loss = self.last_lr = self.epoch_train_loss = float("nan")
        self.last_metrics: dict[str, float] = {}
        self.epoch = self.n_epoch = 0
        self._call("after_create")

    # ---- layer groups -------------------------------------------------------------------------
    def freeze_to(self, n: int) -> None:
        """Train only groups[n:] (negative counts from the end); BatchNorm layers stay trainable if train_bn."""
        n = n % len(self.groups) if n < 0 else n
        self.frozen_to = n
        for i, g in enumerate(self.groups):
            for p in g:
                p.requires_grad_(i >= n)
        if self.train_bn and n > 0:
            for m in self.model.modules():
                if isinstance(m, _BN):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(True)

    def freeze(self) -> None:
        """Train only the last group (the head)."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every group."""
        self.freeze_to(0)

    def _optimizer(self, lrs: list[float], wd: float) -> torch.optim.Optimizer:
        pgs = [{"params": [p for p in g if p.requires_grad], "lr": lr} for g, lr in zip(self.groups, lrs)]
        pgs = [g for g in pgs if g["params"]]
        if not pgs:
            raise TrainError("no trainable parameters: every layer group is frozen. Call unfreeze() or freeze() first.")
        return torch.optim.AdamW(pgs, lr=lrs[-1], weight_decay=wd, betas=(0.9, 0.99))

    # ---- training loop ------------------------------------------------------------------------
    def _call(self, hook: str) -> None:
        for cb in self.cbs:
            getattr(cb, hook)(self)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_dl)

    def fit_one_cycle(self, n_epoch: int, lr_max: float | slice | None = None, *, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5, wd: float | None = None) -> None:
        """Train `n_epoch` epochs with the one-cycle schedule; `lr_max` may be `slice(lo, hi)` across groups."""
        if n_epoch < 1:
            raise TrainError(f"epochs must be at least 1, got {n_epoch}.")
        lr_max = 1e-3 if lr_max is None else lr_max
        peaks = split_lrs(lr_max, len(self.groups))
        peaks = [lr for g, lr in zip(self.groups, peaks) if any(p.requires_grad for p in g)]
        opt = self._optimizer(split_lrs(lr_max, len(self.groups)), self.wd if wd is None else wd)
        total = n_epoch * len(self.train_dl)
        self._fit(n_epoch, opt, lambda step: apply_one_cycle(opt, step, total, peaks, pct_start=pct_start, div=div, div_final=div_final))

    def fit(self, n_epoch: int, lr: float | slice = 1e-3, *, wd: float | None = None) -> None:
        """Train `n_epoch` epochs at a constant learning rate."""
        opt = self._optimizer(split_lrs(lr, len(self.groups)), self.wd if wd is None else wd)
        self._fit(n_epoch, opt, lambda step: None)

    def _train_mode(self) -> None:
        self.model.train()
        if self.bn_eval is not None:
            for m in self.bn_eval.modules():
                if isinstance(m, _BN):
                    m.eval()

    def _to_device(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Make (xb, yb) the current batch, on the learner's device."""
        if self.device is not None:
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        self.xb, self.yb = xb, yb

    def _forward(self, net: nn.Module) -> torch.Tensor:
        """`net` on the current batch, between before_batch and after_pred (run even when the forward
        raised, so a callback's context, such as autocast, is always left)."""
        self._call("before_batch")
        try:
            self.pred = net(self.xb)
        finally:
            self._call("after_pred")
        return self.pred

    def _train_batch(self, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        """One optimizer step on the current batch; sets last_loss and last_lr."""
        self.opt = opt
        self.loss = self.loss_grad = self.loss_func(self._forward(net).float(), self.yb)
        opt.zero_grad(set_to_none=True)
        self._call("before_backward")
        self.loss_grad.backward()
        try:
            self._call("before_step")
            opt.step()
        except CancelStep:
            pass
        self.last_loss, self.last_lr = self.loss.item(), opt.param_groups[-1]["lr"]

    def _fit(self, n_epoch: int, opt: torch.optim.Optimizer, schedule: Callable[[int], None]) -> None:
        self.n_epoch, step = n_epoch, 0
        self._call("before_fit")
        try:
            for self.epoch in range(n_epoch):
                self._call("before_epoch")
                self._train_mode()
                self.training, self.loss_sum, self.n_samples = True, 0.0, 0
                t_epoch = time.perf_counter()
                for xb, yb in self.train_dl:
                    self._to_device(xb, yb)
                    schedule(step)
                    self._train_batch(self.net, opt)
                    step += 1
                    if not math.isfinite(self.last_loss):
                        raise TrainError(f"the training loss became {self.last_loss} at epoch {self.epoch + 1}: the learning rate is too high. Run lr_find and pick a smaller one.")
                    self.loss_sum, self.n_samples = self.loss_sum + self.last_loss * len(self.yb), self.n_samples + len(self.yb)
                    self._call("after_batch")
                self.training = False
                self._call("after_train")
                self.train_seconds += time.perf_counter() - t_epoch
                self.train_samples += self.n_samples
                self.epoch_train_loss = self.loss_sum / max(1, self.n_samples)
                self.last_metrics = self.validate()
                self._call("after_epoch")
        finally:
            self.training = False
            self._call("after_fit")

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, *, freeze_epochs: int = 1, lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0) -> None:
        """The lesson's recipe: train the head frozen for `freeze_epochs`, then everything with
        discriminative rates `slice(base_lr / lr_mult, base_lr)` (halving base_lr) for `epochs`."""
        self.freeze()
        self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)
        base_lr /= 2
        self.unfreeze()
        self.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div)

    # ---- evaluation ---------------------------------------------------------------------------
    def get_preds(self, dl: Iterable[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (n, classes), targets (n,)) over `dl` (default: the validation set)."""
        dl = self.valid_dl if dl is None else dl
        if dl is None:
            raise TrainError("no validation data: pass a DataLoader to get_preds().")
        self.model.eval()
        outs, ys = [], []
        with torch.inference_mode():
            for xb, yb in dl:
                self._to_device(xb, yb)
                outs.append(self._forward(self.model).float().cpu())
                ys.append(yb)
        logits = torch.cat(outs) if outs else torch.zeros(0, len(self.classes))
        return logits.softmax(-1), (torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long))

    def validate(self, dl: DataLoader | None = None) -> dict[str, float]:
        """valid_loss and every metric on `dl` (default: the validation set)."""
        dl = self.valid_dl if dl is None else dl
        if dl is None:
            return {}
        probs, y = self.get_preds(dl)
        out = {"valid_loss": F.nll_loss(probs.clamp_min(1e-12).log(), y).item() if len(y) else float("nan")}
        out.update({name: fn(probs, y) for name, fn in self.metrics.items()})
        return out

    def predict(self, item: Any) -> tuple[str, int, torch.Tensor]:
        """(label, class index, probabilities) for one input: a path or PIL image (image models) or a tensor."""
        x = self.preprocess(item) if self.preprocess is not None and not isinstance(item, torch.Tensor) else item
        probs = self.get_preds([(x.unsqueeze(0), torch.zeros(1, dtype=torch.long))])[0][0]
        idx = int(probs.argmax())
        return self.classes[idx], idx, probs

    # ---- lr_find ------------------------------------------------------------------------------
    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, *, stop_div: bool = True) -> LRFind:
        """Exponential learning-rate sweep over `num_it` mini-batches; the model's weights are restored after.

        Stops early once the smoothed loss exceeds 4x its minimum. Returns the sweep and suggestions.
        """
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        lrs = lr_range(start_lr, end_lr, num_it)
        opt = self._optimizer([start_lr] * len(self.groups), self.wd)
        raw: list[float] = []
        best = float("inf")
        self._train_mode()
        self.training, it = True, 0
        try:
            while it < num_it:
                for xb, yb in self.train_dl:
                    if it >= num_it:
                        break
                    for pg in opt.param_groups:
                        pg["lr"] = float(lrs[it])
                    self._to_device(xb, yb)
                    self._train_batch(self.model, opt)
                    raw.append(self.last_loss)
                    sm = smooth(raw)[-1]
                    best = min(best, sm)
                    it += 1
                    if stop_div and (not math.isfinite(sm) or sm > 4 * best):
                        it = num_it
                        break
        finally:
            self.training = False
            self.model.load_state_dict(state)
        losses = smooth(raw)
        n = len(losses)
        if n < 4:
            raise TrainError("lr_find ran fewer than 4 batches: use more data or a smaller batch size.")
        # drop the last points, where the loss has already blown up
        keep = max(4, n - 3) if stop_div and n < num_it else n
        sug = suggest_lr(lrs[:keep], losses[:keep])
        return LRFind(lrs[:keep], losses[:keep], sug)

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, name: str) -> Path:
        """Write the model's weights to `path/models/<name>.safetensors` (atomic; no pickle).

        Under torchrun only global rank 0 writes (every rank holds the same weights); the path is returned on all.
        """
        from safetensors.torch import save

        if not dist.is_main():
            return self.path / "models" / f"{name}.safetensors"
        data = save({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, metadata={"classes": ",".join(self.classes)})
        return atomic_write_bytes(self.path / "models" / f"{name}.safetensors", data)

    def load(self, name: str) -> "Learner":
        """Load weights saved by `save(name)`; a file for another model raises TrainError."""
        from safetensors.torch import load_file

        f = self.path / "models" / f"{name}.safetensors"
        if not f.is_file():
            raise TrainError(f"checkpoint {f} does not exist. Saved checkpoints: {sorted(p.stem for p in (self.path / 'models').glob('*.safetensors'))}.")
        try:
            self.model.load_state_dict(load_file(str(f)))
        except RuntimeError as exc:
            raise TrainError(f"checkpoint {f} does not fit this model: {str(exc).splitlines()[0]}") from None
        return self

    def show_batch(self, n: int = 9, *, out: str | Path | None = None) -> Any:
        """A grid of augmented training images with labels (image learners made by `vision_learner`)."""
        if self.dls is None:
            raise TrainError("show_batch needs image data; this learner trains on cached features.")
        from ursa.interpret.plots import show_batch

        return show_batch(self.dls, n, out=out)


def vision_learner(dls: Any, arch: str = "efficientnet_lite0", *, weights: str | None = None, pretrained: bool = True, path: str | Path = ".", progress: bool = True, **kwargs: Any) -> Learner:
    """An image Learner: a pretrained backbone + a new head for `dls.classes`, frozen (head-only) to start.

    Groups: two halves of the backbone, then the head, so `slice(lo, hi)` gives the earliest layers
    the smallest learning rate. `dls` is an `ursa.data.loaders.DataBunch`.
    """
    from ursa.models import create_backbone

    bb = create_backbone(arch, weights=weights, pretrained=pretrained)
    head = Head(bb.num_features, len(dls.classes))
    model = nn.Sequential(bb.model, head)
    learn = Learner(model, dls.train, dls.valid, classes=dls.classes, groups=[*body_groups(bb.model, 2), list(head.parameters())], path=path, progress=progress, preprocess=dls.preprocess, bn_eval=bb.model, dls=dls, **kwargs)
    learn.backbone = bb  # type: ignore[attr-defined]
    learn.freeze()
    return learn

