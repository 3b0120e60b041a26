"""Dirty-page consumers: any number of them per memslot, each independent of the others and
of KVM's own dirty log.

KVM's log (:mod:`vmm.dirtylog`: GET/CLEAR, manual protect, dirty rings) has one consumer, the
VMM that harvests it. Other parts of a VMM want the written pages too (a live migration, a
heatmap, a replication of shared memory across hosts), each at its own pace. Each gets a
:class:`DirtyTracker` (:meth:`vmm.vm.Vm.track_dirty`): its own accumulating bitmap of the
slot's pages, harvested (get and clear) with :meth:`DirtyTracker.harvest` in vfio's
IOVA-bitmap format (:mod:`vmm.iova_bitmap`) without touching the KVM-visible log, the
vCPUs' rings or the other trackers.

How every write is seen: the same write-protection trick KVM's log uses, shared by all.

* A tracked slot is mapped as a logged one is: 4K leaves, read faults map read-only, the
  first write to a block splits it. Every write into it either hits a page that is writable
  in stage 2 (and then every tracker already has it marked) or faults; the fault marks every
  tracker before it maps the page writable (:meth:`vmm.dirtylog.DirtyLog.mark_fault`).
  Writes that do not go through stage 2 (a device's :meth:`vmm.vm.Vm.write_guest`) are
  marked by the dirty sink like any other. Nested (L2) guests fault their L1 page on a
  vCPU, so their writes take the same fault.
* A new tracker write-protects the whole slot; a harvest write-protects the harvested pages
  only, in bulk (the next write to each faults and is marked again). A page already marked
  costs nothing more on the per-access path: it stays writable, a TLB hit.
* KVM's semantics stay exact. A page that KVM sees as writable (already logged) but that a
  tracker has write-protected is remembered in :attr:`SlotTracking.wp_only`: its next write
  fault marks the trackers and not KVM's log (no second ring entry, no ring-full exit that
  KVM alone would not take). Any protection of KVM's own (logging starts, GET, CLEAR, a ring
  reset) or an unmap forgets it: KVM expects that page's next write.

A tracker lives until it is closed or its memslot is deleted; it survives a memslot move (its
bits are slot-relative). Harvesting a closed tracker raises :class:`DirtyLogError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from .dirty import bitmap_from_pages
from .errors import DirtyLogError
from .iova_bitmap import IovaBitmap
from .pte import PAGE_SIZE

if TYPE_CHECKING:
    from .memslot import Memslot

__all__ = [
    "DirtyTracker",
    "SlotTracking",
    "TrackerProtector",
    "start_tracking",
    "stop_tracking",
]

U64 = npt.NDArray[np.uint64]
Offsets = npt.NDArray[np.int64]


class TrackerProtector(Protocol):
    """What re-arms write protection for the trackers (the MMU)."""

    def protect_for_trackers(self, slot: Memslot, words: U64 | None) -> None:
        """Write-protect the pages of ``slot`` set in ``words`` (None: all of them) wherever
        they are mapped, remembering those KVM saw as writable (:attr:`SlotTracking.wp_only`)."""


class SlotTracking:
    """One memslot's trackers, and the pages write-protected for them only.

    Kept on the slot once it has had a tracker (:attr:`vmm.memslot.Memslot.tracking`), even
    after the last one closed: until they fault or KVM protects them, the pages in
    :attr:`wp_only` are still read-only because of a tracker, and KVM must not log their
    next write twice."""

    __slots__ = ("trackers", "wp_only")

    def __init__(self, npages: int) -> None:
        self.trackers: list[DirtyTracker] = []
        #: page -> a tracker protected it while it was writable, and KVM has not protected
        #: (nor anything unmapped) it since: KVM's log has seen its write already, so its
        #: next write fault is not KVM's to log (on a page that is writable again, after
        #: such a fault, the flag is moot: only a protection makes it count again, and
        #: every protection sets or clears it)
        self.wp_only = np.zeros(npages, dtype=np.bool_)

    def mark(self, offsets: Offsets | int, npages: int) -> None:
        """Pages ``offsets`` (slot-relative) were written: mark them in every tracker."""
        trackers = self.trackers
        if not trackers:
            return
        if isinstance(offsets, int):
            word, bit = offsets >> 6, np.uint64(1 << (offsets & 63))
            for tracker in trackers:
                tracker.words[word] |= bit
                tracker.pending = True
            return
        if offsets.shape[0] == 0:
            return
        bits = bitmap_from_pages(offsets, npages)
        for tracker in trackers:
            tracker.words |= bits
            tracker.pending = True

    def kvm_faults(self, offsets: Offsets) -> npt.NDArray[np.bool_]:
        """Which of the write faults on ``offsets`` KVM's own log would take too."""
        return ~self.wp_only[offsets]

    def forget(self, first: int, count: int, pages: npt.NDArray[np.bool_] | None) -> None:
        """KVM protected (or an unmap removed) pages ``[first, first + count)`` (those set in
        ``pages``): their next write is KVM's to log again."""
        if pages is None:
            self.wp_only[first : first + count] = False
        else:
            self.wp_only[first : first + count] &= ~pages[:count]


