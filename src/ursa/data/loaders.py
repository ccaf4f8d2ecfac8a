"""Image DataLoaders for a split: augmented training batches, evaluation batches, sample batches to look at.

A file that fails to decode while training is dropped from its batch (and counted), never a crash.
`ImageDataLoaders.from_folder` / `from_csv` take the lesson's arguments (`train=".", valid_pct=0.2, seed=42,
size=224, ds_tfms=aug_transforms(...)`); without `ds_tfms` the training images get `DEFAULT_AUG`, the
augmentation `ursa train` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ursa.config import AUG_PRESETS, DEFAULT_AUG, Augment, DataConfig, check_number
from ursa.errors import DataError
from ursa.imageio import eval_min_side
from ursa.data.items import Item
from ursa.data.split import Split, build_split
from ursa.data.transforms import denormalize, eval_transform, input_size, open_image, train_transform

__all__ = ["ImageDataset", "DataBunch", "ImageDataLoaders", "default_data_config"]


def default_data_config(arch: str = "efficientnet_lite0") -> dict[str, Any]:
    """The preprocessing a backbone defines (no weights are loaded)."""
    import timm

    from ursa.models import ARCHS

    name = ARCHS[arch].timm_name if arch in ARCHS else arch
    return dict(timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False, num_classes=0)))


class ImageDataset(Dataset):
    """(image tensor (3, H, W), class index) for each item; None for a file that will not decode."""

    def __init__(self, root: Path, items: Sequence[Item], classes: Sequence[str], tf: Callable[[Any], torch.Tensor], *, size: int, min_side: int | None = None):
        self.root, self.items, self.tf, self.size = Path(root), list(items), tf, size
        self.min_side = min_side or size  # smallest short side a JPEG is draft-decoded to
        self.index = {c: i for i, c in enumerate(classes)}
        self.failed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        it = self.items[i]
        try:
            return self.tf(open_image(self.root / it.name, min_side=self.min_side)), self.index[it.label]
        except Exception as exc:  # a broken file is skipped, whatever the decoder raised
            self.failed[it.name] = f"{type(exc).__name__}: {exc}"
            return None


def _collate(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    good = [b for b in batch if b is not None]
    if not good:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.long)


@dataclass
class DataBunch:
    """Training and validation DataLoaders of one split, with its classes, preprocessing and augmentation."""

    train: DataLoader
    valid: DataLoader
    split: Split
    data_config: dict[str, Any]
    flip: bool = True  # left-right flips allowed (so also the mirrored view and test-time augmentation); = aug.do_flip
    extra: dict[str, Any] = field(default_factory=dict)
    aug: Augment = DEFAULT_AUG  # the training images' augmentation (the feature cache draws its views with it)

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    @property
    def c(self) -> int:
        return len(self.split.classes)

    @property
    def train_ds(self) -> "ImageDataset":
        """The training images: `len()` counts them, `[i]` is (augmented tensor (3, H, W), class index)."""
        return self.train.dataset  # type: ignore[return-value]

    @property
    def valid_ds(self) -> "ImageDataset":
        """The validation images: `len()` counts them, `[i]` is (evaluation tensor (3, H, W), class index)."""
        return self.valid.dataset  # type: ignore[return-value]

    def preprocess(self, item: Any) -> torch.Tensor:
        """A path or PIL image -> the evaluation tensor (3, H, W)."""
        im = item if hasattr(item, "convert") else open_image(item, min_side=eval_min_side(self.data_config))
        return eval_transform(self.data_config)(im.convert("RGB"))

    def sample_batch(self, n: int = 9, *, valid: bool = False) -> tuple[list[Any], list[str], str]:
        """`n` (augmented, for training) images as (H, W, 3) arrays in [0, 1], their labels, and a caption.

        The images are a seeded choice; the augmentations are fresh draws each time, as in training.
        Drawing them is `dls.show_batch()`, `ursa.interpret.plots.show_batch(dls)` or `learn.show_batch()`.
        """
        ds: ImageDataset = (self.valid if valid else self.train).dataset  # type: ignore[assignment]
        g = torch.Generator().manual_seed(self.split.seed)
        idx = torch.randperm(len(ds), generator=g)[:n].tolist()
        imgs, titles = [], []
        for i in idx:
            s = ds[i]
            if s is None:
                continue
            imgs.append(denormalize(s[0], self.data_config).permute(1, 2, 0).numpy())
            titles.append(self.classes[s[1]])
        side = input_size(self.data_config)
        return imgs, titles, f"{'validation' if valid else 'augmented training'} images, {side}x{side} px"

    def show_batch(self, rows: int = 3, figsize: tuple[float, float] | None = None, *, n: int | None = None, valid: bool = False, out: str | Path | None = None) -> Any:
        """A grid of `rows` x `rows` augmented training images (or `n` of them) with their labels, as the
        lesson's `data.show_batch(rows=3, figsize=(7, 8))`; `valid=True` shows validation images.

        Returns the matplotlib Figure (shown inline in Jupyter); `out` also writes it as a PNG.
        """
        check_number(rows, "show_batch(rows=...)", DataError, integer=True, at_least=1)
        check_number(n, "show_batch(n=...)", DataError, integer=True, at_least=1, optional=True)
        if not len(self.valid_ds if valid else self.train_ds):
            raise DataError(f"there are no {'validation' if valid else 'training'} images to show. Check the dataset with `ursa info {self.split.root}`.")
        from ursa.interpret.plots import show_batch

        return show_batch(self, n or rows * rows, ncols=rows, figsize=figsize, valid=valid, out=out)


def _augment(value: Any, name: str) -> Augment | None:
    """`ds_tfms` / `batch_tfms` as an Augment (None when not given)."""
    if value is None or isinstance(value, Augment):
        return value
    if isinstance(value, str) and value in AUG_PRESETS:
        return AUG_PRESETS[value]
    raise DataError(
        f"{name} must be aug_transforms(...) (an Augment), a preset name ({', '.join(map(repr, AUG_PRESETS))}) or None, "
        f"got {type(value).__name__} {value!r}. Ursa builds its training transform from those settings: "
        f"pass {name}=aug_transforms(max_rotate=10, max_zoom=1.1, max_lighting=0.2)."
    )


def _resolve_tfms(ds_tfms: Any, batch_tfms: Any, item_tfms: Any, size: int | None) -> tuple[Augment | None, int | None]:
    """The Augment and the input side the lesson's `ds_tfms` / fastbook's `batch_tfms` and `item_tfms` ask for.

    `item_tfms` may only be a size in pixels (Ursa resizes and crops every image to `size` itself).
    """
    a, b = _augment(ds_tfms, "ds_tfms"), _augment(batch_tfms, "batch_tfms")
    if a is not None and b is not None:
        raise DataError("pass the augmentation once: ds_tfms=aug_transforms(...) or batch_tfms=aug_transforms(...), not both.")
    if item_tfms is not None:
        if isinstance(item_tfms, bool) or not isinstance(item_tfms, int):
            raise DataError(
                f"item_tfms takes only an input side in pixels, got {item_tfms!r}. Ursa resizes and crops every image "
                "to `size` itself: pass size=224 (and ds_tfms=aug_transforms(...) for augmentation)."
            )
        if size is not None and size != item_tfms:
            raise DataError(f"item_tfms={item_tfms} and size={size} disagree; pass size={size} alone.")
        size = item_tfms
    return (a if a is not None else b), size


def _folders(root: Path, train: str | None, valid: str | None) -> tuple[Path, str | None, str | None]:
    """fastai's `from_folder(path, train=..., valid=...)` as (root, train, valid) for `build_split`.

    train="." (or None) without `valid`: class folders directly under `path`, split by `valid_pct`.
    train="sub" without `valid`: class folders under `path/sub`, split by `valid_pct`.
    Both: the given training and validation folders.
    """
    here = train in (None, ".", "")
    if valid is None:
        return (root, None, None) if here else (root / str(train), None, None)
    if here:
        raise DataError(
            f"train={train!r} with valid={valid!r}: name both sub-folders (e.g. train='train', valid='valid'), "
            "or pass train='.' alone to split the class folders under the path by valid_pct."
        )
    return root, train, valid


class ImageDataLoaders:
    """Factory methods named as in the lesson."""

    @staticmethod
    def from_split(split: Split, data_config: dict[str, Any], *, bs: int = 32, flip: bool = True, num_workers: int = 0, size: int | None = None, aug: Augment | None = None) -> DataBunch:
        """DataLoaders over an existing split; `size` overrides the model's input side (px); `aug` is the
        training augmentation (None: `DEFAULT_AUG`), with flips only when `flip` allows."""
        check_number(bs, "bs", DataError, integer=True, at_least=1)
        check_number(size, "size", DataError, integer=True, at_least=32, at_most=2048, optional=True, unit="pixels")
        check_number(num_workers, "num_workers", DataError, integer=True, at_least=0)
        aug = DataConfig(flip=flip, aug=DEFAULT_AUG if aug is None else aug).aug  # one rule for flip + aug.do_flip
        side = size or input_size(data_config)
        data_config = {**data_config, "input_size": (3, side, side)}
        tr = ImageDataset(split.root, split.train, split.classes, train_transform(data_config, size=side, aug=aug), size=side)
        va = ImageDataset(split.root, split.valid, split.classes, eval_transform(data_config, size=side), size=side, min_side=eval_min_side(data_config, size=side))
        g = torch.Generator().manual_seed(split.seed)
        common = dict(num_workers=num_workers, collate_fn=_collate, persistent_workers=num_workers > 0)
        train = DataLoader(tr, batch_size=bs, shuffle=True, drop_last=len(tr) > bs, generator=g, **common)
        valid = DataLoader(va, batch_size=bs * 2, shuffle=False, **common)
        return DataBunch(train, valid, split, data_config, aug.do_flip, aug=aug)

    @staticmethod
    def from_folder(
        path: str | Path,
        train: str | None = None,
        valid: str | None = None,
        *,
        valid_pct: float = 0.2,
        seed: int = 42,
        size: int | None = None,
        ds_tfms: Augment | str | None = None,
        item_tfms: int | None = None,
        batch_tfms: Augment | str | None = None,
        bs: int = 32,
        arch: str = "efficientnet_lite0",
        flip: bool = True,
        num_workers: int = 0,
    ) -> DataBunch:
        """Class folders under `path`, as the lesson writes it:
        `from_folder(path, train=".", valid_pct=0.2, seed=42, size=224, ds_tfms=aug_transforms(...))`.

        train="." (or left out): the class folders directly under `path`, `valid_pct` of each class held
        out (seeded), or `path`'s train/ and valid/ folders when it has them; train="training",
        valid="validation": those two folders. `size` is the input side in pixels (default: the backbone's
        own); `ds_tfms` (or fastbook's `batch_tfms`) the augmentation, default `DEFAULT_AUG`; `item_tfms`
        only a size. `arch` names the backbone whose preprocessing (mean, std, crop) is used.
        """
        aug, size = _resolve_tfms(ds_tfms, batch_tfms, item_tfms, size)
        root, train, valid = _folders(Path(path), train, valid)
        split = build_split(root, DataConfig(train=train, valid=valid, valid_pct=valid_pct, seed=seed, flip=flip))
        return ImageDataLoaders.from_split(split, default_data_config(arch), bs=bs, flip=flip, size=size, aug=aug, num_workers=num_workers)

    @staticmethod
    def from_csv(
        path: str | Path,
        csv_fname: str | Path = "cleaned.csv",
        *,
        train: str | None = None,
        valid: str | None = None,
        valid_pct: float = 0.2,
        seed: int = 42,
        size: int | None = None,
        ds_tfms: Augment | str | None = None,
        item_tfms: int | None = None,
        batch_tfms: Augment | str | None = None,
        bs: int = 32,
        arch: str = "efficientnet_lite0",
        flip: bool = True,
        allow_new_labels: bool = False,
        num_workers: int = 0,
    ) -> DataBunch:
        """Labels from a CSV `name,label` such as `cleaned.csv`, as the lesson writes it:
        `from_csv(path, "cleaned.csv", valid_pct=0.2, seed=42, size=224)`.

        `csv_fname` is relative to `path` (as in fastai), or absolute; the names in it are relative to
        `path` and never leave it. Rows keep their side when the CSV has a `split` (train/valid) or
        `is_valid` column, or when `path` holds train/ and valid/ folders (found, or named by
        `train`/`valid`); otherwise `valid_pct` of each class is drawn for validation (seeded). The other
        arguments are `from_folder`'s.
        """
        aug, size = _resolve_tfms(ds_tfms, batch_tfms, item_tfms, size)
        root, csv = Path(path), Path(csv_fname)
        csv = csv if csv.is_absolute() else (root / csv).absolute()
        split = build_split(root, DataConfig(train=train, valid=valid, labels=str(csv), valid_pct=valid_pct, seed=seed, flip=flip, allow_new_labels=allow_new_labels))
        return ImageDataLoaders.from_split(split, default_data_config(arch), bs=bs, flip=flip, size=size, aug=aug, num_workers=num_workers)
