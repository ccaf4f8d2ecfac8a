"""ursa.imageio: the evaluation geometry shared by training and serving, and upright decoding."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from conftest import draw_example
from ursa import imageio as images
from ursa.errors import DataError
from ursa.data.transforms import eval_transform, open_image

R = Image.Resampling


def _torchvision_reference(im: Image.Image, short: int, size: int, resample: R) -> np.ndarray:
    """torchvision's Resize(short) + CenterCrop(size) on a PIL image: Pillow resizes the whole image."""
    interp = {R.BICUBIC: InterpolationMode.BICUBIC, R.BILINEAR: InterpolationMode.BILINEAR, R.NEAREST: InterpolationMode.NEAREST}[resample]
    tf = T.Compose([T.Resize(short, interpolation=interp, antialias=True), T.CenterCrop(size), T.PILToTensor()])
    return tf(im).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pool() -> ThreadPoolExecutor:
    with ThreadPoolExecutor(1) as ex:
        yield ex


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 900),
    h=st.integers(1, 900),
    size=st.sampled_from([16, 64, 224]),
    crop=st.sampled_from([0.875, 0.95, 1.0, 1.15]),
    interp=st.sampled_from(["bicubic", "bilinear", "nearest"]),
    seed=st.integers(0, 8),
)
def test_resize_center_crop_matches_torchvision_and_is_the_same_on_two_threads(w: int, h: int, size: int, crop: float, interp: str, seed: int, pool: ThreadPoolExecutor) -> None:
    """Same geometry as torchvision (a shifted or scaled crop would differ by tens of levels at the edges);
    only Pillow's float32 box moves a few values by a level or two (nearest: picks a neighbour for a few
    pixels). One thread or two give identical bytes, so training and serving agree exactly."""
    im = draw_example(seed % 3, seed, size=256).resize((w, h), R.BICUBIC)
    side, short, resample = images.eval_geometry({"input_size": [3, size, size], "crop_pct": crop, "interpolation": interp})
    one = images.resize_center_crop(im, short=short, size=side, resample=resample)
    two = images.resize_center_crop(im, short=short, size=side, resample=resample, pool=pool)
    assert one.shape == (side, side, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(one, two)
    diff = np.abs(one.astype(int) - _torchvision_reference(im, short, side, resample))
    if resample == R.NEAREST:  # a neighbour instead, for pixels whose source position rounds the other way
        assert (diff > 0).mean() < 0.2
    else:
        assert diff.max() <= 2 and diff.mean() < 0.25, (diff.max(), diff.mean())


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 700),
    h=st.integers(1, 700),
    size=st.sampled_from([16, 64, 224]),
    crop=st.sampled_from([0.875, 1.0, 1.15]),
    mode=st.sampled_from(images.CROP_MODES),
    seed=st.integers(0, 8),
)
def test_every_crop_mode_matches_timms_eval_transform(w: int, h: int, size: int, crop: float, mode: str, seed: int, pool: ThreadPoolExecutor) -> None:
    """center, squash and border give timm's `transforms_imagenet_eval` geometry (border pads with the mean
    colour), to within Pillow's float32 box; one thread or two give identical bytes."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    dc = {"input_size": [3, size, size], "crop_pct": crop, "interpolation": "bicubic", "crop_mode": mode, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    side, short, resample = images.eval_geometry(dc)
    assume(round(min(w, h) * short / max(w, h)) >= 1 or mode != "border")  # timm cannot resize a sliver to 0 px
    im = draw_example(seed % 3, seed, size=256).resize((w, h), R.BICUBIC)
    ref = transforms_imagenet_eval(img_size=size, crop_pct=crop, crop_mode=mode, interpolation="bicubic", mean=dc["mean"], normalize=False)(im)
    fill = tuple(round(255 * m) for m in dc["mean"])
    one = images.resize_center_crop(im, short=short, size=side, resample=resample, crop_mode=images.eval_crop_mode(dc), fill=fill)
    np.testing.assert_array_equal(one, images.resize_center_crop(im, short=short, size=side, resample=resample, crop_mode=mode, fill=fill, pool=pool))
    diff = np.abs(one.astype(int) - ref.permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.25, (diff.max(), diff.mean())
    got = eval_transform(dc)(im)  # training's evaluation transform takes the mode from the config too
    np.testing.assert_array_equal(got.numpy(), images.normalize_into(np.empty((3, side, side), np.float32), one, dc["mean"], dc["std"]))


def test_an_unknown_crop_mode_is_refused_with_the_modes_that_exist() -> None:
    with pytest.raises(DataError, match="crop_mode 'zoom'.*center, squash, border"):
        images.eval_crop_mode({"crop_mode": "zoom"})
    assert images.eval_crop_mode({}) == "center" and images.eval_crop_mode({"crop_mode": None}) == "center"
    with pytest.raises(DataError, match="unknown crop_mode"):
        images.resize_center_crop(Image.new("RGB", (9, 9)), short=8, size=8, resample=R.BICUBIC, crop_mode="zoom")


@pytest.mark.parametrize("wh", [(500, 375), (375, 500), (640, 480), (1024, 683), (300, 300), (224, 224), (4032, 3024)])
def test_photo_shapes_are_within_two_levels_of_torchvision_resize_and_crop(wh: tuple[int, int]) -> None:
    """What a pretrained backbone was evaluated with, to within two levels (one, in most values that differ)."""
    im = draw_example(2, 5, size=256).resize(wh, R.BICUBIC)
    diff = np.abs(images.resize_center_crop(im, short=256, size=224, resample=R.BICUBIC).astype(int) - _torchvision_reference(im, 256, 224, R.BICUBIC))
    assert diff.max() <= 2 and diff.mean() < 0.3


def test_eval_transform_normalizes_like_torchvision() -> None:
    dc = {"input_size": [3, 64, 64], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "interpolation": "bicubic"}
    im = draw_example(1, 2, size=200)
    a = images.resize_center_crop(im, short=73, size=64, resample=R.BICUBIC)
    ref = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=dc["mean"], std=dc["std"])])(Image.fromarray(a))
    got = eval_transform(dc)(im)
    assert got.shape == (3, 64, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_busy_pool_worker_does_not_stall_the_caller() -> None:
    """When the helper thread is busy with someone else's work, the caller does both halves itself."""
    release = threading.Event()
    im = draw_example(0, 1, size=300).resize((500, 375))
    with ThreadPoolExecutor(1) as busy:
        blocker = busy.submit(release.wait, 10)
        got = images.resize_center_crop(im, short=256, size=224, resample=R.BICUBIC, pool=busy)
        assert not blocker.done()  # the worker never ran a half
        release.set()
    np.testing.assert_array_equal(got, images.resize_center_crop(im, short=256, size=224, resample=R.BICUBIC))


