"""The Learner: a model, its data and a short training loop, with the lesson's names, at two speeds.

`Learner` trains any `nn.Module` on any pair of DataLoaders with one-cycle schedules, layer groups for
freeze / unfreeze and discriminative learning rates, `lr_find`, metrics and safetensors checkpoints.
The loop only runs the forward pass, the loss, the backward pass and the step; everything around them
is a callback (`ursa.train.callbacks`): the Recorder, the progress display, channels-last batches, mixed
precision and DistributedDataParallel, as fastai's learner keeps its loop skeletal.

An image learner (`vision_learner`) has two speeds and one set of results. While its body is frozen,
its backbone gives the same features every epoch, so `fit_one_cycle`, `fit`, `lr_find` and `fine_tune`'s
frozen phase train the head on the feature cache (`ursa.train.features.cached_features`, the cache `ursa
train` fills: a notebook run after `ursa train` computes nothing again), a few seconds instead of a
backbone pass per image per epoch. After `unfreeze()` they run the network on images. The cached head
is trained by this same loop (a Learner over the cached features, sharing the Recorder), and the
Recorder says which path ran (`learn.recorder.path`, the history's `path` column). The default recipe
(`ursa.train.recipe.train_run`, the CLI's `ursa train`) is this Learner: `fit_lbfgs` (or `fit_one_cycle`)
on the frozen body, then optionally `unfreeze` and `fit_one_cycle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ursa._io import atomic_write_bytes
from ursa.config import DataConfig, TrainConfig
from ursa.errors import TrainError
from ursa.models import Backbone, Head, body_groups, create_backbone
from ursa.train import distributed as dist
from ursa.train.callbacks import CACHED, NETWORK, Callback, CancelStep, ChannelsLast, DistributedTraining, FeatureProgress, LRFind, MixedPrecision, ProgressCallback, Recorder
from ursa.train.features import FeatureData, cached_features
from ursa.train.head import fit_linear_head
from ursa.train.metrics import Metric, as_metrics
from ursa.train.runtime import tune_allocator
from ursa.train.schedule import SuggestedLRs, apply_one_cycle, lr_range, smooth, split_lrs, suggest_lr

__all__ = ["Learner", "LRFind", "SuggestedLRs", "vision_learner", "cnn_learner", "DEFAULT_LR"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
DEFAULT_LR = 1e-3  # fastai's default peak learning rate for fit / fit_one_cycle


def _check_lr(lr: Any, name: str) -> float | slice:
    """A learning rate as written in the lesson: a positive number or `slice(lo, hi)` / `slice(hi)`."""
    def ok(v: Any) -> bool:
        return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v)) and float(v) > 0

    if isinstance(lr, slice):
        if ok(lr.stop) and (lr.start is None or ok(lr.start)) and lr.step is None:
            return lr
    elif ok(lr):
        return float(lr)
    raise TrainError(f"{name}={lr!r} is not a learning rate: pass a positive number such as 1e-3, or slice(lo, hi) such as slice(3e-5, 3e-4) to give the earliest layers lo and the head hi (run lr_find to choose).")


def _pick_lr(lr_max: Any, max_lr: Any, *, method: str) -> float | slice:
    """fit_one_cycle's peak learning rate from `lr_max` (fastai's name) or `max_lr` (the lesson's)."""
    if lr_max is not None and max_lr is not None:
        raise TrainError(f"{method} got both lr_max={lr_max!r} and max_lr={max_lr!r}; they are one setting under two names (fastai's and the lesson's). Pass only one of them.")
    given = lr_max if lr_max is not None else max_lr
    return DEFAULT_LR if given is None else _check_lr(given, "lr_max" if lr_max is not None else "max_lr")


def _check_epochs(n_epoch: Any) -> int:
    if isinstance(n_epoch, bool) or not isinstance(n_epoch, Integral) or n_epoch < 1:
        raise TrainError(f"the number of epochs must be a whole number of at least 1, got {n_epoch!r}.")
    return int(n_epoch)


def _digest(module: nn.Module) -> str:
    """A hash of a module's weights and buffers: tells whether the body is still the one the cache was computed from."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _ImageParts:
    """What an image learner needs to train its head on the feature cache."""

    backbone: Backbone
    head: Head
    train: TrainConfig  # views, view_budget, tta, extraction batch size and workers, head_batch_size
    data: DataConfig  # seed, flip, augmentation: the cache's views
    body_digest: str  # the body the cache holds features of
    fd: FeatureData | None = None
    head_learner: "Learner | None" = None
    layout_moved: bool = False  # extraction or the cached head moved the model: reset before the network runs
    fits: dict[str, int] = dataclasses.field(default_factory=dict)  # fits run so far, per kind (seeds the next)


class Learner:
    """Trains `model` on `train_dl` / `valid_dl` (batches of (x, y)).

    `groups` are the parameter groups, body first and head last (default: one group). `classes` names
    the outputs. `metrics`: `error_rate`, `[error_rate, accuracy]` or a dict name -> function (default:
    both; see `ursa.train.metrics.as_metrics`). `path` is the run folder: `save`/`load` use
    `path/models/<name>.safetensors`. `device`: where batches go (None: left where the loader puts them).
    `precision` "bf16"/"fp16", `channels_last` and `ddp` add the MixedPrecision, ChannelsLast and
    DistributedTraining callbacks; with `ddp` the loaders should use a DistributedSampler. `source` names
    what a batch is, for the Recorder's `path`: "network" (inputs through the whole model) or
    "cached-features". `stage` labels the history rows (None: "head" while frozen, else "fine_tune").
    `console` is the Rich console the progress displays draw on (None: Rich's own, which draws in
    Jupyter too). On an image learner, callbacks given in `cbs` run when the network runs; the cached
    head's fits run the Recorder and the progress display.
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
        metrics: Any = None,
        wd: float = 0.01,
        path: str | Path = ".",
        label_smoothing: float = 0.0,
        train_bn: bool = True,
        progress: bool = True,
        cbs: Iterable[Callback] = (),
        stage: str | None = "train",
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        bn_eval: nn.Module | None = None,
        dls: Any = None,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        ddp: bool = False,
        source: str = NETWORK,
        console: Any = None,
        events: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.metrics: dict[str, Metric] = as_metrics(metrics)  # first: a wrong type fails before anything is built
        if precision not in ("fp32", "bf16", "fp16"):
            raise TrainError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}; ursa.train.distributed.choose_precision resolves 'auto' for a device.")
        self.model, self.train_dl, self.valid_dl = model, train_dl, valid_dl
        self.net: nn.Module = model  # what the loop runs: the model, or a wrapper of it while a callback holds one (DDP)
        self.classes = list(classes)
        self.groups = groups or [[p for p in model.parameters()]]
        self.loss_func = loss_func or (lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing))
        self.wd, self.path, self.train_bn = wd, Path(path), train_bn
        self._auto_stage = stage is None
        self.stage = "head" if stage is None else stage
        self.source = source
        self.progress, self.console = progress, console  # console: where Rich draws the progress (None: its default)
        self.events = events  # called with progress and epoch dicts (see ProgressCallback); None: none
        self.preprocess = preprocess
        # BatchNorm layers of `bn_eval` keep their running statistics while training (their scale and
        # shift still learn): small batches of a new domain would otherwise overwrite ImageNet's
        # statistics and break a head that was trained on features computed with them.
        self.bn_eval = bn_eval
        self.dls = dls  # the DataBunch, for image learners
        self.device = None if device is None else torch.device(device)
        self.channels_last = channels_last
        self.cache = False  # image learners (vision_learner) train a frozen body's head on the feature cache
        self._image: _ImageParts | None = None
        self.train_seconds, self.train_samples = 0.0, 0  # time in training batches (no validation), samples over all ranks
        if self.device is not None:
            self.model.to(self.device)
        self.recorder = Recorder()
        scale_out = [*([ChannelsLast()] if channels_last else []), *([MixedPrecision(precision)] if precision != "fp32" else []), *([DistributedTraining()] if ddp else [])]
        self.cbs: list[Callback] = [self.recorder, ProgressCallback(enabled=progress, console=console, events=events), *scale_out, *cbs]
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
        """Train only the last group (the head); an image learner then trains it on the feature cache."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every group (an image learner then runs the network on images)."""
        self.freeze_to(0)

    def _optimizer(self, lrs: list[float], wd: float) -> torch.optim.Optimizer:
        pgs = [{"params": [p for p in g if p.requires_grad], "lr": lr} for g, lr in zip(self.groups, lrs)]
        pgs = [g for g in pgs if g["params"]]
        if not pgs:
            raise TrainError("no trainable parameters: every layer group is frozen. Call unfreeze() or freeze() first.")
        return torch.optim.AdamW(pgs, lr=lrs[-1], weight_decay=wd, betas=(0.9, 0.99))

    # ---- the two paths of an image learner ----------------------------------------------------
    @property
    def uses_cache(self) -> bool:
        """True when the next fit trains the head on the feature cache: an image learner whose cache is on
        (`cache=True`), whose body is frozen, and whose body is still the one the cache holds features of
        (a body trained after `unfreeze()`, or loaded from another checkpoint, runs the network instead)."""
        im = self._image
        return im is not None and self.cache and self.frozen_to >= len(self.groups) - 1 and _digest(im.backbone.model) == im.body_digest

    def features(self) -> FeatureData:
        """The feature cache of this image learner's split: computed on first use (with a progress bar),
        read from disk when `ursa train` or an earlier learner already computed it, then kept in memory."""
        im = self._require_image("features")
        if im.fd is None:
            if _digest(im.backbone.model) != im.body_digest:
                raise TrainError("the body has changed since this learner was made (trained after unfreeze(), or loaded), so its features are not the cached ones. Make a new learner with vision_learner to use the cache.")
            bar = FeatureProgress(enabled=self.progress and dist.is_main(), console=self.console, events=self.events)
            try:
                im.fd = cached_features(self.dls.split, im.backbone, im.train, im.data, progress=bar.update, device=self.device or "cpu")
            finally:
                bar.close()
                im.layout_moved = True
            self._note_failed(im.fd)
        return im.fd

    def _require_image(self, what: str) -> _ImageParts:
        if self._image is None:
            raise TrainError(f"{what} needs an image learner made by vision_learner(dls, arch).")
        return self._image

    def _note_failed(self, fd: FeatureData) -> None:
        """Files the feature pass could not decode are failures of the DataBunch's datasets too (their
        loaders drop them from every batch), so the valid set's items line up with the predictions."""
        for dl in (getattr(self.dls, "train", None), getattr(self.dls, "valid", None)):
            failed = getattr(getattr(dl, "dataset", None), "failed", None)
            if isinstance(failed, dict):
                failed.update({s.name: s.reason for s in fd.failed})

    def _head_learner(self) -> "Learner":
        """The Learner that trains this learner's head on its cached features (made once; it shares the
        Recorder, so one history holds both paths). Batches: `train.head_batch_size` rows, shuffled by a
        generator seeded with the data seed; validation on the plain view."""
        im = self._require_image("the cached head")
        fd = self.features()
        if im.head_learner is None:
            bs, seed = im.train.head_batch_size, im.data.seed
            gen = torch.Generator().manual_seed(seed)
            train_dl = DataLoader(TensorDataset(fd.x_train, fd.y_train), batch_size=bs, shuffle=True, generator=gen, drop_last=len(fd.y_train) > bs)
            valid_dl = DataLoader(TensorDataset(fd.x_valid[0], fd.y_valid), batch_size=512)
            hl = Learner(im.head, train_dl, valid_dl, classes=self.classes, metrics=self.metrics, path=self.path, progress=self.progress, stage="head", source=CACHED, console=self.console, events=self.events)
            hl.recorder = self.recorder
            hl.cbs[0] = self.recorder
            im.head_learner = hl
        hl = im.head_learner
        hl.loss_func, hl.metrics, hl.wd, hl.path = self.loss_func, self.metrics, self.wd, self.path
        im.head.cpu()  # the head is tiny and the cached features live on the CPU
        im.layout_moved = True
        return hl

    def _ran_cached(self, hl: "Learner") -> None:
        self.last_metrics, self.epoch_train_loss = hl.last_metrics, hl.epoch_train_loss
        self.last_loss, self.last_lr, self.epoch, self.n_epoch = hl.last_loss, hl.last_lr, hl.epoch, hl.n_epoch

    def _before_network(self) -> None:
        """An image learner's model on its device, in one memory layout (the feature pass leaves the body
        channels-last; ChannelsLast puts it back when asked for), before images run through it."""
        im = self._image
        if im is not None and im.layout_moved:
            self.model.to(device=self.device or torch.device("cpu"), memory_format=torch.contiguous_format)
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)
            im.layout_moved = False
        if self._auto_stage:
            self.stage = "head" if self.frozen_to > 0 else "fine_tune"

    @contextlib.contextmanager
    def _seeded(self, kind: str) -> Iterator[None]:
        """An image learner's fit draws its random numbers (dropout, augmentation, workers' seeds) from
        the data seed plus the number of earlier fits of its kind ("cached", "network", "lr_find"), inside
        a forked generator: a notebook run again gives the same numbers, and the caller's generator is
        left as it was. Other learners use the global generator as it stands."""
        im = self._image
        if im is None:
            yield
            return
        n = im.fits.get(kind, 0)
        im.fits[kind] = n + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(im.data.seed + n)
            yield

    # ---- training loop ------------------------------------------------------------------------
    def _call(self, hook: str) -> None:
        for cb in self.cbs:
            getattr(cb, hook)(self)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_dl)

    def fit_one_cycle(self, n_epoch: int, lr_max: float | slice | None = None, *, max_lr: float | slice | None = None, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5, wd: float | None = None) -> None:
        """Train `n_epoch` epochs with the one-cycle schedule; `lr_max` (or the lesson's `max_lr`, not both;
        default 1e-3) may be `slice(lo, hi)` across groups. A frozen image learner trains its head on the
        feature cache (at the head's rate, hi); otherwise the network runs on every batch."""
        _check_epochs(n_epoch)
        lr_max = _pick_lr(lr_max, max_lr, method="fit_one_cycle")
        if self.uses_cache:
            hl = self._head_learner()
            with self._seeded("cached"):
                hl.fit_one_cycle(n_epoch, split_lrs(lr_max, len(self.groups))[-1], pct_start=pct_start, div=div, div_final=div_final, wd=wd)
            return self._ran_cached(hl)
        self._before_network()
        peaks = split_lrs(lr_max, len(self.groups))
        peaks = [lr for g, lr in zip(self.groups, peaks) if any(p.requires_grad for p in g)]
        opt = self._optimizer(split_lrs(lr_max, len(self.groups)), self.wd if wd is None else wd)
        total = n_epoch * len(self.train_dl)
        with self._seeded("network"):
            self._fit(n_epoch, opt, lambda step: apply_one_cycle(opt, step, total, peaks, pct_start=pct_start, div=div, div_final=div_final))

    def fit(self, n_epoch: int, lr: float | slice | None = None, *, wd: float | None = None) -> None:
        """Train `n_epoch` epochs at a constant learning rate (default 1e-3); on the feature cache while a
        frozen image learner's body is unchanged."""
        _check_epochs(n_epoch)
        lr = DEFAULT_LR if lr is None else _check_lr(lr, "lr")
        if self.uses_cache:
            hl = self._head_learner()
            with self._seeded("cached"):
                hl.fit(n_epoch, split_lrs(lr, len(self.groups))[-1], wd=wd)
            return self._ran_cached(hl)
        self._before_network()
        opt = self._optimizer(split_lrs(lr, len(self.groups)), self.wd if wd is None else wd)
        with self._seeded("network"):
            self._fit(n_epoch, opt, lambda step: None)

    def fit_lbfgs(self, *, c: float = 0.5, max_iter: int = 300) -> None:
        """The default recipe's head stage: the head's linear layer fitted to convergence on the whole
        feature cache by L-BFGS (`ursa.train.head.fit_linear_head`; no learning rate, no epochs; `c` is
        the inverse L2 strength). Needs the cache: a frozen image learner, or a Learner over cached features."""
        if self.source == CACHED:
            fit_linear_head(self, c=c, max_iter=max_iter)
            return self._emit_row()
        if not self.uses_cache:
            raise TrainError("fit_lbfgs fits the head on cached features: it needs an image learner (vision_learner) with its cache on, its body frozen (freeze()) and not trained since. Use fit_one_cycle to train the network.")
        hl = self._head_learner()
        fit_linear_head(hl, c=c, max_iter=max_iter)
        self.last_metrics = {k: v for k, v in self.recorder.rows[-1].items() if k == "valid_loss" or k in self.metrics}
        self._emit_row()

    def _emit_row(self) -> None:
        """`events` gets the row of a fit solved in one go (no epochs for ProgressCallback to report)."""
        if self.events is not None and self.recorder.rows:
            self.events({"type": "epoch", **self.recorder.rows[-1]})

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
        """The lesson's recipe: train the head frozen for `freeze_epochs` (an image learner: on the feature
        cache), then everything with discriminative rates `slice(base_lr / lr_mult, base_lr)` (halving
        base_lr) for `epochs`."""
        _check_epochs(epochs)
        _check_epochs(freeze_epochs)
        if isinstance(base_lr, slice):
            raise TrainError(f"fine_tune's base_lr is one number (the head's rate; the body gets base_lr / lr_mult), got {base_lr!r}.")
        base_lr = float(_check_lr(base_lr, "base_lr"))  # type: ignore[arg-type]
        self.freeze()
        self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)
        base_lr /= 2
        self.unfreeze()
        self.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div)

    # ---- evaluation ---------------------------------------------------------------------------
    def get_preds(self, dl: Iterable[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (n, classes), targets (n,)) over `dl` (default: the validation set). A frozen
        image learner whose features are computed reads the validation set's from the cache."""
        if dl is None and self._image is not None and self._image.fd is not None and self.uses_cache:
            return self._head_learner().get_preds()
        dl = self.valid_dl if dl is None else dl
        if dl is None:
            raise TrainError("no validation data: pass a DataLoader to get_preds().")
        self._before_network()
        self.model.eval()
        outs, ys = [], []
        with torch.inference_mode():
            for xb, yb in dl:
                self._to_device(xb, yb)
                outs.append(self._forward(self.model).float().cpu())
                ys.append(yb.cpu())
        logits = torch.cat(outs) if outs else torch.zeros(0, len(self.classes))
        return logits.softmax(-1), (torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long))

    def validate(self, dl: DataLoader | None = None) -> dict[str, float]:
        """valid_loss and every metric on `dl` (default: the validation set)."""
        if dl is None and self.valid_dl is None:
            return {}
        probs, y = self.get_preds(dl)
        out = {"valid_loss": F.nll_loss(probs.clamp_min(1e-12).log(), y).item() if len(y) else float("nan")}
        out.update({name: _number(fn(probs, y)) for name, fn in self.metrics.items()})
        return out

    def predict(self, item: Any) -> tuple[str, int, torch.Tensor]:
        """(label, class index, probabilities) for one input: a path or PIL image (image models) or a tensor."""
        x = self.preprocess(item) if self.preprocess is not None and not isinstance(item, torch.Tensor) else item
        probs = self.get_preds([(x.unsqueeze(0), torch.zeros(1, dtype=torch.long))])[0][0]
        idx = int(probs.argmax())
        return self.classes[idx], idx, probs

    # ---- lr_find ------------------------------------------------------------------------------
    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, *, stop_div: bool = True) -> SuggestedLRs:
        """Exponential learning-rate sweep over `num_it` mini-batches; the model's weights are restored after.

        Stops early once the smoothed loss exceeds 4x its minimum. Returns the suggestions (valley,
        minimum, steep) and records the sweep: `learn.recorder.plot()` / `plot_lr_find()` draw it. A
        frozen image learner sweeps its head on the feature cache.
        """
        start_lr, end_lr = float(_check_lr(start_lr, "start_lr")), float(_check_lr(end_lr, "end_lr"))  # type: ignore[arg-type]
        if not start_lr < end_lr or isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < 4:
            raise TrainError(f"lr_find needs start_lr < end_lr and num_it >= 4, got {start_lr}, {end_lr}, {num_it!r}.")
        if self.uses_cache:
            hl = self._head_learner()
            with self._seeded("lr_find"):
                return hl.lr_find(start_lr, end_lr, num_it, stop_div=stop_div)
        with self._seeded("lr_find"):
            return self._lr_sweep(start_lr, end_lr, num_it, stop_div=stop_div)

    def _lr_sweep(self, start_lr: float, end_lr: float, num_it: int, *, stop_div: bool) -> SuggestedLRs:
        self._before_network()
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        lrs = lr_range(start_lr, end_lr, num_it)
        opt = self._optimizer([start_lr] * len(self.groups), self.wd)
        raw: list[float] = []
        best = float("inf")
        # the first batches' smoothed loss is noise around a small value: measured against it, ordinary
        # noise looks like a 4x divergence (a trained learner stopped after 2 batches), so the best loss
        # the rule compares with is taken from a little way in
        warmup = max(4, num_it // 10)
        bar = FeatureProgress(enabled=self.progress and dist.is_main(), console=self.console, events=self.events)
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
                    it += 1
                    bar.update("lr_find", it, num_it)
                    if it > warmup:
                        best = min(best, sm)
                    if stop_div and (not math.isfinite(sm) or sm > 4 * best):
                        it = num_it
                        break
                else:
                    if not raw:
                        break  # an empty loader would loop forever
        finally:
            bar.close()
            self.training = False
            self.model.load_state_dict(state)
        losses = smooth(raw)
        n = len(losses)
        if n < 4:
            raise TrainError("lr_find ran fewer than 4 batches: use more data or a smaller batch size.")
        # drop the last points, where the loss has already blown up
        keep = max(4, n - 3) if stop_div and n < num_it else n
        sug = suggest_lr(lrs[:keep], losses[:keep])
        self.recorder.record_lr_find(lrs[:keep], losses[:keep], sug)
        return sug

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


def _number(v: Any) -> float:
    """A metric's value as a float (fastai's metrics return 0-d tensors)."""
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def _preprocessing_of(dls: Any, bb: Backbone) -> dict[str, Any]:
    """The preprocessing both paths use: the DataBunch's (its loaders already apply it), which for a
    DataBunch made for this architecture is the backbone's own at the DataBunch's input size."""
    cfg = dict(dls.data_config)
    for k in ("mean", "std"):
        if k in bb.data_config and tuple(cfg.get(k, ())) != tuple(bb.data_config[k]):
            warnings.warn(
                f"the DataLoaders normalize with {k} {tuple(cfg.get(k, ()))}, but {bb.arch} was trained with {tuple(bb.data_config[k])}: "
                f"make them for this backbone, e.g. ImageDataLoaders.from_folder(..., arch={bb.arch!r}).",
                stacklevel=3,
            )
            break
    return cfg


def vision_learner(
    dls: Any,
    arch: str | Backbone = "efficientnet_lite0",
    *,
    metrics: Any = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    path: str | Path = ".",
    progress: bool = True,
    cache: bool = True,
    dropout: float = 0.25,
    train: TrainConfig | None = None,
    data: DataConfig | None = None,
    cls: type[Learner] = Learner,
    **kwargs: Any,
) -> Learner:
    """An image Learner: a pretrained backbone + a new head for `dls.classes`, frozen (head-only) to start.

    `dls` is an `ursa.data.loaders.DataBunch` (`ImageDataLoaders.from_folder(...)`). `arch`: a packaged
    backbone (efficientnet_lite0/1/2), a timm name with `weights=FILE`, or a prepared `Backbone`.
    `metrics`: `error_rate`, `[error_rate, accuracy]` or a dict (default: both).

    While the body is frozen, fits train the head on the feature cache (the cache `ursa train` uses);
    `cache=False` turns that off, so every frozen epoch runs the network on images as fastai does (the
    body's BatchNorm scales then train too). `train` sets the cache's views (`views`, `view_budget`,
    `tta`), its extraction batch size and workers and the cached head's batch size (default: the
    DataLoaders' batch size and workers); `data` its seed and augmentation (default: the DataBunch's).

    Groups: two halves of the backbone, then the head, so `slice(lo, hi)` gives the earliest layers
    the smallest learning rate. The head's initial weights, and each fit's random draws, come from the
    data seed, so running the same lines again gives the same numbers. `cls` is the
    Learner class built (a subclass adds stages above training, such as `ursa.notebook.NotebookLearner.export`).
    Other keywords go to `Learner` (loss_func, wd, label_smoothing, device, precision, channels_last, ...).
    """
    as_metrics(metrics)  # a wrong type fails before the backbone is loaded
    if not isinstance(cache, bool):
        raise TrainError(f"cache must be True (train a frozen body's head on cached features) or False (run the network every epoch), got {cache!r}.")
    tune_allocator()  # a process that trains (a notebook kernel too) keeps activation buffers on the heap, as `ursa train` does
    split = dls.split
    if isinstance(arch, Backbone):
        bb = arch
    else:
        bb = create_backbone(arch, weights=weights, pretrained=pretrained)
        bb = dataclasses.replace(bb, data_config=_preprocessing_of(dls, bb))
    if data is None:
        aug = getattr(dls, "aug", None)
        data = DataConfig(seed=split.seed, flip=getattr(dls, "flip", True), **({"aug": aug} if aug is not None else {}))
    if train is None:
        bs, workers = getattr(dls.train, "batch_size", None) or 32, getattr(dls.train, "num_workers", 0)
        train = TrainConfig(batch_size=bs, head_batch_size=bs, num_workers=workers, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        head = Head(bb.num_features, len(dls.classes), dropout=dropout)
    model = nn.Sequential(bb.model, head)
    kwargs.setdefault("stage", None)
    learn = cls(model, dls.train, dls.valid, classes=dls.classes, groups=[*body_groups(bb.model, 2), list(head.parameters())], metrics=metrics, path=path, progress=progress,
                preprocess=dls.preprocess, bn_eval=kwargs.pop("bn_eval", bb.model), dls=dls, **kwargs)  # fmt: skip
    learn.backbone = bb  # type: ignore[attr-defined]
    learn.cache = cache
    learn._image = _ImageParts(bb, head, train, data, _digest(bb.model))
    learn.freeze()
    return learn


cnn_learner = vision_learner  # the lesson's older name
