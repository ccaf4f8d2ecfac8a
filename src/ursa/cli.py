"""The `ursa` command: one sub-command per stage, plus `demo`.

Each command fills a config dataclass and calls one library function; heavy imports happen inside the
command so `ursa --help` is instant. Any `UrsaError` becomes its message and exit code 2.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ursa.errors import UrsaError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Make your own image classifier on a CPU: collect, verify, train, interpret, clean, export, serve.",
)
console = Console()
err_console = Console(stderr=True)


def tune_allocator() -> bool:
    """Stop glibc from mmap'ing and unmapping PyTorch's large activation buffers on every batch.

    With glibc's defaults each large buffer is an mmap that is returned to the OS when freed, so every
    batch pays page faults on fresh memory (measured about 3x slower CPU training here; see
    benchmarks/allocator.py). Keeping them on the heap removes that. Returns True when applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
    return ok


def main() -> None:
    """Console-script entry point."""
    tune_allocator()
    try:
        app()
    except UrsaError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(exc.exit_code) from None


# ---- commands are defined below, one block per stage ----
