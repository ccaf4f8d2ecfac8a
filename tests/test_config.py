"""The config dataclasses check themselves, and the CLI checks every numeric option before it starts anything."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import typer

from ursa.config import Augment, CollectConfig, DataConfig, TrainConfig, VerifyConfig, check_number, to_dict
from ursa.errors import CollectError, DataError, TrainError, UrsaError, VerifyError

CONFIGS = {DataConfig: DataError, Augment: DataError, TrainConfig: TrainError, CollectConfig: CollectError, VerifyConfig: VerifyError}

# Every field of every config, with values it must refuse. A field added without an entry fails
# test_every_field_is_covered, so each new setting gets its check and its test.
BAD: dict[type, dict[str, list[object]]] = {
    DataConfig: {
        "train": ["", 3],
        "valid": [""],
        "labels": ["", 1.5],
        "valid_pct": [0.0, 1.0, -0.1, 1.5, math.nan, "0.2", None],
        "seed": [-1, 2**32, 1.5, True, None],
        "flip": ["no", 1, None],
        "allow_new_labels": ["yes", 0],
        "aug": ["fancy", 3, None],
    },
    Augment: {
        "do_flip": ["yes", 1, None],
        "flip_vert": ["no", 0],
        "max_rotate": [-1.0, 180.5, math.nan, "10", None],
        "max_zoom": [0.99, 10.5, math.inf, None],
        "max_lighting": [-0.1, 1.0, None],
        "max_warp": [-0.2, 1.0, "0.2"],
        "p_affine": [-0.1, 1.1, None],
        "p_lighting": [1.5, math.nan],
        "min_scale": [0.0, 1.01, -0.5],
        "saturation": [-0.1, 1.5],
    },
    TrainConfig: {
        "arch": ["", None, 3],
        "weights": ["", 5],
        "head": ["sgd", "one-cycle", None],
        "c": [0, -1.0, math.inf, math.nan, None],
        "epochs": [0, -3, 2.5, None],
        "lr": [0.0, -1e-3, math.inf, math.nan],
        "views": [-1, 1.5],
        "fine_tune": [-1, 0.5],
        "fine_tune_lr": [0.0, -1e-4, math.nan],
        "size": [0, 16, 31, 4096, 64.0, True],
        "batch_size": [0, -32, 16.0, True],
        "threads": [0, -1, 2.0],
        "tta": ["yes", None],
        "view_budget": [0, -1, 1.5, None],
        "num_workers": [-1, 0.5, None],
        "dropout": [-0.1, 1.0, math.nan, None],
        "head_batch_size": [0, 8.0, True],
        "wd": [-0.01, math.inf, None],
        "label_smoothing": [-0.1, 1.0, "0.1"],
        "fine_tune_label_smoothing": [-0.1, 1.0, None],
        "fine_tune_size": [0, 31, 4096, 64.0],
        "device": ["gpu", "", None],
        "precision": ["fp8", "FP16", None],
        "channels_last": ["yes", 1],
        "budget": [0, -1.0, "60", math.nan],
    },
    CollectConfig: {
        "max_images": [0, -5, 1.5],
        "concurrency": [0, -1, 2.5, None],
        "per_host": [0, -1, None],
        "timeout": [0, -1.0, math.inf, math.nan, None],
        "total_timeout": [0.0, -30.0, math.nan],
        "retries": [-1, 1.5],
        "backoff": [-0.25, math.inf],
        "max_redirects": [-1, 2.5],
        "max_bytes": [0, -1, 1e6],
        "max_pixels": [0, -1, 1e8],
        "user_agent": ["", None],
        "retry_failed": ["true", 1],
        "processes": [0, -2, 1.5],
    },
    VerifyConfig: {
        "max_size": [0, 15, -500, 500.0],
        "max_pixels": [0, -1],
        "quality": [0, 96, 100, -1, 90.5],
        "repair": ["no", None],
    },
}

CASES = [pytest.param(cls, name, value, id=f"{cls.__name__}.{name}={value!r}") for cls, fields in BAD.items() for name, values in fields.items() for value in values]


@pytest.mark.parametrize(("cls", "name", "value"), CASES)
def test_a_bad_value_raises_the_stage_error_naming_field_value_and_range(cls: type, name: str, value: object) -> None:
    with pytest.raises(CONFIGS[cls]) as info:
        cls(**{name: value})
    msg = str(info.value)
    assert f"{cls.__name__}.{name}" in msg
    assert f"got {value!r}" in msg
    assert "must be" in msg


@pytest.mark.parametrize("cls", list(CONFIGS))
def test_every_field_is_covered(cls: type) -> None:
    assert {f.name for f in dataclasses.fields(cls)} == set(BAD[cls])


@pytest.mark.parametrize("cls", list(CONFIGS))
def test_defaults_are_valid_and_survive_config_json(cls: type) -> None:
    cfg = cls()
    assert cls(**to_dict(cfg)) == cfg


def test_collect_config_with_no_slots_fails_at_once() -> None:
    """Regression: per_host=0 made download() wait forever on asyncio.Semaphore(0), and concurrency=0 raised
    asyncio's ValueError; both now fail when the config is made, naming the option."""
    with pytest.raises(CollectError, match=r"--per-host \(CollectConfig.per_host\) must be at least 1, got 0"):
        CollectConfig(per_host=0)
    with pytest.raises(CollectError, match=r"--concurrency \(CollectConfig.concurrency\) must be at least 1, got 0"):
        CollectConfig(concurrency=0)


