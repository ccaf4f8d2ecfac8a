"""Many processes, one training: process groups from torchrun's environment, rank helpers, devices, precision.

The same `ursa train` runs on 1 process or N. torchrun (or `ursa train --nproc N`, which starts torchrun
itself) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` reads them and joins the
process group (gloo on CPU, NCCL on CUDA). Without them every helper here is a no-op for one process, so
single-process code paths stay exactly as they were.

Who writes what: global rank 0 writes the run folder and checkpoints (`is_main`); local rank 0 of each
machine writes the feature cache beside the dataset (`is_local_main`), so machines without a shared
file system each get their own copy, and machines with one write identical, atomically renamed files.

A rank that dies turns the collective calls of the others into `TrainError` with a message that says so
(`gather`, `broadcast`, `barrier` translate the backend's error); torchrun then stops the rest.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ursa.config import DEVICES, PRECISIONS
from ursa.errors import TrainError

__all__ = [
    "DistEnv",
    "env",
    "init",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "is_local_main",
    "barrier",
    "gather",
    "broadcast",
    "torchrun_command",
    "launch",
    "pick_device",
    "PRECISIONS",
    "choose_precision",
    "autocast",
]

_DEAD_RANK = (
    "another training process stopped (it crashed, ran out of memory or was killed), so this one cannot go on: {detail}. "
    "Its own error is printed above by torchrun; fix that and run the same command again (the feature cache keeps what was computed)."
)


@dataclass(frozen=True)
class DistEnv:
    """The launcher's view of this process: global rank, world size, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (0 / 1 / 0 when not launched by torchrun)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise TrainError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start Ursa with torchrun or `ursa train --nproc N`.") from None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Global rank 0: the only process that writes the run folder, checkpoints and the progress display."""
    return rank() == 0


def is_local_main() -> bool:
    """Rank 0 on this machine: the process that writes the feature cache beside the dataset."""
    return not is_distributed() or env().local_rank == 0


def init(device: torch.device | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun described (gloo on CPU, NCCL on CUDA); True when one was joined.

    A no-op (False) for a single process or when the group already exists. On CUDA each process
    takes the GPU of its local rank. `timeout_s` bounds how long a collective waits for a silent peer.
    """
    e = env()
    if e.world_size <= 1 or torch.distributed.is_initialized():
        return False
    if not torch.distributed.is_available():
        raise TrainError("this PyTorch build has no torch.distributed; run without --nproc/torchrun or install a full PyTorch build.")
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(e.local_rank)
    try:
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise TrainError(f"could not join the process group of {e.world_size} processes ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check MASTER_ADDR/MASTER_PORT and that every rank started.") from None
    atexit.register(shutdown)  # leave the group cleanly when the process ends
    return True


def shutdown() -> None:
    """Leave the process group (if any)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(RuntimeError):
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _peer_errors(what: str) -> Iterator[None]:
    """Turn the backend's error about a lost peer into a TrainError naming the fix."""
    try:
        yield
    except RuntimeError as exc:  # gloo/NCCL raise RuntimeError (DistBackendError is one) when a peer is gone
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(_DEAD_RANK.format(detail=f"{what} failed with {first[:300]}")) from None


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_distributed():
        with _peer_errors("barrier"):
            torch.distributed.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (any picklable value), in rank order, on every rank; `[obj]` for one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _peer_errors("gathering results"):
        torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, *, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (`obj` itself for one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    with _peer_errors("broadcast"):
        torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


# ---- launching ------------------------------------------------------------------------------------
def torchrun_command(nproc: int, argv: Sequence[str], *, python: str | None = None) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N -m ursa ARGV...` on a free local port."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", "-m", "ursa", *argv]


def launch(nproc: int, argv: Sequence[str], *, threads: int | None = None, env_extra: dict[str, str] | None = None) -> None:
    """Run `ursa ARGV...` on `nproc` local processes under torchrun and wait; a failed rank raises TrainError.

    Each process gets `threads` CPU threads (default: the cores divided among the processes), so N
    processes do not oversubscribe the CPU.
    """
    if nproc < 1:
        raise TrainError(f"--nproc must be at least 1 (got {nproc}).")
    child_env = dict(os.environ)
    per = threads or max(1, (os.cpu_count() or 1) // nproc)
    child_env.setdefault("OMP_NUM_THREADS", str(per))
    child_env.update(env_extra or {})
    t0 = time.perf_counter()
    rc = subprocess.call(torchrun_command(nproc, argv), env=child_env)
    if rc != 0:
        raise TrainError(
            f"training on {nproc} processes failed after {time.perf_counter() - t0:.0f} s (torchrun exit code {rc}); "
            "the failing rank's error is printed above. Fix it and run the same command again, or run without --nproc to see it alone."
        )


# ---- device and precision ---------------------------------------------------------------------------
def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: this rank's CUDA GPU when there is one, else the CPU; `cpu`; `cuda` (an error when absent)."""
    if requested not in DEVICES:
        raise TrainError(f"unknown device {requested!r}; use auto, cpu or cuda.")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise TrainError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; use --device cpu (or auto), or install a CUDA build of PyTorch.")
    if requested == "cpu" or not has_cuda:
        return torch.device("cpu")
    n = torch.cuda.device_count()
    return torch.device("cuda", env().local_rank % max(1, n))


def _cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX): without it CPU autocast emulates bf16 and is slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(requested: str, device: torch.device) -> tuple[str, dict[str, Any]]:
    """The precision to train in and why: ("fp32" | "bf16" | "fp16", facts for config.json).

    Decided from the request and the device's capabilities only, never from a timing, so the same
    command on the same data trains the same way however busy the machine is. `auto`: bf16 on a GPU
    that supports it, else fp16 on the GPU; fp32 on a CPU, on every CPU (bf16 there only when asked
    for with `bf16`). fp16 on a CPU is refused (no CPU kernels gain from it).
    """
    if requested not in PRECISIONS:
        raise TrainError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}.")
    info: dict[str, Any] = {"requested": requested, "device": str(device)}
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            raise TrainError("--precision bf16 was asked for but this GPU has no bf16; use --precision fp16 or fp32.")
        choice = requested if requested != "auto" else ("bf16" if bf16_ok else "fp16")
        info["reason"] = "asked for" if requested != "auto" else f"GPU {'supports' if bf16_ok else 'lacks'} bf16"
        return choice, {**info, "precision": choice}
    if requested == "fp16":
        raise TrainError("--precision fp16 needs a GPU; on the CPU use fp32 (the default) or bf16.")
    native = _cpu_has_bf16()
    info["cpu_native_bf16"] = native
    if requested == "bf16":
        why = "asked for" if native else "asked for; this CPU has no native bf16 (avx512_bf16/amx_bf16), so autocast emulates it and is slower"
        return "bf16", {**info, "precision": "bf16", "reason": why}
    if requested == "fp32":
        return "fp32", {**info, "precision": "fp32", "reason": "asked for"}
    return "fp32", {**info, "precision": "fp32", "reason": "auto on a CPU is fp32 on every CPU, so a run trains the same way on any machine; pass --precision bf16 to use bf16"}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for `precision` on `device`; a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
