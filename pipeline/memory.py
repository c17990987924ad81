"""Process memory: make freed buffers leave the resident set at once.

glibc serves allocations above its mmap threshold with their own memory maps, which go back
to the OS when freed, and smaller ones from its heaps, which keep freed pages resident. The
threshold is dynamic: every time a mapped buffer is freed it rises to that buffer's size (up
to 32 MiB), so after the first large temporaries of a run (a forward pass, one row batch's
gradients) every buffer of up to that size comes from the heaps, fragments them, and the
pages it used stay counted in the process's RSS. Attribution allocates and frees buffers of
a few MiB thousands of times, so its peak RSS then depends on allocation order: on the
GPT-2-small benchmark shape (16 tokens, 12 x 16k PLTs) it measured 1297-1382 MiB over runs,
and 1132-1137 MiB with the threshold fixed at 4 MiB, with no measurable change in time.

``release_freed_buffers()`` fixes the threshold (it also stops the dynamic adjustment). It
is called by the attribution entry points (CLI, pipeline stages, study workers); library
users may call it themselves. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

DEFAULT_MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def release_freed_buffers(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more (default 4 MiB) from their own memory
    maps, returned to the OS when freed. Returns whether the setting took effect (False off
    glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
