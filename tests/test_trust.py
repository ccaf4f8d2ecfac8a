"""Calibration (ECE, temperature fitted out of fold) and the open-set detector: ursa.trust and ursa.train.trust."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from ursa.errors import UrsaError
from ursa.trust import OpenSetDetector, detector_from_bytes, detector_to_bytes, expected_calibration_error, fit_temperature, scaled_softmax

if TYPE_CHECKING:
    from conftest import Built


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident() -> None:
    # 10 rows at 0.8 confidence, 8 right: perfectly calibrated
    p = np.tile([[0.8, 0.2]], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-9)
    # 0.99 sure, right half the time: ECE 0.49
    p = np.tile([[0.99, 0.01]], (10, 1))
    y = np.array([0, 1] * 5)
    assert expected_calibration_error(p, y) == pytest.approx(0.49, abs=1e-6)
    assert np.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)))


def test_temperature_undoes_a_known_scaling_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    true_logits = rng.normal(size=(n, c)) * 2.0
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)  # a label drawn from each row's probabilities
    overconfident = true_logits * 3.0  # a model 3x too sure
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(scaled_softmax(overconfident, t), y) < expected_calibration_error(scaled_softmax(overconfident), y) / 3
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_detector_scores_far_points_higher_and_round_trips(method: str) -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 4
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(size=(120, 16))
    det = OpenSetDetector.fit(x, y, n_classes=3, method=method)
    near = centres[[0, 1, 2]] + rng.normal(size=(3, 16)) * 0.5
    far = rng.normal(size=(3, 16)) * 4 + 20 * np.sign(rng.normal(size=(3, 16)))
    assert det.score(near).max() < det.score(far).min()
    det.threshold = float(det.score(near).max())
    again = detector_from_bytes(detector_to_bytes(det))
    assert again.method == method and again.threshold == pytest.approx(det.threshold)
    np.testing.assert_allclose(again.score(far), det.score(far), rtol=1e-3)


def test_detector_errors() -> None:
    with pytest.raises(UrsaError, match="unknown open-set detector"):
        OpenSetDetector.fit(np.zeros((4, 3)), np.zeros(4, int), n_classes=1, method="magic")
    with pytest.raises(UrsaError, match="at least 2"):
        OpenSetDetector.fit(np.zeros((1, 3)), np.zeros(1, int), n_classes=1)
    with pytest.raises(UrsaError, match="not a readable open-set detector"):
        detector_from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")


def test_a_run_records_temperature_and_ece_fitted_out_of_fold(built: Built) -> None:
    m = json.loads((built.run / "metrics.json").read_text())
    assert m["temperature"] > 0 and m["temperature"] != 1.0
    assert set(m["ece"]) == {"before", "after", "bins"} and m["ece"]["bins"] == 15
    assert 0 <= m["ece"]["after"] <= 1 and 0 <= m["ece"]["before"] <= 1
    assert "out-of-fold" in m["calibration"]
    assert m["open_set"]["method"] == "knn" and m["open_set"]["accept"] == 0.95
    assert (built.run / "models" / "open_set.safetensors").is_file()


def test_temperature_never_sees_the_validation_set(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression guard: fit_temperature gets the training images' out-of-fold logits, as many rows as training images."""
    import ursa.train.trust as tt

    seen: list[int] = []
    real = tt.fit_temperature
    monkeypatch.setattr(tt, "fit_temperature", lambda z, y: seen.append(len(y)) or real(z, y))
    from ursa.config import DataConfig, TrainConfig
    from ursa.train.features import cached_features, prepare_backbone

    train = TrainConfig(arch="efficientnet_lite0", size=64, epochs=2, views=2)
    fd = cached_features(built.result.split, prepare_backbone(train), train, DataConfig(seed=0))
    trust = tt.fit_trust(fd, built.result.model[1], n_classes=3)
    assert seen == [len(fd.train_names)]
    assert trust.detector is not None and np.isfinite(trust.detector.threshold)


def test_too_few_training_images_skip_calibration_with_a_note(tmp_path: Path) -> None:
    import torch

    from ursa.models import Head
    from ursa.train.features import FeatureData
    from ursa.train.trust import fit_trust

    fd = FeatureData(torch.randn(3, 8), torch.tensor([0, 1, 0]), ["a", "b", "c"], [torch.randn(2, 8)], torch.tensor([0, 1]), ["d", "e"], [], [0])
    trust = fit_trust(fd, Head(8, 2).eval(), n_classes=2)
    assert trust.temperature == 1.0 and trust.detector is None and "too few" in trust.info["calibration_note"]
