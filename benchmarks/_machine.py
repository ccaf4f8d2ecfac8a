"""What a benchmark line says about the machine it ran on (run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path

# the vector-instruction flags that decide CPU training and inference speed, as /proc/cpuinfo names them
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this CPU has (Linux /proc/cpuinfo; [] elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []
