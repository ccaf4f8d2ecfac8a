"""The lessons teach the right thing: each claim a lesson makes is checked here on small, fast sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ursa.lessons import lr as lr_lesson_mod
from ursa.lessons.minibatch import make_regression, minibatch_lesson, run_gd
from ursa.lessons.sgd import fit_line, make_line, mse, mse_grad, sgd_lesson


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small seeded split of the embedded digits, flattened to (n, 64)."""
    from ursa.data.embedded import digits_arrays

    x, y, _ = digits_arrays()
    x = x.reshape(len(x), -1)
    order = np.random.default_rng(0).permutation(len(x))
    train, valid = order[:600], order[600:900]
    return x[train], y[train], x[valid], y[valid]


# ---- sgd ----


def test_hand_written_gradient_equals_autograd() -> None:
    x, y, _ = make_line(50, seed=3)
    a = torch.tensor([0.7, -1.2], requires_grad=True)
    mse(x @ a, y).backward()
    torch.testing.assert_close(mse_grad(x, y, a.detach()), a.grad)


def test_sgd_recovers_true_parameters() -> None:
    x, y, a_true = make_line(100, a=(3.0, 2.0), noise=0.3, seed=0)
    a, losses, params = fit_line(x, y, lr=0.1, epochs=100)
    best = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(a, best, atol=0.02, rtol=0)  # gradient descent reached the minimum
    torch.testing.assert_close(a, a_true, atol=0.15, rtol=0)  # which is near the truth (noise)
    assert losses[-1] < losses[0] / 10
    assert len(losses) == len(params) == 101
    assert params[0] == (-1.0, 1.0)


def test_sgd_lesson_writes_gif_and_html(tmp_path) -> None:
    x, y, a_true = make_line(30, seed=1)
    gif, html = tmp_path / "sgd.gif", tmp_path / "sgd.html"
    result = sgd_lesson(x, y, a_true=a_true.tolist(), epochs=8, out=gif, html=html)
    with Image.open(gif) as im:
        assert im.n_frames == 9  # one frame per step, plus the starting guess
        assert im.size[0] > 300
    text = html.read_text(encoding="utf-8")
    assert "<script" in text and "data:image/png;base64" in text
    assert result.a_true == (3.0, 2.0)
    assert len(result.rows()) == 4 and "lr=0.1" in result.notice


def test_sgd_rejects_bad_numbers() -> None:
    x, y, _ = make_line(10)
    with pytest.raises(ValueError, match="lr must be a positive"):
        fit_line(x, y, lr=-1.0)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        fit_line(x, y, epochs=0)
    with pytest.raises(ValueError, match="at least 2 points"):
        make_line(1)


# ---- mini-batches ----


def test_minibatch_and_full_batch_both_reach_near_best(tmp_path) -> None:
    x, y = make_regression(3000, d=8, seed=0)
    out = tmp_path / "minibatch.png"
    result = minibatch_lesson(x, y, steps=80, out=out)
    for name in ("full batch", "mini-batch"):
        assert result.losses[name][-1] < 1.5 * result.best_loss
        assert len(result.losses[name]) == len(result.seconds[name]) == 81
        assert result.seconds[name] == sorted(result.seconds[name])  # a clock never runs backwards
        assert not math.isnan(result.steps_to_target[name])
    with Image.open(out) as im:
        assert im.size[0] > 500


def test_run_gd_rejects_bad_batch_size() -> None:
    x, y = make_regression(100, d=2)
    with pytest.raises(ValueError, match="batch size"):
        run_gd(x, y, batch_size=0)
    with pytest.raises(ValueError, match="batch size"):
        run_gd(x, y, batch_size=101)


# ---- learning rate ----


def test_lr_too_high_is_worse_and_too_low_is_slower(digits, tmp_path) -> None:
    out = tmp_path / "lr.png"
    result = lr_lesson_mod.lr_lesson(*digits, epochs=4, out=out)
    high, good, low = result.runs
    assert high.valid_error[-1] > good.valid_error[-1] + 0.2
    assert low.improvement_per_epoch < good.improvement_per_epoch / 3
    assert low.improvement_per_epoch > 0  # it does learn, only slowly
    assert all(len(r.valid_loss) == 5 for r in result.runs)
    assert result.names == ["too high", "good", "too low"]
    with Image.open(out) as im:
        assert im.size[0] > 500


def test_lr_runs_are_repeatable(digits) -> None:
    a = lr_lesson_mod.lr_lesson(*digits, lrs=(1.0, 0.1, 0.01), epochs=1, seed=5)
    b = lr_lesson_mod.lr_lesson(*digits, lrs=(1.0, 0.1, 0.01), epochs=1, seed=5)
    assert [r.valid_loss for r in a.runs] == [r.valid_loss for r in b.runs]


def test_lr_restores_thread_count(digits) -> None:
    before = torch.get_num_threads()
    lr_lesson_mod.lr_lesson(*digits, epochs=1)
    assert torch.get_num_threads() == before


