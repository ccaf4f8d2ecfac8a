"""Scale-out: `ursa train --nproc 2` (DDP over gloo on CPU), rank-0-only writes, a rank that dies, devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_dataset
from ursa.config import TrainConfig
from ursa.errors import TrainError
from ursa.train import distributed as dist

FAST = ["--size", "64", "--fine-tune", "1"]  # TrainConfig(size=64, fine_tune=1)


def test_two_processes_give_the_metrics_of_one(run_cli, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=10)
    code, _, err = run_cli("train", data, "--out", tmp_path / "one", *FAST)
    assert code == 0, err
    code, stdout, err = run_cli("train", data, "--out", tmp_path / "two", *FAST, "--nproc", "2", "--threads", "1")
    assert code == 0, err
    assert "torch.distributed.run --nproc_per_node 2" in stdout
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["runtime"]["world_size"] == 2 and cfg["runtime"]["device"] == "cpu"
    assert cfg["runtime"]["precision"]["precision"] == "fp32" and cfg["runtime"]["fine_tune_images_per_s"] > 0
    assert two["n_train"] == one["n_train"] and two["n_valid"] == one["n_valid"] and two["final_stage"] == "fine_tune"
    # Stated tolerance: the same seed gives the same split, features and head on 1 or N processes; only the
    # fine-tuning batches differ (DistributedSampler order, its padding), so at most one validation image
    # may change sides and the validation loss may move by 0.15.
    assert abs(two["error_rate"] - one["error_rate"]) <= 1 / one["n_valid"] + 1e-9
    assert abs(two["valid_loss"] - one["valid_loss"]) <= 0.15
    # one run folder, written once: no second folder from another rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one", "two"]


def test_only_rank_0_writes_the_run_folder(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ursa.train.recipe import train_run

    monkeypatch.setattr(dist, "is_main", lambda: False)  # as rank 1 of a group: computes everything, writes nothing
    res = train_run(tiny_dataset, tmp_path / "run", train=TrainConfig(size=64, fine_tune=1), progress=False)
    assert res.metrics["final_stage"] == "fine_tune" and not (tmp_path / "run").exists()


_DYING = """
import os, sys
from ursa.train import distributed as dist
from ursa.errors import TrainError
dist.init(None, timeout_s=30)
if dist.rank() == 1:
    os._exit(9)  # as if killed
try:
    dist.barrier()
    dist.gather(1)
except TrainError as exc:
    print("TRAINERROR", exc)
    sys.exit(2)
sys.exit(0)
"""


def test_a_rank_that_dies_gives_a_train_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dying.py"
    script.write_text(_DYING)
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[1].returncode == 9
    assert procs[0].returncode == 2, outs[0]
    assert "TRAINERROR another training process stopped" in outs[0] and "run the same command again" in outs[0]


def test_a_failing_rank_fails_the_launch_with_exit_2(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("train", tmp_path / "missing", "--out", tmp_path / "r", "--nproc", "2", "--threads", "1")
    assert code == 2 and "failed" in err and "--nproc" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--device", "gpu"], "use auto, cpu or cuda"),
        (["--precision", "fp8"], "use one of auto, fp32, bf16, fp16"),
    ],
)
def test_bad_scale_out_options_exit_2_with_the_fix(run_cli, tiny_dataset: Path, tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = run_cli("train", tiny_dataset, "--out", tmp_path / "r", *args)
    assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu(run_cli, tiny_dataset: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("train", tiny_dataset, "--out", tmp_path / "r", "--device", "cuda")
    assert code == 2 and "--device cpu" in err and not (tmp_path / "r").exists()


def test_device_and_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert dist.pick_device("cpu") == cpu
    assert dist.pick_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else cpu)
    assert dist.choose_precision("bf16", cpu)[0] == "bf16"
    with pytest.raises(TrainError, match="needs a GPU"):
        dist.choose_precision("fp16", cpu)
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main() and dist.gather(3) == [3] and dist.broadcast("x") == "x"


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_precision_on_a_cpu_is_fp32_on_every_cpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """Regression: on a CPU with AVX512-BF16, `auto` timed one step in each precision and took bf16 when it
    won the race, so the suite failed there and a busy moment could change how a run trains. Now `auto` is
    decided from capabilities alone: fp32 on an AVX-only, AVX2 or AVX512-BF16 CPU alike; bf16 when asked."""
    import inspect
    import time

    cpu = torch.device("cpu")
    monkeypatch.setattr(dist, "_cpu_has_bf16", lambda: native_bf16)

    def no_timing() -> float:
        raise AssertionError("choosing a precision must not time anything")

    with monkeypatch.context() as m:
        m.setattr(time, "perf_counter", no_timing)
        auto, auto_info = dist.choose_precision("auto", cpu)
        asked, asked_info = dist.choose_precision("bf16", cpu)
        fp32 = dist.choose_precision("fp32", cpu)
    assert auto == "fp32" and auto_info["precision"] == "fp32" and auto_info["cpu_native_bf16"] is native_bf16
    assert "every CPU" in auto_info["reason"] and "--precision bf16" in auto_info["reason"]
    assert asked == "bf16" and asked_info["reason"].startswith("asked for") and (("emulates" in asked_info["reason"]) is not native_bf16)  # an explicit request is kept, on any CPU
    assert fp32 == ("fp32", {"requested": "fp32", "device": "cpu", "cpu_native_bf16": native_bf16, "precision": "fp32", "reason": "asked for"})
    assert "probe" not in inspect.signature(dist.choose_precision).parameters  # no timing plumbing left


@pytest.mark.parametrize("bf16_ok, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_follows_its_capability(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    gpu = torch.device("cuda", 0)
    assert dist.choose_precision("auto", gpu)[0] == expected
    assert dist.choose_precision("fp32", gpu)[0] == "fp32"
    if not bf16_ok:
        with pytest.raises(TrainError, match="no bf16"):
            dist.choose_precision("bf16", gpu)


def test_torchrun_command() -> None:
    cmd = dist.torchrun_command(4, ["train", "data"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone", "-m", "ursa", "train", "data"]
