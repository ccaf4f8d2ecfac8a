"""Image DataLoaders for a split: augmented training batches, evaluation batches, sample batches to look at.

A file that fails to decode while training is dropped from its batch (and counted), never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ursa.config import DataConfig
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
    """Training and validation DataLoaders of one split, with its classes and preprocessing."""

    train: DataLoader
    valid: DataLoader
    split: Split
    data_config: dict[str, Any]
    flip: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    @property
    def c(self) -> int:
        return len(self.split.classes)

    def preprocess(self, item: Any) -> torch.Tensor:
        """A path or PIL image -> the evaluation tensor (3, H, W)."""
        im = item if hasattr(item, "convert") else open_image(item, min_side=eval_min_side(self.data_config))
        return eval_transform(self.data_config)(im.convert("RGB"))

    def sample_batch(self, n: int = 9, *, valid: bool = False) -> tuple[list[Any], list[str], str]:
        """`n` (augmented, for training) images as (H, W, 3) arrays in [0, 1], their labels, and a caption.

        Drawing them is `ursa.interpret.plots.show_batch(dls)` or `learn.show_batch()`.
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


class ImageDataLoaders:
    """Factory methods named as in the lesson."""

    @staticmethod
    def from_split(split: Split, data_config: dict[str, Any], *, bs: int = 32, flip: bool = True, num_workers: int = 0, size: int | None = None) -> DataBunch:
        """DataLoaders over an existing split; `size` overrides the model's input side (px)."""
        side = size or input_size(data_config)
        data_config = {**data_config, "input_size": (3, side, side)}
        tr = ImageDataset(split.root, split.train, split.classes, train_transform(data_config, size=side, flip=flip), size=side)
        va = ImageDataset(split.root, split.valid, split.classes, eval_transform(data_config, size=side), size=side, min_side=eval_min_side(data_config, size=side))
        g = torch.Generator().manual_seed(split.seed)
        common = dict(num_workers=num_workers, collate_fn=_collate, persistent_workers=num_workers > 0)
        train = DataLoader(tr, batch_size=bs, shuffle=True, drop_last=len(tr) > bs, generator=g, **common)
        valid = DataLoader(va, batch_size=bs * 2, shuffle=False, **common)
        return DataBunch(train, valid, split, data_config, flip)

    @staticmethod
    def from_folder(root: str | Path, *, train: str | None = None, valid: str | None = None, valid_pct: float = 0.2, seed: int = 42, arch: str = "efficientnet_lite0", bs: int = 32, flip: bool = True, **kwargs: Any) -> DataBunch:
        """Class folders under `root` (or its `train`/`valid` sub-folders)."""
        split = build_split(root, DataConfig(train=train, valid=valid, valid_pct=valid_pct, seed=seed, flip=flip))
        return ImageDataLoaders.from_split(split, default_data_config(arch), bs=bs, flip=flip, **kwargs)

    @staticmethod
    def from_csv(root: str | Path, csv_path: str | Path = "cleaned.csv", *, train: str | None = None, valid: str | None = None, valid_pct: float = 0.2, seed: int = 42, arch: str = "efficientnet_lite0", bs: int = 32, flip: bool = True, allow_new_labels: bool = False, **kwargs: Any) -> DataBunch:
        """Labels from a CSV `name,label` (names relative to `root`, never leaving it), such as `cleaned.csv`.

        Rows keep their side when the CSV has a `split` (train/valid) or `is_valid` column, or when
        `root` holds train/ and valid/ folders (found, or named by `train`/`valid`); otherwise
        `valid_pct` of each class is drawn for validation (seeded).
        """
        split = build_split(root, DataConfig(train=train, valid=valid, labels=str(csv_path), valid_pct=valid_pct, seed=seed, flip=flip, allow_new_labels=allow_new_labels))
        return ImageDataLoaders.from_split(split, default_data_config(arch), bs=bs, flip=flip, **kwargs)
