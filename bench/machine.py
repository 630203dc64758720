"""What machine a bench ran on: every bench prints it beside its ratios, since they depend
on it (AVX2 here, AVX-512/AMX elsewhere). No torch import: memory_growth's driver uses it."""

from __future__ import annotations

import os
import platform


def cpu_features() -> str:
    """'x86_64, 2 CPUs, avx2 fma' (the vector extensions that matter for this work)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    have = " ".join(f for f in wanted if f in flags) or ("no AVX2" if flags else "flags unknown")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {have}"
