"""`ursa train --nproc N`: the scale-out options checked, and the same command started again as N torchrun ranks.

The command line the CLI was given is passed on to torchrun without its `--nproc`, so each rank runs
the same `ursa train ...` in one process; under torchrun (WORLD_SIZE set) `--nproc` is ignored.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from ursa.config import check_number
from ursa.errors import TrainError
from ursa.train import distributed as dist

__all__ = ["scale_out", "without_nproc", "cuda_count"]


def without_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--nproc N` and `--nproc=N` left out."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cuda_count() -> int:
    """GPUs visible to PyTorch."""
    import torch

    return torch.cuda.device_count()


def check_options(nproc: int, *, device: str, precision: str) -> None:
    """--nproc, --device and --precision, checked before anything starts (--device cuda without a GPU fails here)."""
    check_number(nproc, "--nproc", TrainError, integer=True, at_least=1, hint="Use --nproc 2 for two processes.")
    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"--device {device} is not a device; use auto, cpu or cuda.")
    if precision not in dist.PRECISIONS:
        raise TrainError(f"--precision {precision} is not a precision; use one of {', '.join(dist.PRECISIONS)}.")
    picked = dist.pick_device(device)
    if nproc > 1 and picked.type == "cuda" and nproc > cuda_count():
        raise TrainError(f"--nproc {nproc} needs {nproc} GPUs but {cuda_count()} are visible; use --nproc {cuda_count()} or --device cpu.")


def scale_out(nproc: int, *, device: str, precision: str, argv: Sequence[str], threads: int | None = None,
              on_start: Callable[[list[str]], None] | None = None) -> bool:  # fmt: skip
    """Check the options; with `nproc` > 1 outside torchrun, run `ursa ARGV` (without --nproc) on `nproc` ranks.

    Returns True once the ranks have finished the training (a failed rank raises TrainError), False when
    this process should train itself. `on_start` gets the torchrun command line before it starts;
    `threads` (CPU threads per rank) defaults to the cores divided among the ranks.
    """
    check_options(nproc, device=device, precision=precision)
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return False
    rest = without_nproc(argv)
    if on_start is not None:
        on_start(dist.torchrun_command(nproc, rest))
    dist.launch(nproc, rest, threads=threads)
    return True
