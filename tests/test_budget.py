"""--arch auto and --budget: the most accurate packaged backbone whose cached features fit (ursa.train.budget)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ursa.config import DataConfig, TrainConfig
from ursa.data.split import build_split
from ursa.errors import TrainError
from ursa.train import budget as bu

COSTS = {"forward": 0.02, "decode": 0.005, "augment": 0.01}  # seconds per image, as a probe might measure them


@pytest.fixture
def fixed_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe answers COSTS: the choice no longer depends on this machine's load."""
    monkeypatch.setattr(bu, "probe", lambda split, **kw: dict(COSTS))


def _split(tiny_dataset: Path):  # noqa: ANN202
    return build_split(tiny_dataset, DataConfig(seed=0))


def test_the_probe_measures_this_machine(tiny_dataset: Path) -> None:
    costs = bu.probe(_split(tiny_dataset), repeats=1, batch=2)
    assert set(costs) == {"forward", "decode", "augment"} and all(0 < v < 10 for v in costs.values())


def test_augmented_views_cost_their_own_decode(tiny_dataset: Path) -> None:
    split = _split(tiny_dataset)
    (plain, aug), views = bu._samples(split, TrainConfig(), DataConfig())
    assert plain == 2 * len(split.train) + 2 * len(split.valid) and aug == (views - 2) * len(split.train)
    assert bu.estimate("efficientnet_lite0", (0, 10), COSTS) - bu.estimate("efficientnet_lite0", (10, 0), COSTS) == pytest.approx(10 * (COSTS["augment"] - COSTS["decode"]))


def test_a_large_budget_picks_the_most_accurate_backbone(tiny_dataset: Path) -> None:
    split = _split(tiny_dataset)
    cfg, rec = bu.resolve_arch(split, TrainConfig(arch="auto", budget=1000), DataConfig(), costs=COSTS)
    assert cfg.arch == "efficientnet_lite2" and rec is not None and rec["arch"] == "efficientnet_lite2"
    assert rec["estimate_s"] <= 1000 and "within 1000 s" in rec["why"] and set(rec["estimates_s"]) == set(bu.ACCURACY_ORDER)


def test_a_tighter_budget_drops_views_then_steps_down(tiny_dataset: Path) -> None:
    split = _split(tiny_dataset)
    train, data = TrainConfig(arch="auto"), DataConfig()
    full, views = bu._samples(split, train, data)
    assert views > 2  # a small set: many augmented views
    two, _ = bu._samples(split, train, data, 2)
    one, _ = bu._samples(split, train, data, 1)
    # a larger backbone gives up augmented views (down to plain + mirrored) before a smaller one is taken
    cfg, rec = bu.resolve_arch(split, TrainConfig(arch="auto", budget=bu.estimate("efficientnet_lite1", full, COSTS)), data, costs=COSTS)
    assert cfg.arch == "efficientnet_lite2" and 2 <= rec["views"] < views
    budget = (bu.estimate("efficientnet_lite1", two, COSTS) + bu.estimate("efficientnet_lite2", two, COSTS)) / 2
    cfg, rec = bu.resolve_arch(split, TrainConfig(arch="auto", budget=budget), data, costs=COSTS)
    assert cfg.arch == "efficientnet_lite1" and rec["views"] == 2 and "efficientnet_lite2 would not fit" in rec["why"]
    budget = (bu.estimate("efficientnet_lite0", one, COSTS) + bu.estimate("efficientnet_lite0", two, COSTS)) / 2
    cfg, rec = bu.resolve_arch(split, TrainConfig(arch="auto", budget=budget), data, costs=COSTS)
    assert cfg.arch == "efficientnet_lite0" and rec["views"] == 1 and cfg.view_budget == len(split.train)


def test_a_budget_below_the_minimum_names_it(tiny_dataset: Path) -> None:
    split = _split(tiny_dataset)
    with pytest.raises(TrainError, match=r"--budget 1 s is below what the smallest backbone needs.*about \d+ s.*--budget \d+ or more"):
        bu.resolve_arch(split, TrainConfig(arch="auto", budget=1), DataConfig(), costs=COSTS)


def test_auto_without_a_budget_stays_within_one_and_a_half_times_the_default(tiny_dataset: Path) -> None:
    split = _split(tiny_dataset)
    cfg, rec = bu.resolve_arch(split, TrainConfig(arch="auto"), DataConfig(), costs=COSTS)
    full, _ = bu._samples(split, TrainConfig(), DataConfig())
    assert rec["default_budget"] is True and rec["seconds"] == pytest.approx(1.5 * bu.estimate("efficientnet_lite0", full, COSTS), abs=0.1)
    assert rec["estimate_s"] <= rec["seconds"]


def test_a_named_arch_wins_and_no_budget_changes_nothing(tiny_dataset: Path) -> None:
    split = _split(tiny_dataset)
    named = TrainConfig(arch="efficientnet_lite0", budget=5)
    cfg, rec = bu.resolve_arch(split, named, DataConfig(), costs=COSTS)
    assert cfg == named and rec is not None and "wins over --budget" in rec["why"]
    assert bu.resolve_arch(split, TrainConfig(), DataConfig(), costs=COSTS) == (TrainConfig(), None)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--arch", "auto", "--weights", "w.safetensors"], "--arch auto picks among the packaged backbones"),
        (["--budget", "0"], "--budget"),
        (["--budget", "-3"], "--budget"),
    ],
)
def test_bad_budget_requests_exit_2(run_cli, tiny_dataset: Path, tmp_path: Path, args: list[str], match: str) -> None:  # noqa: ANN001
    code, _, err = run_cli("train", str(tiny_dataset), "--out", str(tmp_path / "run"), *args)
    assert code == 2 and match in " ".join(err.split()) and not (tmp_path / "run").exists()


def test_cli_budget_below_minimum_exits_2_naming_it(run_cli, tiny_dataset: Path, tmp_path: Path, fixed_probe: None) -> None:  # noqa: ANN001
    code, _, err = run_cli("train", str(tiny_dataset), "--budget", "0.5", "--size", "64", "--out", str(tmp_path / "run"))
    assert code == 2 and "below what the smallest backbone needs" in " ".join(err.split()) and not (tmp_path / "run").exists()


def test_budgeted_runs_record_the_choice_and_are_deterministic(run_cli, tiny_dataset: Path, tmp_path: Path, fixed_probe: None) -> None:  # noqa: ANN001
    outs = []
    for i in range(2):
        code, out, _ = run_cli("train", str(tiny_dataset), "--budget", "1000", "--size", "64", "--out", str(tmp_path / f"run{i}"))
        assert code == 0 and "efficientnet_lite2" in out
        outs.append(tmp_path / f"run{i}")
    m = [json.loads((o / "metrics.json").read_text()) for o in outs]
    cfg = json.loads((outs[0] / "config.json").read_text())
    assert cfg["arch"] == cfg["train"]["arch"] == "efficientnet_lite2" and cfg["budget"]["arch"] == "efficientnet_lite2" and cfg["train"]["budget"] == 1000
    assert m[0]["budget"]["why"] and m[0]["error_rate"] == m[1]["error_rate"] and m[0]["temperature"] == m[1]["temperature"]
    from safetensors.numpy import load_file

    a, b = (load_file(str(o / "models" / "model.safetensors")) for o in outs)  # the tensors (the header's key order may vary)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