def _jpeg_with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation, size", [(1, (60, 40)), (3, (60, 40)), (6, (40, 60)), (8, (40, 60))])
def test_upright_rgb_applies_exif_orientation(tmp_path: Path, orientation: int, size: tuple[int, int]) -> None:
    src = Image.new("RGB", (60, 40), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 20, 20))  # a red corner shows which way is up
    path = tmp_path / "o.jpg"
    path.write_bytes(_jpeg_with_orientation(src, orientation))
    im = images.upright_rgb(Image.open(path))
    assert im.size == size and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), np.asarray(open_image(path)))
    np.testing.assert_array_equal(np.asarray(im), np.asarray(images.upright_rgb(Image.open(io.BytesIO(path.read_bytes())))))


def test_upright_rgb_composites_transparency_on_white_and_leaves_plain_rgb_alone() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert images.upright_rgb(rgba).getpixel((3, 3)) == (255, 255, 255)
    plain = Image.new("RGB", (8, 8), (1, 2, 3))
    assert images.upright_rgb(plain) is plain  # no copy


def test_eval_input_is_the_normalized_crop_on_one_thread_or_two(pool: ThreadPoolExecutor) -> None:
    im = draw_example(1, 4, size=256).resize((500, 375), R.BICUBIC)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    crop = images.resize_center_crop(im, short=256, size=224, resample=R.BICUBIC)
    want = images.normalize_into(np.empty((3, 224, 224), np.float32), crop, mean, std)
    for p in (None, pool):
        got = images.eval_input(im, short=256, size=224, resample=R.BICUBIC, mean=mean, std=std, pool=p)
        np.testing.assert_array_equal(got, want)
