"""glibc's `mallopt`, reached through ctypes in this one place.

Training and serving want opposite allocator settings (training keeps large buffers on the heap, a
server gives them back to the system), so each caller picks its options; the ctypes call lives here.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["mallopt", "M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "M_MMAP_MAX"]

# glibc's option numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def mallopt(option: int, value: int) -> bool:
    """Call glibc's `mallopt(option, value)`; True when glibc applied it, False off Linux or without glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(option, value) == 1)
