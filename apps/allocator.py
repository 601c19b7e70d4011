"""glibc's heap keeps freed blocks resident, so a generation's peak resident set can hold memory no
tensor uses any more. A raster step's transients grow with the cache they read; once glibc's dynamic
mmap threshold has risen, it serves them from the heap, frees them there, and cannot reuse them for
the next, larger one (docs/measurements.md: hundreds of MiB at LlamaGen-B's peak). So every
``mvar-engine`` process fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``), and
benchmark workers get it through ``MALLOC_MMAP_THRESHOLD_`` from their first allocation: blocks of
128 KiB or more are mapped and go back to the operating system when freed.

A threshold the user set (``MALLOC_MMAP_THRESHOLD_`` in the environment) is left alone; elsewhere
(not glibc) nothing happens."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import MutableMapping

MMAP_THRESHOLD_BYTES = 128 * 1024
ENV = "MALLOC_MMAP_THRESHOLD_"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold in this process (True when it was set)."""
    if ENV in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def with_mmap_threshold(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` for a child process, with the threshold set unless the user chose one."""
    env.setdefault(ENV, str(MMAP_THRESHOLD_BYTES))
    return env