def test_size_zero_is_refused_not_replaced_by_the_default() -> None:
    """Regression: --size 0 trained at 224 (0 was read as 'not given')."""
    with pytest.raises(TrainError, match=r"--size \(TrainConfig.size\) must be from 32 to 2048 pixels, got 0"):
        TrainConfig(size=0)


def test_good_edge_values_are_accepted() -> None:
    TrainConfig(size=32, views=0, fine_tune=0, threads=1, batch_size=1, lr=1e-6, c=1e-9)
    TrainConfig(size=2048)
    DataConfig(valid_pct=0.01, seed=0)
    DataConfig(valid_pct=0.99, seed=2**32 - 1)
    CollectConfig(max_images=1, concurrency=1, per_host=1, retries=0, backoff=0, max_redirects=0, processes=1)
    VerifyConfig(max_size=16, quality=1)
    VerifyConfig(quality=95)


def test_replace_checks_too() -> None:
    with pytest.raises(TrainError, match="batch_size"):
        dataclasses.replace(TrainConfig(), batch_size=0)


def test_train_config_reads_config_json_of_runs_written_before_the_typed_fields() -> None:
    """Old runs kept ten settings as strings under "extra"; they are read into their fields, with their old meaning."""
    old = {**to_dict(TrainConfig()), "fine_tune": 2}
    for name in ("view_budget", "num_workers", "dropout", "head_batch_size", "wd", "label_smoothing", "fine_tune_label_smoothing", "fine_tune_size", "device", "precision", "channels_last"):
        del old[name]
    old["extra"] = {"device": "cpu", "precision": "bf16", "head_bs": "16", "label_smoothing": 0.2, "fine_tune_size": 0, "view_budget": 300, "channels_last": 1, "note": "ignored"}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.device, cfg.precision, cfg.head_batch_size, cfg.view_budget, cfg.fine_tune) == ("cpu", "bf16", 16, 300, 2)
    assert cfg.label_smoothing == cfg.fine_tune_label_smoothing == 0.2 and cfg.fine_tune_size is None and cfg.channels_last is True
    assert TrainConfig.from_dict(to_dict(cfg)) == cfg  # what a run writes now reads back unchanged
    with pytest.raises(TrainError, match=r"TrainConfig.precision.*got 'fp8'"):
        TrainConfig.from_dict({"extra": {"precision": "fp8"}})
    with pytest.raises(TrainError, match="head_batch_size"):
        TrainConfig.from_dict({"extra": {"head_bs": "many"}})
    with pytest.raises(TrainError, match=r"unknown fields \['colour'\]"):
        TrainConfig.from_dict({"colour": "red"})


