"""Keep freed heap blocks in the federation process (glibc's ``mallopt``), for replication.

Every diff allocates blocks of up to a MiB (the snapshot of the pages, the frame's bytes,
msgpack's and zmq's copies) and frees them a moment later. glibc hands blocks that large
back to the kernel (``mmap``/``munmap``, or by trimming the heap's top), so the next diff
touches fresh pages and takes a page fault for every 4 KiB of them: measured, that was 40%
of the cost of a 1 MiB diff. Raising the mmap threshold and the trim threshold keeps them
in the heap for reuse, at the price of keeping up to :data:`TRIM_THRESHOLD` of freed memory.

Anything but glibc (musl has no ``mallopt``) is left as it is.
"""

from __future__ import annotations

import ctypes
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_blocks"]

#: blocks below this come from the heap (glibc's dynamic threshold stops at 32 MiB too)
MMAP_THRESHOLD: Final = 32 << 20
#: free memory kept at the heap's top before it is given back to the kernel
TRIM_THRESHOLD: Final = 128 << 20
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def keep_freed_blocks() -> bool:
    """Tune this process's allocator (see the module docstring); False where it is not
    glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