class DirtyTracker:
    """One consumer's view of a memslot's written pages (see the module docstring).

    :attr:`pending` says, at the cost of an attribute read, whether any page was marked
    since the last harvest: a caller with a hot path (a doorbell) checks it first."""

    __slots__ = ("_protector", "closed", "pending", "slot", "words")

    def __init__(self, slot: Memslot, protector: TrackerProtector) -> None:
        self.slot = slot
        self._protector = protector
        #: the accumulating bitmap, KVM's layout (page k: word k // 64, bit k % 64)
        self.words: U64 = np.zeros(slot.bitmap_words(), dtype=np.uint64)
        #: some page was marked since the last harvest
        self.pending = False
        self.closed = False

    def harvest_words(self) -> U64:
        """The pages written since the last harvest (or since the tracker was made), as
        bitmap words (page k of the slot: word k // 64, bit k % 64), and clear them: their
        next write is seen again. Only these pages are write-protected again."""
        if self.closed:
            raise DirtyLogError("this dirty tracker is closed (or its memslot was deleted)")
        words = self.words
        if not self.pending:
            return np.zeros_like(words)
        self.words = np.zeros_like(words)
        self.pending = False
        self._protector.protect_for_trackers(self.slot, words)
        return words

    def harvest(self) -> IovaBitmap:
        """:meth:`harvest_words` in vfio's IOVA-bitmap format over the slot's GPA range."""
        words = self.harvest_words()
        return IovaBitmap(self.slot.gpa, self.slot.size, PAGE_SIZE, words)

    def close(self) -> None:
        """Stop tracking (idempotent). Pages it protected stay protected until written."""
        if self.closed:
            return
        self.closed = True
        self.pending = False
        tracking = self.slot.tracking
        if tracking is not None and self in tracking.trackers:
            tracking.trackers.remove(self)

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("pending" if self.pending else "clean")
        return f"DirtyTracker(slot={self.slot.slot}, {state})"


def start_tracking(slot: Memslot, protector: TrackerProtector) -> DirtyTracker:
    """A new tracker of ``slot``: from now on every write to the slot is marked in it (the
    whole slot is write-protected for it first)."""
    if slot.tracking is None:
        slot.tracking = SlotTracking(slot.npages)
    tracker = DirtyTracker(slot, protector)
    slot.tracking.trackers.append(tracker)
    protector.protect_for_trackers(slot, None)
    return tracker


def stop_tracking(slot: Memslot) -> None:
    """``slot`` is deleted: close its trackers and forget what they protected."""
    tracking = slot.tracking
    if tracking is None:
        return
    for tracker in list(tracking.trackers):
        tracker.close()
    slot.tracking = None
