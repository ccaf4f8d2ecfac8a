"""Schedules, lr_find, the Learner's freeze / unfreeze / save / load, and the metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ursa.errors import TrainError
from ursa.models import Head, body_groups
from ursa.train.learner import Learner
from ursa.train.metrics import accuracy, error_rate
from ursa.train.schedule import one_cycle, smooth, split_lrs, suggest_lr


def test_one_cycle_warms_up_then_anneals() -> None:
    lrs = [one_cycle(s, 100, 1e-2)[0] for s in range(100)]
    peak = int(np.argmax(lrs))
    assert 20 <= peak <= 30 and lrs[0] == pytest.approx(1e-2 / 25) and lrs[-1] == pytest.approx(1e-2 / 1e5)
    moms = [one_cycle(s, 100, 1e-2)[1] for s in range(100)]
    assert moms[peak] == pytest.approx(0.85, abs=1e-3) and moms[0] == pytest.approx(0.95)


def test_split_lrs() -> None:
    assert split_lrs(slice(1e-5, 1e-3), 3) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert split_lrs(slice(None, 1e-3), 3) == pytest.approx([1e-4, 1e-4, 1e-3])
    assert split_lrs(2e-3, 2) == [2e-3, 2e-3]


def test_suggestion_lands_on_the_falling_slope() -> None:
    lrs = np.geomspace(1e-6, 1, 100)
    x = np.log10(lrs)
    losses = 2 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, (x + 1) ** 2 * 5, 0)  # falls around 1e-3, blows up after 1e-1
    s = suggest_lr(lrs, smooth(losses, 0.5))
    assert 1e-4 < s.valley < 5e-2 and 1e-4 < s.steep < 1e-2 and s.minimum < 1e-1


def _toy(n: int = 256, d: int = 8, k: int = 3, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    tr = DataLoader(TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4]), batch_size=32, shuffle=True, generator=g)
    va = DataLoader(TensorDataset(x[n * 3 // 4 :], y[n * 3 // 4 :]), batch_size=64)
    return tr, va


def _learner(tmp_path: Path) -> Learner:
    tr, va = _toy()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16))
    head = Head(16, 3)
    model = nn.Sequential(body, head)
    return Learner(model, tr, va, classes=["a", "b", "c"], groups=[*body_groups(body, 2), list(head.parameters())], path=tmp_path, progress=False)


def test_fit_one_cycle_learns_and_records(tmp_path: Path) -> None:
    learn = _learner(tmp_path)
    before = learn.validate()["valid_loss"]
    learn.fit_one_cycle(4, 1e-2)
    after = learn.validate()
    assert after["valid_loss"] < before * 0.5 and after["error_rate"] < 0.1
    assert after["error_rate"] == pytest.approx(1 - after["accuracy"])
    assert len(learn.recorder.rows) == 4 and len(learn.recorder.batch_losses) == 4 * len(learn.train_dl)
    learn.recorder.to_csv(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().startswith("stage,epoch,train_loss,valid_loss,error_rate,accuracy")


def test_freeze_unfreeze_and_discriminative_lrs(tmp_path: Path) -> None:
    learn = _learner(tmp_path)
    learn.freeze()
    body_linear = learn.model[0][0].weight
    bn = learn.model[0][1].weight
    assert not body_linear.requires_grad and bn.requires_grad  # BatchNorm stays trainable when frozen
    w0 = body_linear.detach().clone()
    learn.fit_one_cycle(1, 1e-2)
    assert torch.equal(w0, body_linear)
    learn.unfreeze()
    assert body_linear.requires_grad
    learn.fit_one_cycle(1, slice(1e-5, 1e-3))
    assert not torch.equal(w0, body_linear)


def test_lr_find_restores_weights_and_suggests(tmp_path: Path) -> None:
    learn = _learner(tmp_path)
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    sug = learn.lr_find(num_it=60)
    assert all(torch.equal(state[k], v) for k, v in learn.model.state_dict().items())
    # fastai's SuggestedLRs: a named tuple; the sweep is on the recorder, which draws it
    assert isinstance(sug, tuple) and sug._fields == ("valley", "minimum", "steep") and 1e-7 <= sug.valley <= 10
    res = learn.recorder.lr_find
    assert res is not None and res.suggestion == sug and len(res.lrs) == len(res.losses) >= 4
    fig = learn.recorder.plot_lr_find(tmp_path / "lr.png")
    assert fig is not None and (tmp_path / "lr.png").stat().st_size > 5000
    assert learn.recorder.plot() is not None  # the lesson's name for the same plot


def test_save_load_predict_and_wrong_checkpoint(tmp_path: Path) -> None:
    learn = _learner(tmp_path)
    learn.fit_one_cycle(2, 1e-2)
    p = learn.save("stage-1")
    assert p.suffix == ".safetensors"
    x = next(iter(learn.valid_dl))[0][:1]
    label, idx, probs = learn.predict(x[0])
    learn2 = _learner(tmp_path)
    learn2.load("stage-1")
    assert learn2.predict(x[0])[1] == idx and label in learn.classes and probs.sum() == pytest.approx(1.0)
    with pytest.raises(TrainError, match="does not exist"):
        learn2.load("nope")
    other = Learner(nn.Linear(8, 3), learn.train_dl, learn.valid_dl, classes=["a", "b", "c"], path=tmp_path, progress=False)
    with pytest.raises(TrainError, match="does not fit"):
        other.load("stage-1")


def test_diverging_learning_rate_is_a_clear_error(tmp_path: Path) -> None:
    learn = _learner(tmp_path)
    learn.loss_func = lambda out, y: out.sum() * float("inf")
    with pytest.raises(TrainError, match="too high"):
        learn.fit_one_cycle(1, 1e-2)


def test_metrics() -> None:
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(p, y) == 0.75 and error_rate(p, y) == 0.25


def test_checkpoints_are_safetensors_and_load_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the old check (the file does not start with pickle's protocol-2 bytes) could not fail, since
    torch.save's zip files never do. A checkpoint must parse as safetensors, and loading it must never unpickle."""
    import pickle
    import zipfile

    from safetensors import safe_open

    learn = _learner(tmp_path)
    learn.fit_one_cycle(1, 1e-2)
    p = learn.save("stage-1")
    assert not zipfile.is_zipfile(p)  # torch.save writes a zip holding a pickle
    with safe_open(str(p), framework="pt") as f:
        assert set(f.keys()) == set(learn.model.state_dict()) and f.metadata()["classes"] == "a,b,c"

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was read through pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    learn2 = _learner(tmp_path).load("stage-1")
    assert all(torch.equal(v, learn2.model.state_dict()[k]) for k, v in learn.model.state_dict().items())


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


