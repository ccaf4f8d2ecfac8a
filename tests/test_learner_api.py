"""The Learner as the lesson types it: one Learner, two speeds (the feature cache while the body is frozen,
the network after unfreeze), fastai's argument names, lr_find's suggestions and plots, and clear errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_dataset
from ursa.config import DataConfig, TrainConfig
from ursa.data.loaders import ImageDataLoaders
from ursa.errors import ModelError, TrainError
from ursa.train import features as features_mod
from ursa.train.callbacks import CACHED, NETWORK
from ursa.train.learner import Learner, cnn_learner, vision_learner
from ursa.train.metrics import accuracy, as_metrics, error_rate

SIZE = 32  # the smallest input side: real packaged weights, milliseconds per image


@pytest.fixture
def dls(tmp_path: Path):  # noqa: ANN201
    root = make_dataset(tmp_path / "data", classes=3, per_class=8, size=40)
    return ImageDataLoaders.from_folder(root, valid_pct=0.25, seed=0, size=SIZE, bs=8)


def _toy(tmp_path: Path, **kw: object) -> Learner:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0)
    return Learner(nn.Linear(4, 2), dl, dl, classes=["a", "b"], path=tmp_path, progress=False, **kw)  # type: ignore[arg-type]


class _Calls:
    """Counts forward passes through a module (here: the backbone)."""

    def __init__(self, module: nn.Module):
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


# ---- metrics= and the learning-rate names ----------------------------------------------------------------


def test_metrics_as_the_lesson_writes_them(tmp_path: Path) -> None:
    assert list(_toy(tmp_path, metrics=error_rate).metrics) == ["error_rate"]
    assert list(_toy(tmp_path, metrics=[error_rate, accuracy]).metrics) == ["error_rate", "accuracy"]
    assert list(_toy(tmp_path).metrics) == ["error_rate", "accuracy"]  # the default
    assert list(as_metrics({"err": error_rate})) == ["err"]

    def top1(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # a fastai-style metric returns a tensor
        return (p.argmax(-1) == y).float().mean()

    learn = _toy(tmp_path, metrics=[error_rate, top1])
    learn.fit(1)
    assert set(learn.last_metrics) == {"valid_loss", "error_rate", "top1"} and isinstance(learn.last_metrics["top1"], float)
    learn.recorder.to_csv(tmp_path / "h.csv")
    header = next(csv.reader(open(tmp_path / "h.csv")))
    assert header[-2:] == ["path", "top1"] and "error_rate" in header  # another metric gets its own column


@pytest.mark.parametrize("bad", ["error_rate", 3, [error_rate, "accuracy"], {"e": 1}, int])
def test_metrics_of_a_wrong_type_name_the_fix(tmp_path: Path, bad: object) -> None:
    with pytest.raises(TrainError, match=r"metric function such as error_rate.*\[error_rate, accuracy\]"):
        _toy(tmp_path, metrics=bad)


def test_vision_learner_checks_metrics_before_loading_anything(dls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import ursa.train.learner as L

    monkeypatch.setattr(L, "create_backbone", lambda *a, **k: pytest.fail("the backbone was loaded before metrics= was checked"))
    with pytest.raises(TrainError, match="not a metric"):
        vision_learner(dls, metrics="error_rate", path=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_max_lr_and_lr_max_are_one_setting(tmp_path: Path) -> None:
    a, b = _toy(tmp_path), _toy(tmp_path)
    torch.manual_seed(1)
    a.fit_one_cycle(2, max_lr=3e-2)
    torch.manual_seed(1)
    b.fit_one_cycle(2, lr_max=3e-2)
    assert torch.equal(a.model.weight, b.model.weight) and a.recorder.rows[-1]["lr"] == b.recorder.rows[-1]["lr"]
    c = _toy(tmp_path)
    before = c.model.weight.detach().clone()
    with pytest.raises(TrainError, match="both lr_max=.* and max_lr=.*Pass only one"):
        c.fit_one_cycle(1, 1e-3, max_lr=1e-2)
    for bad in (-1e-3, "1e-3", slice(1e-3, None), float("nan")):
        with pytest.raises(TrainError, match="is not a learning rate.*slice"):
            c.fit_one_cycle(1, max_lr=bad)
    with pytest.raises(TrainError, match="epochs"):
        c.fit_one_cycle(0)
    assert torch.equal(before, c.model.weight) and c.recorder.rows == []  # nothing ran


def test_bad_fit_arguments_on_an_image_learner_write_nothing(dls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("URSA_CACHE_DIR", str(tmp_path / "cache"))
    learn = vision_learner(dls, path=tmp_path / "run", progress=False)
    with pytest.raises(TrainError, match="Pass only one"):
        learn.fit_one_cycle(4, lr_max=1e-3, max_lr=slice(3e-5, 3e-4))
    with pytest.raises(TrainError, match="not a learning rate"):
        learn.fit(1, "fast")
    with pytest.raises(TrainError, match="base_lr is one number"):
        learn.fine_tune(1, slice(1e-4, 1e-3))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no features computed, nothing saved
    assert learn.recorder.rows == [] and learn.recorder.path is None


# ---- one Learner, two speeds ---------------------------------------------------------------------------


def test_frozen_fits_train_the_head_on_the_cache_and_unfrozen_ones_run_the_network(dls, tmp_path: Path) -> None:  # noqa: ANN001
    learn = vision_learner(dls, metrics=error_rate, path=tmp_path, progress=False)
    assert learn.uses_cache and learn.cache
    calls = _Calls(learn.model[0])
    learn.features()
    n_feature_passes = calls.n
    assert n_feature_passes > 0
    learn.fit_one_cycle(3)  # the lesson's frozen line: the head on cached features
    assert calls.n == n_feature_passes  # not one backbone pass while training
    assert learn.recorder.path == CACHED and [r["path"] for r in learn.recorder.rows] == [CACHED] * 3
    assert [r["stage"] for r in learn.recorder.rows] == ["head"] * 3 and [r["epoch"] for r in learn.recorder.rows] == [0, 1, 2]
    assert set(learn.last_metrics) == {"valid_loss", "error_rate"}
    # validation through the cache is the network's validation, up to the cache's float16 storage
    p_cache, y_cache = learn.get_preds()
    p_net, y_net = learn.get_preds(learn.dls.valid)
    assert torch.equal(y_cache, y_net) and torch.allclose(p_cache, p_net, atol=2e-2)

    body = learn.model[0].conv_stem.weight
    w0 = body.detach().clone()
    learn.unfreeze()
    assert not learn.uses_cache
    learn.fit_one_cycle(1, max_lr=slice(3e-5, 3e-4))
    assert calls.n > n_feature_passes and not torch.equal(w0, body)
    assert learn.recorder.path == NETWORK and learn.recorder.rows[-1]["path"] == NETWORK and learn.recorder.rows[-1]["stage"] == "fine_tune"
    # frozen again, the body is no longer the one the cache holds: the network runs
    learn.freeze()
    assert not learn.uses_cache
    n = calls.n
    learn.fit(1, 1e-4)
    assert calls.n > n and learn.recorder.path == NETWORK
    with pytest.raises(TrainError, match="fit_lbfgs fits the head on cached features"):
        learn.fit_lbfgs()
    learn.recorder.to_csv(tmp_path / "history.csv")
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["path"] for r in rows] == [CACHED] * 3 + [NETWORK] * 2


def test_cache_false_runs_the_network_every_frozen_epoch(dls, tmp_path: Path) -> None:  # noqa: ANN001
    learn = vision_learner(dls, cache=False, path=tmp_path, progress=False)
    calls = _Calls(learn.model[0])
    assert not learn.uses_cache
    learn.fit_one_cycle(1)
    assert calls.n >= len(learn.dls.train) and learn.recorder.path == NETWORK and learn.recorder.rows[0]["stage"] == "head"
    with pytest.raises(TrainError, match="cache must be True"):
        vision_learner(dls, cache="no")


def test_fine_tune_lr_find_lbfgs_and_checkpoints(dls, tmp_path: Path) -> None:  # noqa: ANN001
    learn = cnn_learner(dls, path=tmp_path, progress=False)  # the lesson's older name
    assert cnn_learner is vision_learner
    sug = learn.lr_find(num_it=30)  # frozen: a sweep of the head on the cache
    assert sug._fields == ("valley", "minimum", "steep") and learn.recorder.lr_find is not None
    assert learn.recorder.plot() is not None and learn.recorder.plot_lr_find(tmp_path / "lr.png") is not None and (tmp_path / "lr.png").is_file()
    learn.fit_lbfgs(c=0.5)
    assert learn.recorder.rows[-1]["path"] == CACHED and learn.recorder.rows[-1]["iterations"] > 0
    assert learn.last_metrics["error_rate"] == learn.recorder.rows[-1]["error_rate"]
    p = learn.save("stage-1")
    assert p == tmp_path / "models" / "stage-1.safetensors" and p.is_file()
    learn.fine_tune(1, freeze_epochs=1)
    assert [r["path"] for r in learn.recorder.rows[-2:]] == [CACHED, NETWORK]
    assert learn.recorder.plot_losses() is not None and learn.recorder.plot_loss() is not None
    learn.load("stage-1")  # back to the pretrained body: frozen fits use the cache again
    learn.freeze()
    assert learn.uses_cache
    learn.fit(1)
    assert learn.recorder.path == CACHED


def test_the_same_lines_give_the_same_numbers(dls, tmp_path: Path) -> None:  # noqa: ANN001
    runs = []
    for _ in range(2):  # as a notebook run again: new DataLoaders (their shuffle generator starts again), new learner
        fresh = ImageDataLoaders.from_folder(dls.split.root, valid_pct=0.25, seed=0, size=SIZE, bs=8)
        learn = vision_learner(fresh, path=tmp_path, progress=False)
        learn.features()
        rng = torch.random.get_rng_state()
        learn.fit_one_cycle(2)
        learn.unfreeze()
        learn.fit_one_cycle(1, max_lr=slice(1e-5, 1e-4))
        assert torch.equal(rng, torch.random.get_rng_state())  # the fits leave the caller's generator as it was
        runs.append((learn.model.state_dict(), [r["valid_loss"] for r in learn.recorder.rows]))
    (a, la), (b, lb) = runs
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)


def test_a_notebook_learner_reuses_the_cache_ursa_train_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ursa.train.recipe import train_run

    root = make_dataset(tmp_path / "data", classes=3, per_class=8, size=40)
    res = train_run(root, tmp_path / "runs" / "r", data=DataConfig(valid_pct=0.25, seed=0), train=TrainConfig(size=SIZE), progress=False)
    assert [r["path"] for r in res.history] == [CACHED]
    monkeypatch.setattr(features_mod, "extract", lambda *a, **k: pytest.fail("the notebook learner computed features the run had cached"))
    dls = ImageDataLoaders.from_folder(root, valid_pct=0.25, seed=0, size=SIZE)
    learn = vision_learner(dls, progress=False, path=tmp_path)
    fd = learn.features()
    assert fd.views == res.metrics["views"]
    learn.fit_lbfgs()
    assert learn.last_metrics["error_rate"] == pytest.approx(res.history[0]["error_rate"])


def test_progress_shows_feature_extraction_and_epochs(dls, tmp_path: Path) -> None:  # noqa: ANN001
    from rich.console import Console

    buf = io.StringIO()
    learn = vision_learner(dls, path=tmp_path, console=Console(file=buf, width=140, force_terminal=False))
    learn.fit_one_cycle(2)
    text = buf.getvalue()
    assert "features train view" in text and "epoch   2/2" in text and "error_rate" in text


def test_an_architecture_without_packaged_weights_names_them_and_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw: object) -> nn.Module:
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    from ursa import models

    with pytest.raises(ModelError, match=r"resnet34.*efficientnet_lite0.*weights="):
        models.create_backbone("resnet34")  # HF_HUB_OFFLINE (conftest): answered from the caches, at once
    # with a network that does not answer, the same error comes from the probe, not after a minute of retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    with pytest.raises(ModelError, match=r"ConnectionError.*efficientnet_lite0.*weights="):
        models.create_backbone("resnet34")
