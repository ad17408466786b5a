"""The C heap's policy where the C library is glibc (elsewhere each function does nothing): what the
process keeps of the memory it frees, and handing free pages back to the OS. Training keeps
everything it frees (`keep_freed_memory`), attribution pins the adaptive thresholds
(`pin_heap_thresholds`) and hands the heap back after long prompts' passes (`release_heap`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_glibc = ctypes.CDLL(ctypes.util.find_library("c")) if platform.libc_ver()[0] == "glibc" else None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)


def keep_freed_memory() -> None:
    """Have glibc keep the memory this process frees for its next allocations (no mmap of large
    blocks, no trimming) instead of returning it to the kernel: a step at F 8,192 frees and
    allocates again hundreds of MB, whose pages the kernel would otherwise zero and fault in again
    every step (F 8,192, L0 200, bf16-mixed: 330k page faults in steps 1-17 instead of 7, each ~1-2 us;
    memory after 18 steps 1,182 MB instead of 1,041, and kept; 2026-12-04)."""
    if _glibc is not None:
        _glibc.mallopt(_M_MMAP_MAX, 0)
        _glibc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def pin_heap_thresholds(mmap_above: int = 32 << 20, trim_above: int = 64 << 20) -> None:
    """Pin glibc's adaptive heap thresholds, by default at the ceilings they rise to (blocks under
    `mmap_above` bytes, 32 MB, from the heap, which is given back to the OS once `trim_above`, 64 MB,
    of it are free at its top). Left adaptive they follow whatever the process freed last: a short
    prompt's thousands of temporaries (35 MB at 16 tokens, 50 at 32) went back to the OS at the end
    of each call and were faulted in again, a 4 kB page at a time, by the next (5,800 and 12,500
    faults per call, 2-5 us each on this VM: a fifth to a third of the CPU time). Bounded, unlike
    `keep_freed_memory` (no mmap, no trimming): long prompts' GB-sized blocks are still mapped apart
    and given back when freed."""
    if _glibc is not None:
        _glibc.mallopt(_M_MMAP_THRESHOLD, mmap_above)
        _glibc.mallopt(_M_TRIM_THRESHOLD, trim_above)


def release_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`). A backward pass's
    temporaries come from the heap once glibc's adaptive mmap threshold has risen past their size,
    and the holes they leave between live blocks stay resident: 40 to 80 MB of the peak on the
    64-token prompt of `scripts/bench_attribution.py --long`."""
    if _glibc is not None:
        _glibc.malloc_trim(0)
