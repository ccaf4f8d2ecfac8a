"""ImageDataLoaders as the lesson writes it: from_folder(train="."), from_csv, classes / c / train_ds / valid_ds,
ds_tfms=aug_transforms(...), show_batch, and the errors for arguments Ursa does not take."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_dataset
from ursa.config import DEFAULT_AUG
from ursa.data.loaders import DataBunch, ImageDataLoaders
from ursa.data.transforms import aug_transforms
from ursa.errors import DataError


def test_from_folder_as_the_lesson_writes_it(tiny_dataset: Path) -> None:
    aug = aug_transforms(max_rotate=10, max_zoom=1.1, max_lighting=0.2)
    dls = ImageDataLoaders.from_folder(tiny_dataset, train=".", valid_pct=0.2, seed=42, size=32, ds_tfms=aug, bs=4)
    assert isinstance(dls, DataBunch)
    assert dls.classes == ["bear", "cat", "dog"] and dls.c == 3
    assert len(dls.train_ds) + len(dls.valid_ds) == 24 and 3 <= len(dls.valid_ds) <= 6
    assert dls.aug == aug and dls.flip is True
    x, y = dls.train_ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 3
    xb, yb = next(iter(dls.train))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.long
    xv, _ = next(iter(dls.valid))
    assert xv.shape[1:] == (3, 32, 32)
    # the same seed gives the same split; train="." is the same as leaving train out
    again = ImageDataLoaders.from_folder(tiny_dataset, valid_pct=0.2, seed=42, size=32)
    assert [it.name for it in again.split.valid] == [it.name for it in dls.split.valid]
    assert again.aug == DEFAULT_AUG  # no ds_tfms: `ursa train`'s augmentation


def test_from_folder_with_named_folders(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d" / "training", per_class=4)
    make_dataset(tmp_path / "d" / "validation", per_class=2, seed=1)
    dls = ImageDataLoaders.from_folder(tmp_path / "d", train="training", valid="validation", size=32)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (12, 6) and dls.split.how == "folders"
    # one named folder alone: its class folders, split by valid_pct
    one = ImageDataLoaders.from_folder(tmp_path / "d", train="training", valid_pct=0.25, size=32)
    assert len(one.train_ds) + len(one.valid_ds) == 12 and one.split.how == "random"
    with pytest.raises(DataError, match=r"train='\.' with valid='validation'"):
        ImageDataLoaders.from_folder(tmp_path / "d", train=".", valid="validation")


def test_from_csv_reads_the_csv_relative_to_the_path(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = ["name,label"] + [f"{c}/{i:03d}.png,{c}" for c in ("bear", "cat") for i in range(8)]
    (tiny_dataset / "cleaned.csv").write_text("\n".join(rows))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cleaned.csv").write_text("name,label\nnot/here.png,x\n")  # a CSV of the same name in the working folder
    monkeypatch.chdir(elsewhere)
    dls = ImageDataLoaders.from_csv(tiny_dataset, "cleaned.csv", valid_pct=0.2, seed=42, size=32)
    assert dls.classes == ["bear", "cat"] and len(dls.train_ds) + len(dls.valid_ds) == 16
    absolute = ImageDataLoaders.from_csv(tiny_dataset, tiny_dataset / "cleaned.csv", size=32)
    assert [it.name for it in absolute.split.valid] == [it.name for it in dls.split.valid]
    with pytest.raises(DataError, match=f"labels file {os.fspath(tiny_dataset.absolute() / 'missing.csv')} does not exist"):
        ImageDataLoaders.from_csv(tiny_dataset, "missing.csv")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ds_tfms=[("flip",)]), r"ds_tfms must be aug_transforms\(\.\.\.\) \(an Augment\).*got list"),
        (dict(batch_tfms="strong"), r"batch_tfms must be aug_transforms"),
        (dict(ds_tfms=aug_transforms(), batch_tfms=aug_transforms()), "pass the augmentation once"),
        (dict(item_tfms=object()), r"item_tfms takes only an input side in pixels.*pass size=224"),
        (dict(item_tfms=64, size=32), r"item_tfms=64 and size=32 disagree"),
        (dict(size=0), r"size must be from 32 to 2048 pixels, got 0"),
        (dict(size=224.0), r"size must be a whole number"),
        (dict(bs=0), r"bs must be at least 1, got 0"),
        (dict(flip="no"), r"DataConfig.flip"),
    ],
)
def test_arguments_ursa_does_not_take_are_clear_errors(tiny_dataset: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        ImageDataLoaders.from_folder(tiny_dataset, train=".", **kwargs)


def test_fastbook_spellings_are_accepted(tiny_dataset: Path) -> None:
    aug = aug_transforms(mult=2)
    dls = ImageDataLoaders.from_folder(tiny_dataset, item_tfms=32, batch_tfms=aug)
    assert dls.aug == aug and dls.train_ds[0][0].shape == (3, 32, 32)
    assert ImageDataLoaders.from_folder(tiny_dataset, ds_tfms="none", size=32).aug.max_lighting == 0.0


def test_no_flip_turns_the_augmentations_flips_off(tiny_dataset: Path) -> None:
    dls = ImageDataLoaders.from_folder(tiny_dataset, ds_tfms=aug_transforms(), flip=False, size=32)
    assert dls.flip is False and dls.aug == aug_transforms(do_flip=False)


def test_show_batch_draws_augmented_training_images_with_labels(tiny_dataset: Path, tmp_path: Path) -> None:
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    dls = ImageDataLoaders.from_folder(tiny_dataset, train=".", valid_pct=0.2, seed=42, size=64, ds_tfms=aug_transforms(max_rotate=30, p_affine=1.0))
    out = tmp_path / "batch.png"
    fig = dls.show_batch(rows=3, figsize=(7, 8), out=out)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 9 and {ax.get_title() for ax in shown} <= set(dls.classes)
    assert tuple(fig.get_size_inches()) == (7.0, 8.0)
    assert "augmented training images, 64x64 px" in fig._suptitle.get_text()
    with Image.open(out) as im:
        assert abs(im.size[0] / im.size[1] - 7 / 8) < 0.15  # drawn at the figsize asked for
    fig2 = dls.show_batch(rows=2, valid=True)
    assert len([ax for ax in fig2.axes if ax.images]) == 4 and "validation images" in fig2._suptitle.get_text()
    with pytest.raises(DataError, match=r"show_batch\(rows=\.\.\.\) must be at least 1, got 0"):
        dls.show_batch(rows=0)