def test_paths_are_kept_as_text() -> None:
    """A pathlib.Path from Python is stored as str, so config.json can hold it."""
    cfg = DataConfig(labels=Path("data") / "cleaned.csv")
    assert cfg.labels == str(Path("data") / "cleaned.csv")
    assert TrainConfig(weights=Path("w.safetensors")).weights == "w.safetensors"


def test_numpy_numbers_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    assert TrainConfig(epochs=np.int64(3), c=np.float32(0.5)).epochs == 3


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (0, dict(integer=True, at_least=1, at_most=65535), "--x must be from 1 to 65535, got 0."),
        (1.0, dict(above=0.0, below=1.0), "--x must be between 0 and 1 (exclusive), got 1.0."),
        (1.5, dict(above=0.0, at_most=1.0), "--x must be greater than 0 and at most 1, got 1.5."),
        (0.5, dict(at_least=0.0, below=0.5), "--x must be at least 0 and less than 0.5, got 0.5."),
        (0, dict(above=0.0, unit="seconds"), "--x must be greater than 0 seconds, got 0."),
        (math.inf, dict(above=0.0), "--x must be a finite number (greater than 0), got inf."),
        ("3", dict(integer=True, at_least=1), "--x must be a whole number (at least 1), got '3'."),
        (None, dict(integer=True, at_least=1), "--x must be a whole number (at least 1), got None."),
    ],
)
def test_check_number_messages(value: object, bounds: dict, message: str) -> None:
    with pytest.raises(UrsaError) as info:
        check_number(value, "--x", UrsaError, **bounds)
    assert str(info.value) == message


def test_check_number_lets_none_through_when_optional() -> None:
    check_number(None, "--x", UrsaError, integer=True, at_least=1, optional=True)


# ---- the CLI ----


def _defaults(command: str) -> dict[str, object]:
    from ursa.cli import app

    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {p.name: p.default for p in cmd.params}


def test_cli_defaults_are_the_config_defaults() -> None:
    """One default per setting: `ursa train --bs` was 32 while TrainConfig.batch_size was 64."""
    train, data = TrainConfig(), DataConfig()
    got = _defaults("train")
    for name in ("head", "c", "epochs", "views", "fine_tune", "fine_tune_lr", "batch_size", "device", "precision"):
        assert got[name] == getattr(train, name), name
    assert got["arch"] is None and got["budget"] is None  # no --arch: TrainConfig's arch, or "auto" with --budget
    for name in ("valid_pct", "seed", "flip", "allow_new_labels"):
        assert got[name] == getattr(data, name), name
    collect = CollectConfig()
    got = _defaults("download")
    assert (got["concurrency"], got["per_host"], got["timeout"]) == (collect.concurrency, collect.per_host, collect.timeout)
    assert got["max_mb"] * 2**20 == collect.max_bytes
    assert _defaults("verify")["repair"] == VerifyConfig().repair


