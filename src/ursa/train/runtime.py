"""Process-wide settings that make CPU training fast, applied once at start-up."""

from __future__ import annotations

from ursa._malloc import M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt

__all__ = ["tune_allocator"]


def tune_allocator() -> bool:
    """Stop glibc from mmap'ing and unmapping PyTorch's large activation buffers on every batch.

    With glibc's defaults each large buffer is an mmap that is returned to the OS when freed, so every
    batch pays page faults on fresh memory (several times slower CPU training; see
    benchmarks/allocator.py). Keeping them on the heap removes that. Returns True when applied.

    Not for servers: they must give the memory of large uploads back to the system, which this tuning
    (no mmap, a 1 GiB trim threshold) prevents.
    """
    ok = mallopt(M_MMAP_MAX, 0)
    return mallopt(M_TRIM_THRESHOLD, 1 << 30) and ok
