"""What this CPU can do natively, for choosing (or refusing) 16-bit autocast on the CPU.

bfloat16 autocast on the CPU pays off only where the CPU multiplies bf16 in hardware (x86
``avx512_bf16`` or AMX ``amx_bf16``; Arm ``bf16``): there oneDNN runs bf16 matrix products faster
than float32 ones (docs/measurements.md); elsewhere bf16 is emulated and slower than float32, so
it is refused with the reason.
The flags come from ``/proc/cpuinfo`` (Linux); ``MVAR_ENGINE_CPU_BF16=0/1`` overrides the
detection (tests, and machines whose kernel hides the flags)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU feature flags (``/proc/cpuinfo`` ``flags`` on x86, ``Features`` on Arm) of native bf16 math."""

OVERRIDE = "MVAR_ENGINE_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty when ``/proc/cpuinfo`` cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16() -> tuple[bool, str]:
    """``(supported, why)``: whether this CPU multiplies bfloat16 natively, with the evidence (the
    flag found, the override, or what is missing)."""
    override = os.environ.get(OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1", f"{OVERRIDE}={override}"
    found = [flag for flag in BF16_FLAGS if flag in cpu_flags()]
    if found:
        return True, f"the CPU has {found[0]}"
    if not cpu_flags():
        return False, "/proc/cpuinfo gives no CPU flags here (set MVAR_ENGINE_CPU_BF16=1 if the CPU has native bf16)"
    return False, f"the CPU has none of {', '.join(BF16_FLAGS)} (bf16 would be emulated, slower than float32)"