def test_fine_tuning_uses_the_batch_size_it_is_given(monkeypatch: pytest.MonkeyPatch, tiny_dataset: Path, tmp_path: Path) -> None:
    """Regression: fine-tuning silently took min(batch_size, 32)."""
    from ursa.data.loaders import ImageDataLoaders
    from ursa.train.recipe import train_run

    seen: list[int] = []

    class Stop(Exception):
        pass

    def from_split(*args: object, bs: int, **kwargs: object) -> None:
        seen.append(bs)
        raise Stop

    monkeypatch.setattr(ImageDataLoaders, "from_split", staticmethod(from_split))
    with pytest.raises(Stop):
        train_run(tiny_dataset, tmp_path / "r", train=TrainConfig(size=32, views=0, fine_tune=1, batch_size=48), progress=False)
    assert seen == [48]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "DATA", "--size", "0"], "--size (TrainConfig.size) must be from 32 to 2048 pixels, got 0"),
        (["train", "DATA", "--bs", "0"], "--bs (TrainConfig.batch_size) must be at least 1, got 0"),
        (["train", "DATA", "--epochs", "0"], "--epochs (TrainConfig.epochs) must be at least 1, got 0"),
        (["train", "DATA", "--lr", "0"], "--lr (TrainConfig.lr) must be greater than 0, got 0.0"),
        (["train", "DATA", "--c", "-1"], "--c (TrainConfig.c) must be greater than 0, got -1.0"),
        (["train", "DATA", "--views", "-1"], "--views (TrainConfig.views) must be at least 0, got -1"),
        (["train", "DATA", "--fine-tune", "-1"], "--fine-tune (TrainConfig.fine_tune) must be at least 0 epochs, got -1"),
        (["train", "DATA", "--fine-tune-lr", "0"], "--fine-tune-lr (TrainConfig.fine_tune_lr) must be greater than 0"),
        (["train", "DATA", "--threads", "0"], "--threads (TrainConfig.threads) must be at least 1, got 0"),
        (["train", "DATA", "--seed", "-1"], "--seed (DataConfig.seed) must be from 0 to 4294967295, got -1"),
        (["train", "DATA", "--valid-pct", "1"], "--valid-pct (DataConfig.valid_pct) must be between 0 and 1 (exclusive), got 1.0"),
        (["train", "DATA", "--nproc", "2", "--valid-pct", "0"], "--valid-pct (DataConfig.valid_pct) must be between 0 and 1"),
        (["show-batch", "DATA", "-n", "0"], "-n must be at least 1, got 0"),
        (["show-batch", "DATA", "--size", "8"], "--size (TrainConfig.size) must be from 32 to 2048 pixels, got 8"),
        (["lr-find", "DATA", "--size", "0"], "--size (TrainConfig.size) must be from 32"),
        (["demo", "--out", "OUT", "--size", "0"], "--size (TrainConfig.size) must be from 32"),
        (["demo", "--out", "OUT", "--per-class", "1"], "--per-class must be at least 2, got 1"),
        (["predict", "MODEL", "x.jpg", "--top-k", "0"], "--top-k must be at least 1, got 0"),
        (["predict", "MODEL", "x.jpg", "--threads", "0"], "--threads must be at least 1, got 0"),
        (["export", "RUN", "--out", "OUT", "--opset", "3"], "--opset must be at least 7, got 3"),
        (["interpret", "RUN", "--top", "0"], "--top must be at least 1, got 0"),
        (["issues", "RUN", "--near", "1.5"], "--near must be greater than 0 and at most 1, got 1.5"),
        (["issues", "RUN", "--folds", "1"], "--folds must be at least 2, got 1"),
        (["review", "DATA", "--port", "0"], "--port must be from 1 to 65535, got 0"),
        (["lesson", "sgd", "--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
        (["lesson", "fit", "--noise", "-1"], "--noise must be at least 0, got -1.0"),
    ],
)
def test_cli_refuses_bad_numbers_before_starting(run_cli, tiny_dataset: Path, tmp_path: Path, args: list[str], message: str) -> None:
    subs = {"DATA": str(tiny_dataset), "OUT": str(tmp_path / "out"), "MODEL": str(tmp_path / "model"), "RUN": str(tmp_path / "run")}
    code, out, err = run_cli(*[subs.get(a, a) for a in args])
    assert code == 2
    assert message in " ".join(err.split())
    assert not (tmp_path / "out").exists()  # nothing written (demo writes its dataset only after the checks)
    assert "starting" not in out  # --nproc 2 starts no torchrun


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
        (["--threads", "-1"], "--threads must be at least 1, got -1"),
        (["--port", "0"], "--port must be from 1 to 65535, got 0"),
        (["--port", "70000"], "--port must be from 1 to 65535, got 70000"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be greater than 0 MiB, got 0.0"),
    ],
)
def test_serve_refuses_bad_options_before_saying_it_serves(run_cli, tmp_path: Path, args: list[str], message: str) -> None:
    """Regression: `serve --concurrency 0` and `--threads -1` started, and "serving at ...:0" was printed before
    the port error."""
    code, out, err = run_cli("serve", tmp_path / "model", *args)
    assert code == 2
    assert message in " ".join(err.split())
    assert "serving" not in out + err
