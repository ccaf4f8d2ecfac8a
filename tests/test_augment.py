"""aug_transforms / Augment: fastai's names and defaults, checked ranges, each transform's effect, seeded
determinism, the default kept exactly as before, the feature cache's signature, and the CLI's options."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ursa.config import AUG_PRESETS, DEFAULT_AUG, Augment, DataConfig, to_dict
from ursa.data.transforms import aug_transforms, train_transform
from ursa.errors import DataError

SIDE = 48
DC = {"input_size": (3, SIDE, SIDE), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear", "crop_pct": 0.875}
OFF = dict(do_flip=False, max_rotate=0.0, max_zoom=1.0, max_lighting=0.0, max_warp=0.0)  # every transform off


def picture(side: int = SIDE) -> Image.Image:
    """A square picture with no symmetry: a smooth gradient (no zero pixels) and an off-centre block."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    a = np.stack([40 + 180 * x, 40 + 180 * y, 120 + 60 * x * y], -1)
    a[side // 8 : side // 3, side // 6 : side // 2] = (250, 30, 30)
    return Image.fromarray(a.astype(np.uint8))


def normalized(im: Image.Image) -> torch.Tensor:
    x = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])(im)
    return (x - 0.5) / 0.25


def run(aug: Augment, seed: int, im: Image.Image | None = None) -> torch.Tensor:
    torch.manual_seed(seed)
    return train_transform(DC, aug=aug)(im if im is not None else picture())


# ---- the settings ----


def test_aug_transforms_has_fastai_names_and_defaults() -> None:
    a = aug_transforms()
    assert (a.do_flip, a.flip_vert, a.max_rotate, a.max_zoom, a.max_lighting, a.max_warp, a.p_affine, a.p_lighting) == (True, False, 10.0, 1.1, 0.2, 0.2, 0.75, 0.75)
    assert a == Augment() == AUG_PRESETS["lesson"] and a.min_scale == 1.0
    assert aug_transforms(max_rotate=10, max_zoom=1.1, max_lighting=0.2) == a  # the lesson's line
    doubled = aug_transforms(mult=2.0)  # fastai's mult scales rotate, lighting and warp
    assert (doubled.max_rotate, doubled.max_lighting, doubled.max_warp, doubled.max_zoom) == (20.0, 0.4, 0.4, 1.1)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_rotate", -1.0, "must be from 0 to 180 degrees"),
        ("max_rotate", 181, "must be from 0 to 180 degrees"),
        ("max_zoom", 0.9, "must be from 1 to 10"),
        ("max_zoom", math.inf, "must be a finite number"),
        ("max_lighting", 1.0, "must be at least 0 and less than 1"),
        ("max_lighting", -0.1, "must be at least 0 and less than 1"),
        ("max_warp", 1.5, "must be at least 0 and less than 1"),
        ("p_affine", 1.5, "must be from 0 to 1"),
        ("p_lighting", -0.5, "must be from 0 to 1"),
        ("min_scale", 0.0, "must be greater than 0 and at most 1"),
        ("do_flip", "yes", "must be True or False"),
        ("flip_vert", 1, "must be True or False"),
        ("max_rotate", "10", "must be a finite number"),
    ],
)
def test_an_out_of_range_value_names_the_field_the_range_and_the_value(field: str, value: object, words: str) -> None:
    with pytest.raises(DataError) as info:
        aug_transforms(**{field: value})
    msg = str(info.value)
    assert f"Augment.{field}" in msg and words in msg and f"got {value!r}" in msg


def test_mult_is_checked_and_numbers_are_stored_as_floats() -> None:
    with pytest.raises(DataError, match=r"mult=\.\.\.\) must be at least 0, got -1"):
        aug_transforms(mult=-1)
    a = Augment(max_rotate=10, max_zoom=np.float32(1.5))
    assert type(a.max_rotate) is float and type(a.max_zoom) is float
    assert a.spec() == Augment(max_rotate=10.0, max_zoom=1.5).spec()  # 10 and 10.0 are one setting, one cache
    assert json.loads(json.dumps(a.spec())) == a.spec()
    assert Augment.from_spec(a.spec()) == a
    with pytest.raises(DataError, match=r"unknown fields \['colour'\]"):
        Augment.from_spec({"colour": 1})


