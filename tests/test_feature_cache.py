"""The sharded, resumable, memory-mapped feature cache (ursa.train.features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset
from ursa.config import TrainConfig
from ursa.errors import TrainError
from ursa.models import Backbone
from ursa.train.features import PLAIN, FeatureCache, prepare_backbone

AUG = 2  # a seeded augmented view: the hardest to reproduce exactly


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return prepare_backbone(TrainConfig(size=32))


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, list[str]]:
    root = make_dataset(tmp_path / "data", classes=3, per_class=8, size=40)
    return root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


class _Stop(Exception):
    pass


def test_resumed_extraction_equals_an_uninterrupted_one(backbone: Backbone, data: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, names = data
    whole = FeatureCache(tmp_path / "a", backbone, shard_rows=5).get(root, names, AUG, batch_size=5)

    cache = FeatureCache(tmp_path / "b", backbone, shard_rows=5)

    def interrupt(done: int, total: int) -> None:
        if done >= 12:
            raise _Stop  # as if the process were stopped after 12 of 24 images

    with pytest.raises(_Stop):
        cache.get(root, names, AUG, batch_size=5, progress=interrupt)
    assert len(list(cache.view_dir(AUG).glob("*.json"))) == 2  # the two finished shards were kept
    seen: list[tuple[int, int]] = []
    resumed = cache.get(root, names, AUG, batch_size=5, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (14, 14)  # only the 14 missing images were computed
    assert resumed.names == whole.names == names and resumed.failed == []
    assert resumed.feats.dtype == np.float32 and resumed.feats.shape == (24, backbone.num_features)
    assert np.array_equal(resumed.feats, whole.feats)
    # a third call computes nothing and reports everything done
    seen.clear()
    again = cache.get(root, names, AUG, batch_size=5, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(24, 24)] and np.array_equal(again.feats, whole.feats)


def test_shards_are_fixed_size_and_read_memory_mapped(backbone: Backbone, data: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, names = data
    cache = FeatureCache(tmp_path / "c", backbone, shard_rows=10)
    fs = cache.get(root, names, PLAIN, batch_size=4)
    metas = sorted(cache.view_dir(PLAIN).glob("*.json"))
    rows = sorted(json.loads(m.read_text())["rows"] for m in metas)
    assert rows == [4, 10, 10]
    for m in metas:
        arr = np.load(m.with_suffix(".npy"), mmap_mode="r")
        assert isinstance(arr, np.memmap) and arr.dtype == np.float16
    fresh = FeatureCache(tmp_path / "c", backbone, shard_rows=10)
    sub = names[::3][::-1]  # any order, any subset
    got = fresh.read(root, sub, PLAIN)
    assert all(isinstance(a, np.memmap) for a in fresh._maps.values())
    assert np.array_equal(got, fs.feats[[names.index(n) for n in sub]])
    # the cached float16 values are what a fresh computation returns
    assert np.array_equal(fs.feats, fs.feats.astype(np.float16).astype(np.float32))


def test_broken_and_changed_files(backbone: Backbone, data: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, names = data
    (root / "bear" / "zz_broken.png").write_bytes(b"not a png")
    names = [*names, "bear/zz_broken.png"]
    cache = FeatureCache(tmp_path / "d", backbone, shard_rows=8)
    fs = cache.get(root, names, PLAIN)
    assert [s.name for s in fs.failed] == ["bear/zz_broken.png"] and "bear/zz_broken.png" not in fs.names
    assert len(cache.index(PLAIN)) == 24  # a failure is not cached: a fixed file is tried again
    with pytest.raises(TrainError, match="build the cache first"):
        cache.read(root, ["bear/zz_broken.png"], PLAIN)
    # a damaged shard is ignored and its rows computed again
    npy = sorted(cache.view_dir(PLAIN).glob("*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:100])
    cache2 = FeatureCache(tmp_path / "d", backbone, shard_rows=8)
    assert len(cache2.index(PLAIN)) == 16
    again = cache2.get(root, names, PLAIN)
    assert np.array_equal(again.feats, fs.feats)


def test_shard_rows_must_be_positive(backbone: Backbone, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="shard_rows"):
        FeatureCache(tmp_path, backbone, shard_rows=0)
