"""Dirty tracking structures: KVM's per-vCPU dirty ring and dirty-bitmap helpers.

The ring follows Documentation/virt/kvm/api.rst (KVM_CAP_DIRTY_LOG_RING): the kernel pushes
``kvm_dirty_gfn`` entries (flags, slot, offset) with the DIRTY flag; userspace harvests them
strictly in order from its fetch index, flipping each to RESET ("collected"); then
KVM_RESET_DIRTY_RINGS re-protects the collected pages and frees their slots, stopping at the
first entry not collected yet. Until that reset, collected pages stay writable, so a write
after the harvest is not reported again: reset before re-reading a page's content. When the
ring holds ``entries`` unreset entries the vCPU exits with KVM_EXIT_DIRTY_RING_FULL.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import DirtyLogError, ModelBug

__all__ = [
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_RESET",
    "DirtyRing",
    "bitmap_from_pages",
    "bitmap_to_bools",
]

KVM_DIRTY_GFN_F_DIRTY: Final = 1 << 0
KVM_DIRTY_GFN_F_RESET: Final = 1 << 1
MIN_RING_ENTRIES: Final = 16


def bitmap_from_pages(pages: npt.NDArray[np.int64], npages: int) -> npt.NDArray[np.uint64]:
    """KVM bit layout (page k: word k//64, bit k%64) with the given pages set."""
    nwords = (npages + 63) // 64
    bools = np.zeros(nwords * 64, dtype=np.bool_)
    bools[pages] = True
    return np.packbits(bools, bitorder="little").view(np.uint64)


def bitmap_to_bools(words: npt.NDArray[np.uint64], npages: int) -> npt.NDArray[np.bool_]:
    """One bool per page, pages ``[0, npages)``."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=npages)
    return bits.view(np.bool_)


class DirtyRing:
    """One vCPU's dirty ring (an array of kvm_dirty_gfn: flags, slot, offset)."""

    def __init__(self, entries: int) -> None:
        if entries < MIN_RING_ENTRIES or entries & (entries - 1):
            raise DirtyLogError(
                f"dirty ring size must be a power of two >= {MIN_RING_ENTRIES}, got {entries}"
            )
        self.entries = entries
        self.flags = np.zeros(entries, dtype=np.uint32)
        self.slot = np.zeros(entries, dtype=np.uint32)
        self.offset = np.zeros(entries, dtype=np.uint64)
        self.dirty_index = 0  # next entry the kernel writes
        self.fetch_index = 0  # next entry userspace harvests
        self.reset_index = 0  # next entry a reset frees

    @property
    def used(self) -> int:
        return self.dirty_index - self.reset_index

    @property
    def room(self) -> int:
        return self.entries - self.used

    @property
    def full(self) -> bool:
        return self.room == 0

    def push_many(self, slot: int, offsets: npt.NDArray[np.int64]) -> None:
        n = int(offsets.shape[0])
        if n > self.room:
            raise ModelBug(f"dirty ring push of {n} entries with room for {self.room}")
        pos = (self.dirty_index + np.arange(n)) & (self.entries - 1)
        self.slot[pos] = slot
        self.offset[pos] = offsets
        self.flags[pos] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index += n

    def harvest(
        self, max_entries: int | None = None
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
        """Collect DIRTY entries in ring order from the fetch index: ``(slots, offsets)``.

        Each collected entry is flagged RESET; the walk stops at the first entry the kernel
        has not published.
        """
        avail = self.dirty_index - self.fetch_index
        n = avail if max_entries is None else min(avail, max_entries)
        pos = (self.fetch_index + np.arange(n)) & (self.entries - 1)
        ok = self.flags[pos] == KVM_DIRTY_GFN_F_DIRTY
        if not ok.all():
            n = int(np.argmin(ok))
            pos = pos[:n]
        self.flags[pos] = KVM_DIRTY_GFN_F_RESET
        self.fetch_index += n
        return self.slot[pos].copy(), self.offset[pos].copy()

    def collect_for_reset(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
        """The kernel side of KVM_RESET_DIRTY_RINGS: take the collected entries in order."""
        n = self.dirty_index - self.reset_index
        pos = (self.reset_index + np.arange(n)) & (self.entries - 1)
        ok = self.flags[pos] == KVM_DIRTY_GFN_F_RESET
        if not ok.all():
            n = int(np.argmin(ok))
            pos = pos[:n]
        self.flags[pos] = 0
        self.reset_index += n
        return self.slot[pos].copy(), self.offset[pos].copy()