def test_mixed_precision_is_a_callback_around_the_forward_pass(tmp_path: Path) -> None:
    """bf16: the forward runs under autocast, the loss outside it, and autocast is left even when the forward raises."""
    from ursa.train.callbacks import Callback, MixedPrecision

    seen: list[tuple[bool, torch.dtype]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 3)
            self.fail = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise RuntimeError("boom")
            out = self.lin(x)
            seen.append((_autocast_on(), out.dtype))
            return out

    class LossProbe(Callback):
        def before_backward(self, learn: object) -> None:
            seen.append((_autocast_on(), learn.loss.dtype))  # type: ignore[attr-defined]

    tr, va = _toy()
    model = Probe()
    learn = Learner(model, tr, va, classes=["a", "b", "c"], path=tmp_path, progress=False, precision="bf16", cbs=[LossProbe()])
    assert any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    learn.fit(1, 1e-2)
    assert (True, torch.bfloat16) in seen and (False, torch.float32) in seen and not _autocast_on()
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, 1e-2)
    assert not _autocast_on()
    assert Learner(nn.Linear(8, 3), tr, va, classes=["a", "b", "c"], progress=False).cbs[2:] == []  # fp32: no extra callbacks
    with pytest.raises(TrainError, match="choose_precision resolves 'auto'"):
        Learner(nn.Linear(8, 3), tr, va, classes=["a", "b", "c"], progress=False, precision="auto")


