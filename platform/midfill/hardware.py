"""What the machine can do fast, shared by the trainer and serving."""

from __future__ import annotations


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True on CPUs with bfloat16 instructions (avx512_bf16 or AMX). Elsewhere bfloat16 is emulated
    and slower than float32, so callers fall back to float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags
