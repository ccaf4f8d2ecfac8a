"""The selection core of `ursa next` (ursa.interpret.active): uncertainty, diversity, duplicates, reasons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ursa.errors import InterpretError
from ursa.interpret.active import NEAR_DUPLICATE, calibrated_probs, select, temperature_of, training_duplicates, uncertainty

CLASSES = ["a", "b", "c"]


def _blobs(centres: np.ndarray, per: int, *, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + spread * rng.normal(size=(per, centres.shape[1])) for c in centres]).astype(np.float32)


def _centres(k: int, d: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, d))


def test_temperature_of_reads_metrics_or_defaults_to_one(tmp_path: Path) -> None:
    assert temperature_of(tmp_path) == 1.0  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"error_rate": 0.1}))
    assert temperature_of(tmp_path) == 1.0
    (tmp_path / "metrics.json").write_text(json.dumps({"temperature": 2.5}))
    assert temperature_of(tmp_path) == 2.5
    (tmp_path / "metrics.json").write_text(json.dumps({"temperature": -1}))
    assert temperature_of(tmp_path) == 1.0
    (tmp_path / "metrics.json").write_text("{not json")
    assert temperature_of(tmp_path) == 1.0


def test_calibrated_probs_divides_logits_by_temperature() -> None:
    logits = np.array([[2.0, 0.0, 0.0]])
    p1, p2 = calibrated_probs(logits), calibrated_probs(logits, 2.0)
    assert np.allclose(p1.sum(1), 1) and np.allclose(p2.sum(1), 1)
    assert p2[0, 0] < p1[0, 0]  # a higher temperature is less confident
    assert np.allclose(p2, calibrated_probs(logits / 2.0))


def test_uncertainty_margin_and_entropy() -> None:
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert np.allclose(uncertainty(p, "margin"), [0.0, 1.0, 1.0])
    e = uncertainty(p, "entropy")
    assert e[0] == pytest.approx(0.0, abs=1e-6) and e[2] == pytest.approx(1.0) and 0 < e[1] < 1
    with pytest.raises(InterpretError, match="margin"):
        uncertainty(p, "nope")


def test_training_duplicates_by_cosine_and_by_bytes() -> None:
    train = _centres(3)
    pool = np.stack([train[0] * 3.0, train[1] + 0.8 * _centres(1, seed=9)[0], _centres(1, seed=5)[0]])
    dup = training_duplicates(pool, train)
    assert dup.tolist() == [True, False, False]  # a scaled copy has cosine 1
    dup = training_duplicates(pool, train, pool_hashes=["x", "y", "h1"], train_hashes=["h0", "h1", "h2"])
    assert dup.tolist() == [True, False, True]


def test_select_skips_duplicates_and_never_picks_two_near_copies() -> None:
    centres = _centres(6)
    labelled = _blobs(centres[:3], 4, seed=2)
    pool = _blobs(centres, 6, seed=3)
    pool = np.concatenate([pool, labelled[:2] * 1.0001, pool[:5] * 1.0001])  # two training copies, five pool copies
    probs = calibrated_probs(np.random.default_rng(4).normal(size=(len(pool), 3)))
    sel = select(pool, probs, CLASSES, n=12, labelled_emb=labelled, seed=0)
    idx = [p.index for p in sel.picks]
    assert len(idx) == len(set(idx)) == 12
    assert sel.n_train_duplicates >= 2 and sel.n_pool_duplicates >= 5
    assert not set(idx) & {36, 37}  # the copies of training images
    x = pool[idx] / np.linalg.norm(pool[idx], axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, 0)
    assert sim.max() < NEAR_DUPLICATE


def test_select_covers_unexplored_regions_first() -> None:
    centres = _centres(4)
    labelled = _blobs(centres[:2], 5, seed=2)  # regions 0 and 1 are labelled, 2 and 3 are not
    pool = _blobs(centres, 10, seed=3)
    logits = np.tile([4.0, 0.0, 0.0], (len(pool), 1))
    sel = select(pool, calibrated_probs(logits), CLASSES, n=2, labelled_emb=labelled, seed=0)
    assert sorted(p.index // 10 for p in sel.picks) == [2, 3]  # one from each unexplored region
    assert all("unexplored" in p.reason for p in sel.picks)
    assert sel.picks[0].guess == "a" and 0 < sel.picks[0].confidence <= 1 and sel.picks[0].runner_up in ("b", "c")


def test_select_prefers_the_uncertain_image_of_a_region() -> None:
    pool = _blobs(_centres(1), 10, seed=3)
    logits = np.tile([4.0, 0.0, 0.0], (len(pool), 1))
    logits[5] = [1.0, 1.0, -3.0]  # the model cannot tell between a and b
    sel = select(pool, calibrated_probs(logits), CLASSES, n=1, seed=0)
    assert sel.picks[0].index == 5
    assert sel.picks[0].reason.startswith("uncertain between a and b (50% vs 50%)")


def test_select_is_deterministic_for_a_seed() -> None:
    pool = _blobs(_centres(8), 8, spread=0.3, seed=3)
    probs = calibrated_probs(np.random.default_rng(4).normal(size=(len(pool), 3)))
    labelled = _blobs(_centres(8)[:2], 3, seed=5)
    a = select(pool, probs, CLASSES, n=10, labelled_emb=labelled, seed=7)
    b = select(pool, probs, CLASSES, n=10, labelled_emb=labelled, seed=7)
    assert a.picks == b.picks


def test_select_returns_fewer_picks_when_few_distinct_images_are_left() -> None:
    pool = np.repeat(_centres(2), 4, axis=0)  # two pictures, four copies each
    probs = calibrated_probs(np.zeros((8, 3)))
    sel = select(pool, probs, CLASSES, n=5, seed=0)
    assert len(sel.picks) == 2 and sel.n_pool_duplicates == 6


def test_select_bad_input() -> None:
    pool = _centres(4)
    with pytest.raises(InterpretError, match="at least 1"):
        select(pool, calibrated_probs(np.zeros((4, 3))), CLASSES, n=0)
    with pytest.raises(InterpretError, match="do not fit"):
        select(pool, calibrated_probs(np.zeros((3, 3))), CLASSES, n=2)