def test_fp16_steps_through_the_grad_scaler_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16: the GradScaler takes the step and the loop skips its own (CancelStep), so no batch steps twice."""
    steps = []
    real_step = torch.optim.AdamW.step

    def counting_step(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        steps.append(1)
        return real_step(self, *args, **kwargs)

    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def counting_scale(self: torch.amp.GradScaler, outputs: torch.Tensor) -> torch.Tensor:
        scaled.append(1)
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", counting_scale)
    tr, va = _toy()
    learn = Learner(nn.Linear(8, 3), tr, va, classes=["a", "b", "c"], path=tmp_path, progress=False, precision="fp16")
    learn.fit(2, 1e-2)
    # every loss was scaled; the optimizer stepped at most once per batch (the scaler skips a step whose scaled
    # gradients overflowed, as the first ones at its initial scale of 2**16 do)
    assert len(scaled) == 2 * len(tr) and 0 < len(steps) <= len(scaled)


def test_channels_last_is_a_callback(tmp_path: Path) -> None:
    shapes: list[bool] = []

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.append(x.is_contiguous(memory_format=torch.channels_last))
            return self.fc(self.conv(x).mean((2, 3)))

    g = torch.Generator().manual_seed(0)
    dl = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g)), batch_size=8)
    model = Conv()
    learn = Learner(model, dl, dl, classes=["a", "b"], path=tmp_path, progress=False, channels_last=True)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    learn.fit(1, 1e-3)
    assert shapes and all(shapes)


def test_lr_find_on_a_trained_learner_does_not_stop_on_early_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: after training, the first batches' tiny, noisy loss looked like a 4x divergence and the
    sweep stopped after 2 batches ("lr_find ran fewer than 4 batches")."""
    learn = _learner(tmp_path)
    losses = iter([0.001, 0.02, 0.015, 0.01, 0.012] + [0.01] * 25)  # a trained model: tiny, then noise

    def batch(net, opt) -> None:  # noqa: ANN001
        learn.last_loss = next(losses)

    monkeypatch.setattr(learn, "_train_batch", batch)
    learn.lr_find(start_lr=1e-6, end_lr=1e-2, num_it=30)
    assert len(learn.recorder.lr_find.lrs) == 30


def test_lr_find_shows_a_progress_bar(tmp_path: Path) -> None:
    """Every long step shows a bar: the sweep over the network is one."""
    import io

    from rich.console import Console

    tr, va = _toy()
    body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    head = Head(16, 3)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    learn = Learner(nn.Sequential(body, head), tr, va, classes=["a", "b", "c"], groups=[list(body.parameters()), list(head.parameters())], path=tmp_path, progress=True, console=console)
    learn.lr_find(num_it=12)
    assert "lr_find" in out.getvalue() and "12/12" in out.getvalue()


def test_train_run_reports_events_stages_passes_and_epochs(tmp_path: Path) -> None:
    """The studio's hook: `events` gets stages, per-pass feature progress ("(pass k/n)") and per-batch progress,
    and one row per epoch (the lbfgs head's single row, then fine-tuning's epochs)."""
    from conftest import make_dataset

    from ursa.config import DataConfig, TrainConfig
    from ursa.train.recipe import train_run

    data = make_dataset(tmp_path / "data", classes=2, per_class=4)
    got: list[dict] = []
    res = train_run(data, tmp_path / "runs" / "r", data=DataConfig(seed=0), train=TrainConfig(size=64, views=2, fine_tune=1, batch_size=4), progress=False, events=got.append)
    stages = [e["stage"] for e in got if e["type"] == "stage"]
    assert stages == ["reading the dataset", "loading the backbone", "training the head", "fine-tuning", "writing the run folder"]
    passes = {e["stage"] for e in got if e["type"] == "progress" and "(pass" in e["stage"]}
    n = 2 + len(res.metrics["views"])  # plain + mirrored validation views, then the training views
    assert {int(s.split("(pass ")[1].split("/")[0]) for s in passes} == set(range(1, n + 1))
    assert all(s.endswith(f"/{n})") for s in passes) and any(s.startswith("features train view") for s in passes)
    batches = [e for e in got if e["type"] == "progress" and e["stage"] == "fine_tune"]
    assert batches and batches[-1]["done"] == batches[-1]["total"] and batches[-1]["epoch"] == batches[-1]["n_epoch"] == 1
    epochs = [e for e in got if e["type"] == "epoch"]
    assert [e["stage"] for e in epochs] == ["head", "fine_tune"] and all("valid_loss" in e and "error_rate" in e for e in epochs)
    assert [e["stage"] for e in epochs] == [r["stage"] for r in res.history]
