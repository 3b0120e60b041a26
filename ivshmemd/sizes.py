"""The daemon's shared-memory size rule: ``-l`` rounded up to a power of two, as QEMU's
ivshmem-server does, and to our 4 KiB minimum (the smallest BAR2 a QEMU ivshmem device
accepts). Parsing a size is the one grammar's job (:mod:`vmm.sizes`, a superset of QEMU's
``qemu_strtosz``): this module only rounds.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIN_SHM_SIZE", "round_shm_size"]

#: The smallest shared memory the daemon serves (a QEMU ivshmem BAR2 is at least 4 KiB).
MIN_SHM_SIZE: Final = 4096


def round_shm_size(size: int, minimum: int = MIN_SHM_SIZE) -> int:
    """Round up to a power of two, and to ``minimum``."""
    size = max(size, minimum, 1)
    return 1 << (size - 1).bit_length()
