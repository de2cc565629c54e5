"""Keep freed memory in the process (glibc), so CPU steps stop paying page faults.

glibc's ``malloc`` serves a block above its mmap threshold (128 KiB at first, raised as
large blocks are freed, to at most 32 MiB) with a fresh ``mmap``, and gives heap memory back
to the OS once more than the trim threshold lies free at its top. A training step allocates
and frees the same large activations every step, so every step maps them afresh and the
kernel zeroes every page on first touch: 294,000 page faults per VQA train step at paper
sizes (B = 32), a quarter of the step on a 2-core VM (README, Performance). With every block
from the heap, nothing trimmed and one arena, the freed activations are reused: the faults
go to ~0. The price is memory: the heap keeps what the step needed, in fragments (peak
resident memory of the bench's steps -3 % to +11 %; of a toy step with one large activation
2.2x). ``KEEP_FREED_MEMORY=false`` leaves the system's default. PyTorch's CPU tuning guide
recommends an allocator (jemalloc, tcmalloc) for the same reason; this needs none installed.

Other C libraries (musl, macOS, Windows) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters (malloc.h); ``mallopt`` returns 1 on success.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = ((M_MMAP_THRESHOLD, 1 << 30),       # blocks up to 1 GiB come from the heap
            (M_TRIM_THRESHOLD, 2 ** 31 - 1),   # freed heap memory stays for the next step
            (M_ARENA_MAX, 1))                  # one heap: threads reuse the same memory


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory; returns what was done, in words."""
    if platform.libc_ver()[0] != "glibc":
        return "system allocator (not glibc: unchanged)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    except (OSError, AttributeError) as e:
        return f"system allocator (glibc's mallopt not reachable: {e})"
    if not done:
        return "system allocator (glibc refused the settings)"
    return "glibc malloc keeps freed memory (no mmap below 1 GiB, no trim, one arena)"