def test_data_config_holds_the_augmentation_and_one_flip_rule() -> None:
    assert DataConfig().aug == DEFAULT_AUG and DEFAULT_AUG == AUG_PRESETS["default"]
    assert DataConfig(aug="lesson").aug == aug_transforms()
    # flips (and the mirrored view) only when both the flag and the augmentation allow them
    assert DataConfig(flip=False).aug.do_flip is False
    off = DataConfig(aug=aug_transforms(do_flip=False))
    assert off.flip is False and off.aug.do_flip is False
    cfg = DataConfig(seed=3, aug=aug_transforms(max_rotate=25, flip_vert=True))
    assert DataConfig(**json.loads(json.dumps(to_dict(cfg)))) == cfg  # what config.json holds reads back
    assert DataConfig(**{k: v for k, v in to_dict(DataConfig()).items() if k != "aug"}) == DataConfig()  # runs written before
    with pytest.raises(DataError, match=r"--aug \(DataConfig.aug\) must be an Augment .* got 'fancy'"):
        DataConfig(aug="fancy")
    with pytest.raises(DataError, match=r"Augment.max_warp"):
        DataConfig(aug={**DEFAULT_AUG.spec(), "max_warp": 2.0})


# ---- the transforms ----


def legacy_train_transform(data_config: dict, *, size: int, flip: bool = True, scale: tuple[float, float] = (0.35, 1.0), jitter: float = 0.2) -> T.Compose:
    """The training transform before Augment existed (pinned here, so the default cannot drift)."""
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[data_config["interpolation"]]
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if jitter > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return T.Compose([*steps, T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))])


@pytest.mark.parametrize("flip", [True, False])
def test_the_default_augmentation_is_exactly_the_one_before(flip: bool) -> None:
    """`ursa train`'s numbers do not move: same steps, same random draws, same pixels."""
    im = picture(80).resize((80, 60))
    aug = DataConfig(flip=flip).aug
    for seed in range(6):
        torch.manual_seed(seed)
        old = legacy_train_transform(DC, size=SIDE, flip=flip)(im)
        assert torch.equal(run(aug, seed, im), old)


def test_everything_off_is_the_image_itself() -> None:
    x = run(Augment(**OFF), 0)
    assert torch.allclose(x, normalized(picture()), atol=1e-6)
    # large settings with probability 0 change nothing either
    never = Augment(do_flip=False, max_rotate=90.0, max_zoom=3.0, max_warp=0.5, max_lighting=0.8, p_affine=0.0, p_lighting=0.0)
    assert torch.allclose(run(never, 1), normalized(picture()), atol=1e-6)


def test_flip_mirrors_left_right_half_of_the_time() -> None:
    base = normalized(picture())
    outs = [run(Augment(**{**OFF, "do_flip": True}), s) for s in range(16)]
    mirrored = [torch.allclose(o, base.flip(-1), atol=1e-6) for o in outs]
    same = [torch.allclose(o, base, atol=1e-6) for o in outs]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)


