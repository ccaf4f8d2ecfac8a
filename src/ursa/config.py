"""Frozen dataclasses, one per stage. The CLI fills them; library functions take them.

Each field has one comment saying what it means and its unit. Defaults are the recipe a user gets
when they pass nothing, and the CLI's defaults are read from them.

Each dataclass checks its fields when it is made (`__post_init__`, as httpx's `Timeout` does), so a bad
value fails at once with the stage's UrsaError, whether it came from the CLI, from Python or from a
run's config.json, instead of hanging (a semaphore of 0), being replaced by a default (a size of 0) or
failing deep inside a library. The message names the field and its CLI option, the value and the
allowed range. `check_number` is the one check, also used by the CLI for options no config carries.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from ursa.errors import CollectError, DataError, TrainError, UrsaError, VerifyError

__all__ = ["Augment", "DEFAULT_AUG", "AUG_PRESETS", "DataConfig", "TrainConfig", "CollectConfig", "VerifyConfig", "to_dict", "check_number", "MAX_PIXELS", "DEVICES", "PRECISIONS"]

MAX_SEED = 2**32 - 1  # seeds run from 0 to 2**32 - 1, as NumPy's and scikit-learn's
HEADS = ("lbfgs", "one_cycle")  # head solvers of the default recipe
DEVICES = ("auto", "cpu", "cuda")  # where training runs; auto: this rank's GPU when there is one, else the CPU
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training precisions; see ursa.train.distributed.choose_precision
# Largest width x height any stage decodes (download, verify, training, serving): one limit, so an image one
# stage keeps is never one another refuses. A 40 MP photo passes; a decompression bomb does not. Re-exported
# by ursa.imageio, which enforces it.
MAX_PIXELS = 40_000_000


def check_number(
    value: Any,
    name: str,
    error: type[UrsaError],
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    integer: bool = False,
    optional: bool = False,
    unit: str = "",
    hint: str = "",
) -> None:
    """Raise `error` unless `value` is a finite number (a whole one with `integer`) within the bounds.

    `name` is what the user typed or set ("--port", "--size (TrainConfig.size)"); `optional` lets None
    through (None means "not given" to every caller); `unit` follows the bounds in the message and
    `hint` ends it (what to pass instead). Bools are refused: True is not a count.
    """
    if value is None and optional:
        return
    low, low_open = (above, True) if above is not None else (at_least, False)
    high, high_open = (below, True) if below is not None else (at_most, False)
    allowed = _allowed(low, low_open, high, high_open, unit)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        what = "a whole number" if integer else "a finite number"
        raise error(_message(name, f"{what}{f' ({allowed})' if allowed else ''}", value, hint))
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise error(_message(name, allowed, value, hint))


def _allowed(low: float | None, low_open: bool, high: float | None, high_open: bool, unit: str) -> str:
    """The bounds in words: "at least 1", "greater than 0 seconds", "from 1 to 65535", "between 0 and 1 (exclusive)"."""
    u = f" {unit}" if unit else ""
    lo = f"{'greater than' if low_open else 'at least'} {_num(low)}"
    hi = f"{'less than' if high_open else 'at most'} {_num(high)}"
    if low is None and high is None:
        return ""
    if high is None or low is None:
        return f"{lo if high is None else hi}{u}"
    if low_open == high_open:
        return f"between {_num(low)} and {_num(high)}{u} (exclusive)" if low_open else f"from {_num(low)} to {_num(high)}{u}"
    return f"{lo} and {hi}{u}"


def _num(x: float | None) -> str:
    return str(x) if x is None or isinstance(x, int) else f"{x:g}"


def _message(name: str, allowed: str, value: Any, hint: str) -> str:
    return f"{name} must be {allowed}, got {value!r}." + (f" {hint}" if hint else "")


def _label(cfg: Any, name: str, option: str | None) -> str:
    """How a field is named in messages: its CLI option, then where it lives in Python."""
    where = f"{type(cfg).__name__}.{name}"
    return f"{option} ({where})" if option else where


def _number(cfg: Any, error: type[UrsaError], name: str, option: str | None, **bounds: Any) -> None:
    check_number(getattr(cfg, name), _label(cfg, name, option), error, **bounds)


def _flag(cfg: Any, error: type[UrsaError], name: str, option: str | None, *, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise error(_message(_label(cfg, name, option), "True or False" + (" or None" if optional else ""), value, ""))


def _text(cfg: Any, error: type[UrsaError], name: str, option: str | None, *, optional: bool = False, choices: tuple[str, ...] = ()) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if isinstance(value, os.PathLike):  # a pathlib.Path from Python: kept as str, so config.json can hold it
        value = os.fspath(value)
        object.__setattr__(cfg, name, value)
    if choices and value not in choices:
        raise error(_message(_label(cfg, name, option), f"one of {', '.join(map(repr, choices))}", value, ""))
    if not isinstance(value, str) or not value:
        raise error(_message(_label(cfg, name, option), "a non-empty string" + (" or None" if optional else ""), value, ""))


@dataclass(frozen=True)
class Augment:
    """How training images are augmented: fastai's `aug_transforms` settings, and the random crop.

    The defaults are fastai's (`ursa.aug_transforms()`); `ursa train` uses `DEFAULT_AUG` unless told
    otherwise. `ursa.data.transforms.train_transform` builds the transform; `spec()` is what the feature
    cache's signature and a run's config.json hold. Every draw comes from torch's generator, so a seeded
    view (the feature cache's augmented views) is the same on every run.
    """

    do_flip: bool = True  # mirror left-right, with probability 0.5 (turn off for digits, text, left/right classes)
    flip_vert: bool = False  # with do_flip: any of the 8 flips and quarter turns (fastai's Dihedral), for pictures with no "up"
    max_rotate: float = 10.0  # largest rotation, degrees, in [0, 180]; drawn with probability p_affine
    max_zoom: float = 1.1  # largest zoom-in factor, in [1, 10] (1: none), toward a random point; with probability p_affine
    max_lighting: float = 0.2  # largest brightness and contrast change, a share in [0, 1); with probability p_lighting
    max_warp: float = 0.2  # largest perspective warp (corners moved by this share of half the side), in [0, 1); with probability p_affine
    p_affine: float = 0.75  # probability of each of rotate, zoom and warp, in [0, 1]
    p_lighting: float = 0.75  # probability of the lighting change, in [0, 1]
    min_scale: float = 1.0  # smallest share of the image's area a random crop keeps, in (0, 1]; 1: resize the short side, crop a random square
    saturation: float = 0.0  # largest colour saturation change, a share in [0, 1], applied with the lighting

    def __post_init__(self) -> None:
        e = DataError
        _flag(self, e, "do_flip", "--flip/--no-flip")
        _flag(self, e, "flip_vert", "--flip-vert")
        _number(self, e, "max_rotate", "--max-rotate", at_least=0.0, at_most=180.0, unit="degrees", hint="0 turns rotation off; fastai's default is 10.")
        _number(self, e, "max_zoom", "--max-zoom", at_least=1.0, at_most=10.0, hint="1 turns zoom off; fastai's default is 1.1.")
        _number(self, e, "max_lighting", "--max-lighting", at_least=0.0, below=1.0, hint="0 turns it off; fastai's default is 0.2.")
        _number(self, e, "max_warp", "--max-warp", at_least=0.0, below=1.0, hint="0 turns it off; fastai's default is 0.2.")
        _number(self, e, "p_affine", "--p-affine", at_least=0.0, at_most=1.0)
        _number(self, e, "p_lighting", "--p-lighting", at_least=0.0, at_most=1.0)
        _number(self, e, "min_scale", "--min-scale", above=0.0, at_most=1.0, hint="1 keeps the whole image; 0.35 is `ursa train`'s default crop.")
        _number(self, e, "saturation", None, at_least=0.0, at_most=1.0)
        for f in dataclasses.fields(self):
            if f.name not in ("do_flip", "flip_vert"):  # 10 and 10.0 are one setting, with one spec (and one cache)
                object.__setattr__(self, f.name, float(getattr(self, f.name)))

    def spec(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (`Augment.from_spec` reads it back)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Augment":
        """The Augment a spec dict (a run's config.json) describes; an unknown key raises DataError."""
        unknown = sorted(map(str, set(spec) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise DataError(f"the augmentation settings hold unknown fields {unknown}; the known ones are {[f.name for f in dataclasses.fields(cls)]}.")
        return cls(**spec)


# `ursa train`'s augmentation when none is given: random crops of 35-100% of the area, left-right flips and
# colour jitter on every image (the feature cache's views of every run before the knobs existed).
DEFAULT_AUG = Augment(max_rotate=0.0, max_zoom=1.0, max_warp=0.0, p_lighting=1.0, min_scale=0.35, saturation=0.2)
# --aug presets: the default above, fastai's aug_transforms() defaults, and none (resize and crop only)
AUG_PRESETS = {
    "default": DEFAULT_AUG,
    "lesson": Augment(),
    "none": Augment(do_flip=False, max_rotate=0.0, max_zoom=1.0, max_lighting=0.0, max_warp=0.0),
}


def _augment(cfg: Any, value: Any) -> Augment:
    """DataConfig.aug as an Augment: given as one, as a preset name, or as a spec dict (config.json)."""
    if isinstance(value, Augment):
        return value
    if isinstance(value, str) and value in AUG_PRESETS:
        return AUG_PRESETS[value]
    if isinstance(value, dict):
        return Augment.from_spec(value)
    allowed = f"an Augment (ursa.aug_transforms(...)), one of {', '.join(map(repr, AUG_PRESETS))} or a dict of Augment's fields"
    raise DataError(_message(_label(cfg, "aug", "--aug"), allowed, value, ""))


@dataclass(frozen=True)
class DataConfig:
    """How a dataset is read and split."""

    train: str | None = None  # sub-folder holding the training class folders (None: one folder, split at random)
    valid: str | None = None  # sub-folder holding the validation class folders (with `train`)
    labels: str | None = None  # CSV `name,label` (names relative to the root) instead of class folders
    valid_pct: float = 0.2  # share of each class held out for validation when splitting at random, in (0, 1)
    seed: int = 42  # seeds the split, the augmentations and the training
    flip: bool = True  # horizontal flips in augmentation (turn off for digits, text, left/right classes)
    allow_new_labels: bool = False  # accept CSV labels that are not class folders under the root
    aug: Augment = DEFAULT_AUG  # training augmentation (also a preset name or a spec dict); it flips only when `flip` allows

    def __post_init__(self) -> None:
        for name in ("train", "valid", "labels"):
            _text(self, DataError, name, f"--{name}", optional=True)
        _number(self, DataError, "valid_pct", "--valid-pct", above=0.0, below=1.0, hint="Try 0.2 for 20%.")
        _number(self, DataError, "seed", "--seed", integer=True, at_least=0, at_most=MAX_SEED)
        _flag(self, DataError, "flip", "--flip/--no-flip")
        _flag(self, DataError, "allow_new_labels", "--allow-new-labels")
        aug = _augment(self, self.aug)
        # flips (and with them the mirrored view and test-time augmentation) only when both say so
        flip = self.flip and aug.do_flip
        object.__setattr__(self, "flip", flip)
        object.__setattr__(self, "aug", aug if aug.do_flip == flip else dataclasses.replace(aug, do_flip=flip))


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. The default trains on cached backbone features, then optionally fine-tunes."""

    arch: str = "efficientnet_lite0"  # registry name (see `ursa.models.ARCHS`), any timm model name, or "auto" (see `budget`)
    weights: str | None = None  # weights file (.safetensors or .pth state dict) for a non-packaged backbone
    head: str = "lbfgs"  # head solver: "lbfgs" (linear head fitted to convergence) or "one_cycle" (SGD epochs)
    c: float = 0.5  # inverse L2 strength of the lbfgs head (as scikit-learn's C): larger fits the cache harder
    epochs: int = 12  # epochs of head training on the feature cache (head="one_cycle")
    lr: float | None = None  # peak learning rate of the one-cycle head stage; None: 3e-3
    views: int = 8  # most augmented views per training image in the feature cache (small sets get more)
    fine_tune: int = 0  # epochs of full fine-tuning after the cached stage (unfrozen, discriminative lrs)
    fine_tune_lr: float = 1e-4  # peak learning rate of the head in full fine-tuning (the body gets 1/10 and 1/100)
    size: int | None = None  # input side in pixels; None: the backbone's own (224 for EfficientNet-Lite0)
    batch_size: int = 32  # images per batch for feature extraction and fine-tuning (shared out among DDP ranks)
    threads: int | None = None  # torch CPU threads; None: all cores
    tta: bool = True  # average plain and flipped views when evaluating (only with DataConfig.flip)
    view_budget: int = 2000  # most cached training samples (images x views): small sets get more views, large ones fewer
    num_workers: int = 0  # DataLoader processes decoding images for feature extraction and fine-tuning (0: this one)
    dropout: float = 0.25  # dropout before the head's linear layer, in [0, 1) (head="one_cycle"; the lbfgs head has none)
    head_batch_size: int = 64  # cached feature rows per batch of the one-cycle head stage
    wd: float = 0.01  # AdamW weight decay of the one-cycle head stage
    label_smoothing: float = 0.1  # label smoothing of the one-cycle head stage, in [0, 1)
    fine_tune_label_smoothing: float = 0.0  # label smoothing of full fine-tuning, in [0, 1)
    fine_tune_size: int | None = None  # input side in pixels for fine-tuning images; None: the same as the cached stage
    device: str = "auto"  # "auto" (this rank's GPU when there is one, else the CPU), "cpu" or "cuda"
    precision: str = "auto"  # fine-tuning precision: "auto", "fp32", "bf16" or "fp16" (see choose_precision)
    channels_last: bool | None = None  # channels-last image batches in fine-tuning; None: on a GPU only
    budget: float | None = None  # seconds for arch="auto" to fit (see ursa.train.budget); None: 1.5x the default backbone's estimate

    def __post_init__(self) -> None:
        e = TrainError
        _text(self, e, "arch", "--arch")
        _text(self, e, "weights", "--weights", optional=True)  # a path
        _text(self, e, "head", "--head", choices=HEADS)
        _number(self, e, "c", "--c", above=0.0, hint="Try 0.5 (the default).")
        _number(self, e, "epochs", "--epochs", integer=True, at_least=1)
        _number(self, e, "lr", "--lr", above=0.0, optional=True, hint="Leave it out for 3e-3, or run `ursa lr-find`.")
        _number(self, e, "views", "--views", integer=True, at_least=0)
        _number(self, e, "fine_tune", "--fine-tune", integer=True, at_least=0, unit="epochs")
        _number(self, e, "fine_tune_lr", "--fine-tune-lr", above=0.0, hint="Try 1e-4 (the default).")
        # at 32 px a backbone that downsamples 32x still leaves a 1x1 feature map; 2048 catches typos
        _number(self, e, "size", "--size", integer=True, at_least=32, at_most=2048, unit="pixels", optional=True,
                hint="Leave it out to use the backbone's own (224 for efficientnet_lite0).")  # fmt: skip
        _number(self, e, "batch_size", "--bs", integer=True, at_least=1)
        _number(self, e, "threads", "--threads", integer=True, at_least=1, optional=True, hint="Leave it out to use every core.")
        _flag(self, e, "tta", None)
        _number(self, e, "view_budget", None, integer=True, at_least=1, unit="samples")
        _number(self, e, "num_workers", None, integer=True, at_least=0, unit="processes")
        _number(self, e, "dropout", None, at_least=0.0, below=1.0)
        _number(self, e, "head_batch_size", None, integer=True, at_least=1)
        _number(self, e, "wd", None, at_least=0.0)
        _number(self, e, "label_smoothing", None, at_least=0.0, below=1.0)
        _number(self, e, "fine_tune_label_smoothing", None, at_least=0.0, below=1.0)
        _number(self, e, "fine_tune_size", None, integer=True, at_least=32, at_most=2048, unit="pixels", optional=True)
        _text(self, e, "device", "--device", choices=DEVICES)
        _text(self, e, "precision", "--precision", choices=PRECISIONS)
        _flag(self, e, "channels_last", None, optional=True)
        _number(self, e, "budget", "--budget", above=0.0, optional=True, unit="seconds", hint="Try 60, or leave it out for the default backbone.")
        if self.arch == "auto" and self.weights is not None:
            raise e("--arch auto picks among the packaged backbones, whose weights come installed, so it takes no --weights. Leave out --weights, or name the --arch the weights file is for.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The TrainConfig a run's config.json recorded (its "train" object), checked like any other.

        Runs written before these settings were fields kept ten of them as strings under "extra"; they are
        read into their fields (with their old meaning: fine_tune_size 0 was "not given", label_smoothing
        set both stages). Other extra keys never did anything and are dropped; an unknown field raises TrainError.
        """
        d = dict(d)
        legacy = d.pop("extra", None) or {}
        if not isinstance(legacy, dict):
            raise TrainError(f"the train settings' \"extra\" must be a JSON object, got {legacy!r}. Train the run again.")
        for key, (names, convert) in _LEGACY_EXTRA.items():
            if key in legacy:
                try:
                    value = convert(legacy[key])
                except (TypeError, ValueError):
                    raise TrainError(f"the train settings' extra {key!r} is {legacy[key]!r}, which cannot be read as its field {names[0]!r}. Train the run again.") from None
                d.update({n: value for n in names if n not in d})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TrainError(f"the train settings hold unknown fields {unknown}; the run was written by another version of Ursa. Train it again with this one.")
        return cls(**d)


def _int_or_none(value: Any) -> int | None:
    return int(value) or None


# TrainConfig.extra key of runs written before the typed fields -> (fields it sets, how it was read)
_LEGACY_EXTRA: dict[str, tuple[tuple[str, ...], Any]] = {
    "view_budget": (("view_budget",), int),
    "num_workers": (("num_workers",), int),
    "dropout": (("dropout",), float),
    "head_bs": (("head_batch_size",), int),
    "wd": (("wd",), float),
    "label_smoothing": (("label_smoothing", "fine_tune_label_smoothing"), float),
    "fine_tune_size": (("fine_tune_size",), _int_or_none),
    "device": (("device",), str),
    "precision": (("precision",), str),
    "channels_last": (("channels_last",), bool),
}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


# A current desktop browser's User-Agent: many image hosts refuse or throttle clients that do not send one.
_BROWSER_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


@dataclass(frozen=True)
class CollectConfig:
    """How images are downloaded: limits, politeness and retries. See `ursa.collect.download`."""

    max_images: int | None = None  # most good images to keep per class, counting earlier runs (None: every URL)
    concurrency: int = 64  # downloads in flight at once, over all hosts
    per_host: int = 8  # downloads in flight at once to one host (scheme, name and port)
    timeout: float = 10.0  # seconds to connect, and seconds allowed between two reads of a response
    total_timeout: float = 30.0  # seconds allowed for a whole response, so a slow drip cannot hold a slot
    retries: int = 2  # extra tries after a transient failure (connection reset, 429, 5xx); read timeouts are not retried
    backoff: float = 0.25  # seconds before the first retry, doubled for each further retry (or the server's Retry-After, up to 30 s)
    max_redirects: int = 5  # redirects followed per URL before it fails
    max_bytes: int = 20 * 2**20  # largest response body kept, in bytes (20 MiB)
    max_pixels: int = MAX_PIXELS  # largest width x height accepted (decompression-bomb guard); larger images fail
    user_agent: str = _BROWSER_UA  # User-Agent header sent with every request
    retry_failed: bool = False  # also try again the URLs an earlier run recorded as failed
    processes: int | None = None  # processes doing the HTTP work, this one included (None: up to 4 by CPU count, for 400+ URLs; 1: this one only)

    def __post_init__(self) -> None:
        e = CollectError
        _number(self, e, "max_images", "--max", integer=True, at_least=1, optional=True)
        _number(self, e, "concurrency", "--concurrency", integer=True, at_least=1)
        _number(self, e, "per_host", "--per-host", integer=True, at_least=1)
        _number(self, e, "timeout", "--timeout", above=0.0, unit="seconds")
        _number(self, e, "total_timeout", None, above=0.0, unit="seconds")
        _number(self, e, "retries", None, integer=True, at_least=0)
        _number(self, e, "backoff", None, at_least=0.0, unit="seconds")
        _number(self, e, "max_redirects", None, integer=True, at_least=0)
        _number(self, e, "max_bytes", None, integer=True, at_least=1)
        _number(self, e, "max_pixels", None, integer=True, at_least=1)
        _text(self, e, "user_agent", None)
        _flag(self, e, "retry_failed", "--retry-failed")
        _number(self, e, "processes", "--processes", integer=True, at_least=1, optional=True)


@dataclass(frozen=True)
class VerifyConfig:
    """How a dataset folder is checked and repaired. See `ursa.verify`."""

    max_size: int | None = None  # longest side in pixels; larger images are shrunk to it (None: keep sizes)
    max_pixels: int = MAX_PIXELS  # largest width x height decoded; larger files are quarantined as decompression bombs
    quality: int = 90  # JPEG/WebP quality (1-95) used when a repaired or shrunk image is written again
    repair: bool = True  # fix orientation, colour mode and truncation; False: only report and quarantine

    def __post_init__(self) -> None:
        e = VerifyError
        _number(self, e, "max_size", "--max-size", integer=True, at_least=16, unit="pixels", optional=True,
                hint="Give the longest side in pixels, e.g. 500, or leave it out to keep sizes.")  # fmt: skip
        _number(self, e, "max_pixels", None, integer=True, at_least=1)
        _number(self, e, "quality", None, integer=True, at_least=1, at_most=95)
        _flag(self, e, "repair", "--repair/--no-repair")
