"""Dirty tracking structures: KVM's per-vCPU dirty ring and dirty-bitmap helpers.

The ring follows Documentation/virt/kvm/api.rst (KVM_CAP_DIRTY_LOG_RING): the kernel pushes
``kvm_dirty_gfn`` entries (flags, slot, offset) with the DIRTY flag; userspace harvests them
strictly in order from its fetch index, flipping each to RESET ("collected"); then
KVM_RESET_DIRTY_RINGS re-protects the collected pages and frees their slots, stopping at the
first entry not collected yet. Until that reset, collected pages stay writable, so a write
after the harvest is not reported again: reset before re-reading a page's content.

Sizes are KVM's (virt/kvm/dirty_ring.c): KVM_CAP_DIRTY_LOG_RING takes the ring's size in
*bytes*, a power of two of at least a page, 16 bytes per entry (:func:`ring_entries`). The
vCPU exits with KVM_EXIT_DIRTY_RING_FULL at the *soft* limit, once ``entries - 64`` entries
are unreset: the 64 reserved entries absorb what is pushed before the exit is taken.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import DirtyLogError, ModelBug

__all__ = [
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_RESET",
    "KVM_DIRTY_GFN_SIZE",
    "KVM_DIRTY_RING_MAX_ENTRIES",
    "KVM_DIRTY_RING_RSVD_ENTRIES",
    "DirtyRing",
    "bitmap_from_pages",
    "bitmap_to_bools",
    "few_pages",
    "ring_entries",
]

KVM_DIRTY_GFN_F_DIRTY: Final = 1 << 0
KVM_DIRTY_GFN_F_RESET: Final = 1 << 1
#: sizeof(struct kvm_dirty_gfn): flags u32, slot u32, offset u64
KVM_DIRTY_GFN_SIZE: Final = 16
#: Entries kept free for what is pushed before a vCPU takes its ring-full exit.
KVM_DIRTY_RING_RSVD_ENTRIES: Final = 64
KVM_DIRTY_RING_MAX_ENTRIES: Final = 65536
_RING_PAGE: Final = 4096


def ring_entries(size: int) -> int:
    """Entries of a ring of ``size`` bytes, checked as KVM_CAP_DIRTY_LOG_RING checks it
    (kvm_vm_ioctl_enable_dirty_log_ring): a power of two, at least a page and the reserved
    entries, at most 65536 entries."""
    if not isinstance(size, int) or size <= 0 or size & (size - 1):
        raise DirtyLogError(f"dirty ring size must be a power of two in bytes, got {size!r}")
    if size < _RING_PAGE or size < KVM_DIRTY_RING_RSVD_ENTRIES * KVM_DIRTY_GFN_SIZE:
        raise DirtyLogError(
            f"dirty ring size {size} is below a page ({_RING_PAGE} bytes = "
            f"{_RING_PAGE // KVM_DIRTY_GFN_SIZE} entries of {KVM_DIRTY_GFN_SIZE} bytes)"
        )
    if size > KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE:
        raise DirtyLogError(
            f"dirty ring size {size} is above {KVM_DIRTY_RING_MAX_ENTRIES} entries (-E2BIG)"
        )
    return size // KVM_DIRTY_GFN_SIZE


def bitmap_from_pages(pages: npt.NDArray[np.int64], npages: int) -> npt.NDArray[np.uint64]:
    """KVM bit layout (page k: word k//64, bit k%64) with the given pages set."""
    nwords = (npages + 63) // 64
    bools = np.zeros(nwords * 64, dtype=np.bool_)
    bools[pages] = True
    return np.packbits(bools, bitorder="little").view(np.uint64)


def few_pages(words: npt.NDArray[np.uint64], limit: int) -> list[int] | None:
    """The pages set in ``words`` (KVM bit layout), ascending, if there are at most
    ``limit`` of them; None if there are more. For a sparse bitmap (a harvest after a few
    writes) this is one scan of the words and a few integer operations per page, where
    unpacking would touch every bit."""
    nonzero = words.nonzero()[0]
    if nonzero.shape[0] > limit:
        return None
    pages: list[int] = []
    for index, word in zip(nonzero.tolist(), words[nonzero].tolist(), strict=True):
        base = index << 6
        while word:
            low = word & -word
            pages.append(base + low.bit_length() - 1)
            word ^= low
        if len(pages) > limit:
            return None
    return pages


def bitmap_to_bools(words: npt.NDArray[np.uint64], npages: int) -> npt.NDArray[np.bool_]:
    """One bool per page, pages ``[0, npages)``."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=npages)
    return bits.view(np.bool_)


class DirtyRing:
    """One vCPU's dirty ring (an array of kvm_dirty_gfn: flags, slot, offset)."""

    def __init__(self, entries: int) -> None:
        ring_entries(entries * KVM_DIRTY_GFN_SIZE)  # KVM's size rules
        self.entries = entries
        #: unreset entries at which the vCPU exits (kvm_dirty_ring_soft_full)
        self.soft_limit = entries - KVM_DIRTY_RING_RSVD_ENTRIES
        self.flags = np.zeros(entries, dtype=np.uint32)
        self.slot = np.zeros(entries, dtype=np.uint32)
        self.offset = np.zeros(entries, dtype=np.uint64)
        self.dirty_index = 0  # next entry the kernel writes
        self.fetch_index = 0  # next entry userspace harvests
        self.reset_index = 0  # next entry a reset frees

    @property
    def used(self) -> int:
        """Entries pushed and not reset yet."""
        return self.dirty_index - self.reset_index

    @property
    def room(self) -> int:
        """Pages the vCPU can still dirty before its ring-full exit."""
        return max(0, self.soft_limit - self.used)

    @property
    def full(self) -> bool:
        """Soft-full: the vCPU exits with KVM_EXIT_DIRTY_RING_FULL before running on."""
        return self.used >= self.soft_limit

    def push(self, slot: int, offset: int) -> None:
        """Publish one dirty page (the scalar form of :meth:`push_many`)."""
        if self.used >= self.entries:
            raise ModelBug("dirty ring push into a full ring")
        pos = self.dirty_index & (self.entries - 1)
        self.slot[pos] = slot
        self.offset[pos] = offset
        self.flags[pos] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index += 1

    def push_many(self, slot: int, offsets: npt.NDArray[np.int64]) -> None:
        """Publish dirty pages in order (kvm_dirty_ring_push per page)."""
        n = int(offsets.shape[0])
        if n > self.entries - self.used:
            raise ModelBug(f"dirty ring push of {n} entries into {self.entries - self.used} free")
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