def test_flip_vert_gives_the_eight_symmetries_of_the_square() -> None:
    base = normalized(picture())
    symmetries = [torch.rot90(b, k, dims=(-2, -1)) for b in (base, base.flip(-1)) for k in range(4)]
    seen = set()
    for s in range(64):
        o = run(Augment(**{**OFF, "do_flip": True, "flip_vert": True}), s)
        hits = [i for i, sym in enumerate(symmetries) if torch.allclose(o, sym, atol=1e-6)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(range(8))


@pytest.mark.parametrize("setting", [{"max_rotate": 30.0}, {"max_zoom": 2.0}, {"max_warp": 0.4}])
def test_rotate_zoom_and_warp_change_the_pixels_without_black_corners(setting: dict) -> None:
    base = normalized(picture())
    black = (0 - 0.5) / 0.25
    for s in range(4):
        o = run(Augment(**{**OFF, **setting, "p_affine": 1.0}), s)
        assert o.shape == base.shape
        assert (o - base).abs().mean() > 0.05  # it moved
        assert (o > black + 0.1).all()  # the border is reflected, as fastai pads, never black fill
        # a small geometric change: the picture is still mostly itself
        assert torch.corrcoef(torch.stack([o.flatten(), base.flatten()]))[0, 1] > 0.3


def test_a_small_rotation_is_a_rotation_about_the_centre() -> None:
    o = run(Augment(**{**OFF, "max_rotate": 10.0, "p_affine": 1.0}), 0)
    base = normalized(picture())
    c = SIDE // 2
    assert torch.allclose(o[:, c - 1 : c + 1, c - 1 : c + 1], base[:, c - 1 : c + 1, c - 1 : c + 1], atol=0.1)
    assert not torch.allclose(o, base, atol=0.05)


def test_lighting_changes_brightness_and_contrast_not_geometry() -> None:
    base = normalized(picture())
    o = run(Augment(**{**OFF, "max_lighting": 0.5, "p_lighting": 1.0}), 0)
    assert not torch.allclose(o, base, atol=0.05)
    assert torch.corrcoef(torch.stack([o.flatten(), base.flatten()]))[0, 1] > 0.95  # same picture, other light


def test_the_same_seed_gives_the_same_view_and_another_seed_another() -> None:
    aug = aug_transforms(flip_vert=True, max_rotate=20)
    assert torch.equal(run(aug, 7), run(aug, 7))
    assert not torch.equal(run(aug, 7), run(aug, 8))


def test_min_scale_below_one_crops_a_random_part() -> None:
    im = picture(96)
    outs = [run(Augment(**{**OFF, "min_scale": 0.2}), s, im) for s in range(3)]
    assert outs[0].shape == (3, SIDE, SIDE) and not torch.equal(outs[0], outs[1])


# ---- the feature cache's signature ----


def _backbone() -> SimpleNamespace:
    return SimpleNamespace(timm_name="tf_efficientnet_lite0", weights="packaged", data_config=dict(DC))


def legacy_signature(backbone: SimpleNamespace, *, flip: bool, seed: int) -> str:
    """The signature before Augment existed (pinned): caches written then must still be found."""
    spec = {
        "timm": backbone.timm_name,
        "weights": backbone.weights,
        "cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()},
        "flip": flip, "seed": seed, "jitter": 0.2, "scale": [0.35, 1.0], "v": 3,
    }  # fmt: skip
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def test_signature_of_the_default_is_unchanged_so_existing_caches_stay_valid() -> None:
    from ursa.train.features import _signature

    bb = _backbone()
    for flip in (True, False):
        assert _signature(bb, aug=DataConfig(flip=flip).aug, seed=42) == legacy_signature(bb, flip=flip, seed=42)


def test_signature_changes_with_the_augmentation_and_only_with_it(tmp_path: Path) -> None:
    from ursa.train.features import FeatureCache, _signature

    bb = _backbone()
    sig = lambda aug: _signature(bb, aug=aug, seed=42)  # noqa: E731
    lesson = aug_transforms()
    others = [lesson, aug_transforms(max_rotate=11), aug_transforms(flip_vert=True), aug_transforms(p_lighting=0.5), dataclasses.replace(DEFAULT_AUG, max_rotate=1.0)]
    assert len({sig(a) for a in [DEFAULT_AUG, *others]}) == 6
    assert sig(aug_transforms(max_rotate=10, max_lighting=0.2)) == sig(lesson) == sig(Augment.from_spec(lesson.spec()))
    # FeatureCache: flip=False turns the Augment's flips off, in its views and its signature
    cache = FeatureCache(tmp_path, bb, flip=False, aug=lesson)  # type: ignore[arg-type]
    assert cache.aug == dataclasses.replace(lesson, do_flip=False) and cache.flip is False
    assert cache.dir.name == sig(dataclasses.replace(lesson, do_flip=False)) != sig(lesson)


def test_cached_views_are_drawn_by_the_augmentation_with_per_view_seeds(tmp_path: Path) -> None:
    from conftest import make_dataset
    from ursa.config import TrainConfig
    from ursa.train.features import FeatureCache, prepare_backbone

    bb = prepare_backbone(TrainConfig(size=32))
    root = make_dataset(tmp_path / "d", classes=2, per_class=3, size=40)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    strong = aug_transforms(max_rotate=45, max_zoom=2.0, max_warp=0.5, p_affine=1.0)
    a = FeatureCache(tmp_path / "a", bb, aug=strong).get(root, names, 2).feats
    again = FeatureCache(tmp_path / "b", bb, aug=strong).get(root, names, 2).feats
    default = FeatureCache(tmp_path / "c", bb).get(root, names, 2).feats
    other_view = FeatureCache(tmp_path / "a", bb, aug=strong).get(root, names, 3).feats
    assert np.array_equal(a, again)  # seeded: the same views in any cache, on any run
    assert not np.allclose(a, default, atol=1e-3) and not np.allclose(a, other_view, atol=1e-3)


# ---- the CLI ----


def test_cli_augmentation_options_reach_config_json(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("train", tiny_dataset, "--out", tmp_path / "r", "--size", "32", "--views", "1", "--aug", "lesson", "--max-rotate", "5", "--flip-vert", "--p-lighting", "0.5")
    assert code == 0, err
    aug = json.loads((tmp_path / "r" / "config.json").read_text())["data"]["aug"]
    assert aug == {**aug_transforms().spec(), "max_rotate": 5.0, "flip_vert": True, "p_lighting": 0.5}


def test_cli_defaults_are_the_default_augmentation() -> None:
    import typer

    from ursa.cli import app
    from ursa.cli._common import augment

    for command in ("train", "show-batch", "lr-find"):
        params = {p.name: p.default for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]
        assert params["aug"] == "default" and params["flip_vert"] is False
        assert all(params[k] is None for k in ("max_rotate", "max_zoom", "max_lighting", "max_warp", "p_affine", "p_lighting", "min_scale"))
    assert augment("default") == DataConfig().aug
    assert augment("none", max_lighting=0.3).max_lighting == 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "DATA", "--max-rotate", "200"], "--max-rotate (Augment.max_rotate) must be from 0 to 180 degrees, got 200.0"),
        (["train", "DATA", "--max-zoom", "0.5"], "--max-zoom (Augment.max_zoom) must be from 1 to 10, got 0.5"),
        (["train", "DATA", "--aug", "fancy"], "--aug must be one of 'default', 'lesson', 'none', got 'fancy'"),
        (["show-batch", "DATA", "--max-lighting", "1"], "--max-lighting (Augment.max_lighting) must be at least 0 and less than 1, got 1.0"),
        (["lr-find", "DATA", "--p-affine", "2"], "--p-affine (Augment.p_affine) must be from 0 to 1, got 2.0"),
        (["show-batch", "DATA", "--min-scale", "0"], "--min-scale (Augment.min_scale) must be greater than 0 and at most 1, got 0.0"),
    ],
)
def test_cli_refuses_bad_augmentation_before_starting(run_cli, tiny_dataset: Path, tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = run_cli(*[str(tiny_dataset) if a == "DATA" else a for a in args], "--out", tmp_path / "x.png" if args[0] != "train" else tmp_path / "r")
    assert code == 2
    assert message in " ".join(err.split())
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.png").exists()


def test_cli_show_batch_with_the_lesson_augmentation(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.png"
    code, _, err = run_cli("show-batch", tiny_dataset, "--out", out, "--size", "64", "--aug", "lesson", "--max-rotate", "30", "--flip-vert")
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size[0] > 300
