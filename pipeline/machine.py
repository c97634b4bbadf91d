"""What this machine's CPU is: its model and the vector extensions that decide which kernels run.

Read once from ``/proc/cpuinfo`` (Linux; elsewhere the model is Python's
guess and no extension is listed). No torch here: the benchmarks that only
time subprocesses stay light.
"""

from __future__ import annotations

import functools
import os
import platform

#: The extensions that change which kernels torch and Inductor pick (and so what compiled code runs).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and which of :data:`VECTOR_FLAGS` it has, in that order."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        info = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
        lines = info.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    return model, tuple(f for f in VECTOR_FLAGS if f in flags)


def describe_cpu_line() -> str:
    """``<model>, <n> CPUs (<flags>)``: the machine in one line, for logs and benchmarks."""
    model, flags = cpu_model_and_flags()
    shown = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")]
    return f"{model}, {os.cpu_count()} CPUs ({' '.join(shown) or 'no AVX2'})"
