"""Process-wide settings that make PyTorch fast on CPUs; applied once when an engine starts on the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_large_allocations_in_heap() -> None:
    """Stop glibc from giving every multi-megabyte tensor its own mmap.

    By default glibc maps allocations above ~128 KiB-32 MiB fresh from the kernel and unmaps them on
    free, so each step's activations and KV gathers page-fault their memory in again: measured 8.2 ms
    against 1.4 ms for one layer's decode attention at batch 64. Raising the mmap threshold to its
    maximum (32 MiB) and the trim threshold keeps that memory in the heap for reuse."""
    global _applied
    if _applied:
        return
    _applied = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; keeping the allocator's defaults")
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