def test_lr_rejects_bad_input(digits) -> None:
    xt, yt, xv, yv = digits
    with pytest.raises(ValueError, match="three learning rates"):
        lr_lesson_mod.lr_lesson(xt, yt, xv, yv, lrs=(0.1, 0.01))
    with pytest.raises(ValueError, match="positive"):
        lr_lesson_mod.lr_lesson(xt, yt, xv, yv, lrs=(1.0, 0.0, 0.01), epochs=1)
    with pytest.raises(ValueError, match="Flatten"):
        lr_lesson_mod.lr_lesson(xt.reshape(-1, 8, 8), yt, xv, yv)
    with pytest.raises(ValueError, match="one label per row"):
        lr_lesson_mod.lr_lesson(xt, yt[:-1], xv, yv)


# ---- epochs: under- and overfitting ----


def test_overfitting_shows_valid_loss_rises_while_train_loss_falls(digits, tmp_path) -> None:
    from ursa.lessons.epochs import epochs_lesson

    out = tmp_path / "epochs.png"
    r = epochs_lesson(*digits, epochs=40, n_train=150, hidden=256, lr=0.05, out=out)
    best = r.best_epoch
    assert 1 <= best < 25
    assert r.valid_loss[-1] > 1.3 * r.valid_loss[best]  # validation loss rises after its minimum
    assert r.train_loss[-1] < 0.2 * r.train_loss[best]  # while training loss keeps falling
    later = r.train_loss[best:]
    assert sum(b < a for a, b in zip(later, later[1:])) > 0.6 * (len(later) - 1)  # falling most epochs
    assert r.flipped > 0.2 * r.n_train
    with Image.open(out) as im:
        assert im.size[0] > 500


def test_label_noise_changes_the_requested_share_to_other_classes() -> None:
    from ursa.lessons.epochs import add_label_noise

    y = torch.arange(10).repeat(500)
    noisy, flipped = add_label_noise(y, fraction=0.3, n_classes=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy != y, flipped)  # every flipped label really changed, no other did
    assert 0.27 < flipped.float().mean().item() < 0.33
    with pytest.raises(ValueError, match="fraction"):
        add_label_noise(y, fraction=1.0, n_classes=10, generator=torch.Generator())


def test_fit_lesson_underfit_good_overfit(tmp_path) -> None:
    from ursa.lessons.fit import fit_lesson, make_curve

    out = tmp_path / "fit.png"
    r = fit_lesson(*make_curve(), out=out)
    under, good, over = zip(r.train_mse, r.valid_mse)
    assert over[0] < good[0] < under[0]  # training error always prefers the most flexible model
    assert good[1] < under[1] and good[1] < over[1]  # validation picks the middle one
    assert "degree 4" in r.notice
    with Image.open(out) as im:
        assert im.size[0] > 500
    with pytest.raises(ValueError, match="each degree"):
        fit_lesson(*make_curve(10, 5), degrees=(1, 2, 10))


# ---- predict ----


def test_predict_is_argmax_and_error_rate_is_mistakes_over_total(digits, tmp_path) -> None:
    from ursa.lessons.predict import predict_lesson

    out = tmp_path / "predict.png"
    r = predict_lesson(*digits, image_shape=(8, 8), batch_size=50, show=4, out=out)
    assert r.probs.shape == (50, 10)
    torch.testing.assert_close(r.probs.sum(dim=1), torch.ones(50))
    assert torch.equal(r.preds, r.probs.argmax(dim=1))
    assert r.error_rate == pytest.approx(r.wrong / 50)
    assert r.error_rate == pytest.approx((r.probs.argmax(1) != r.targets).float().mean().item())
    assert len(r.rows()) == 4
    if r.wrong:
        assert any(r.preds[i] != r.targets[i] for i in r.shown)  # a mistake is shown when there is one
    with Image.open(out) as im:
        assert im.size[0] > 500


def test_predict_error_rate_equals_library_metric(digits) -> None:
    metrics = pytest.importorskip("ursa.train.metrics")
    from ursa.lessons.predict import predict_lesson

    r = predict_lesson(*digits, batch_size=64)
    assert r.error_rate == pytest.approx(metrics.error_rate(r.probs, r.targets), abs=1e-6)


def test_lessons_import_only_torch_numpy_matplotlib_and_the_standard_library() -> None:
    import ast
    import sys
    from pathlib import Path

    import ursa.lessons

    allowed = {"torch", "numpy", "matplotlib", "__future__"} | set(sys.stdlib_module_names)
    for path in Path(ursa.lessons.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_epochs_subset_is_random_not_the_first_rows(digits) -> None:
    """Regression: with training data sorted by class, the first rows held only a few classes."""
    from ursa.lessons.epochs import epochs_lesson

    xt, yt, xv, yv = digits
    order = np.argsort(yt, kind="stable")  # as a class-folder dataset comes: sorted by class
    r = epochs_lesson(xt[order], yt[order], xv, yv, epochs=8, n_train=100, hidden=64, noise=0.0, lr=0.05)
    assert min(r.valid_error) < 0.5  # with only the first 100 rows (classes 0 and 1) it stays above 0.8
