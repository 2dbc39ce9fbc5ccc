"""Returning freed heap memory to the operating system between iterations.

A CPU training process allocates and frees the same few GB every step in shapes
that change with the batch (packed rows, reply lengths). glibc keeps freed
chunks in its arenas; fragmented, they cannot serve the next step's larger
blocks, so resident memory creeps up over a long run (measured: +300 MB over
30 online iterations of the TRL-matched run) although live tensors do not grow.
``malloc_trim(0)`` hands the free pages back. It costs milliseconds, so the
loops call it once per iteration or step, not per allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=None)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None  # glibc only (not musl, macOS)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the OS; False where that is not available."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
