"""Memslots: guest-physical ranges backed by host memory, as KVM_SET_USER_MEMORY_REGION sets.

A :class:`Memslot` holds its GPA range, flags, backing (plus offset into it), its dirty bitmap
while ``KVM_MEM_LOG_DIRTY_PAGES`` is on (a numpy ``uint64`` array in KVM's bit layout: page
``k`` is word ``k // 64`` bit ``k % 64``), its other dirty-page consumers
(:mod:`vmm.dirtytrack`) and the nested rmap of its pages.
:class:`MemslotTable` finds slots by id and by GPA (``bisect`` for one address,
``searchsorted`` for many).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from .memory import Backing
from .pte import PAGE_SHIFT

if TYPE_CHECKING:
    from .dirtytrack import SlotTracking

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "Memslot",
    "MemslotTable",
]

KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
VALID_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


@dataclass(eq=False)
class Memslot:
    """One memslot."""

    slot: int
    flags: int
    gpa: int
    size: int
    backing: Backing
    backing_offset: int = 0
    dirty_bitmap: npt.NDArray[np.uint64] | None = None
    rmap: npt.NDArray[np.uint64] | None = None
    rmap_lists: dict[int, list[int]] = field(default_factory=dict)
    #: the dirty trackers of :mod:`vmm.dirtytrack` (None: never tracked)
    tracking: SlotTracking | None = None

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    @property
    def hpa(self) -> int:
        """HPA of the slot's first byte."""
        return self.backing.hpa + self.backing_offset

    @property
    def logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def write_tracked(self) -> bool:
        """Someone must see every write: KVM's log, or a tracker. The slot is then mapped
        as KVM maps a logged one (4K leaves, read-only until written)."""
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES) or (
            self.tracking is not None and bool(self.tracking.trackers)
        )

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    def hpa_of(self, gpa: int) -> int:
        return self.hpa + (gpa - self.gpa)

    def bitmap_words(self) -> int:
        return (self.npages + 63) // 64


class MemslotTable:
    """Slots by id and by GPA."""

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        self._starts: list[int] = []
        self._slots: list[Memslot] = []
        self._np_starts = np.empty(0, dtype=np.uint64)
        self._np_ends = np.empty(0, dtype=np.uint64)

    def __iter__(self) -> Iterator[Memslot]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def _reindex(self) -> None:
        self._np_starts = np.array(self._starts, dtype=np.uint64)
        self._np_ends = np.array([s.end for s in self._slots], dtype=np.uint64)

    def insert(self, slot: Memslot) -> None:
        i = bisect.bisect_left(self._starts, slot.gpa)
        self._starts.insert(i, slot.gpa)
        self._slots.insert(i, slot)
        self.by_id[slot.slot] = slot
        self._reindex()

    def remove(self, slot: Memslot) -> None:
        i = self._slots.index(slot)
        del self._starts[i]
        del self._slots[i]
        del self.by_id[slot.slot]
        self._reindex()

    def overlapping(self, gpa: int, size: int, ignore: Memslot | None = None) -> Memslot | None:
        for slot in self._slots:
            if slot is not ignore and slot.gpa < gpa + size and gpa < slot.end:
                return slot
        return None

    def find(self, gpa: int) -> Memslot | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            slot = self._slots[i]
            if gpa < slot.end:
                return slot
        return None

    def find_many(self, gpas: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Index into :meth:`ordered` of the slot holding each GPA, or -1."""
        if not self._slots:
            return np.full(gpas.shape[0], -1, dtype=np.int64)
        if gpas.shape[0]:
            lo, hi = int(gpas.min()), int(gpas.max())
            slot = self.find(lo)
            if slot is not None and hi < slot.end:
                return np.full(gpas.shape[0], self._slots.index(slot), dtype=np.int64)
        idx = np.searchsorted(self._np_starts, gpas, side="right").astype(np.int64) - 1
        safe = np.maximum(idx, 0)
        inside = (idx >= 0) & (gpas < self._np_ends[safe])
        return np.where(inside, idx, -1)

    def ordered(self) -> list[Memslot]:
        return self._slots
