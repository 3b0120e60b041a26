"""The one dirty sink: every write to guest memory is logged here, whatever its path.

:class:`DirtyLog` is a VM's dirty tracking as KVM's generic code does it (virt/kvm/kvm_main.c,
virt/kvm/dirty_ring.c). It knows the mode (a dirty bitmap per logged memslot, with or
without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and INITIALLY_SET; a dirty ring per vCPU, with or
without KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) and owns every decision that depends on it:

* **marking** (:meth:`DirtyLog.mark`, ``mark_page_dirty_in_slot``): the fault handler calls
  :meth:`DirtyLog.mark_fault` for a write fault on a logged or tracked slot (a vCPU's single
  or bulk access, and an L2 guest's access, which faults its L1 page on the vCPU that runs
  it), and :meth:`vmm.vm.Vm.write_guest` calls :meth:`DirtyLog.mark` for a device's write.
  With a ring and a vCPU the page goes to that vCPU's ring, otherwise to the slot's bitmap;
  a write in ring mode with neither is refused, never dropped. The same calls mark the
  slot's other consumers, its dirty trackers (:mod:`vmm.dirtytrack`), which KVM's log never
  sees: a fault that only a tracker's protection caused is not KVM's to log;
* **room** (:meth:`DirtyLog.room`): how many pages a vCPU can dirty before its ring-full exit;
* **memslot changes** (:meth:`DirtyLog.logging_changed`): a bitmap when logging starts (all
  set under INITIALLY_SET), none when it stops; a moved slot keeps its bitmap (KVM reuses it
  when logging is on in both the old and the new slot); starting to log write-protects the
  slot unless INITIALLY_SET defers that to the first CLEAR;
* **harvesting**: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS, and the
  exports in vfio's IOVA-bitmap format.

Every re-protection goes through one :class:`Protector` call, which the MMU implements by
write-protecting the stage-2 leaves *and*, through the nested rmap, every shadow PTE that
maps the same pages: a page is writable anywhere only while it is logged as dirty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .dirty import KVM_DIRTY_GFN_SIZE, DirtyRing, bitmap_from_pages, bitmap_to_bools, ring_entries
from .errors import DirtyLogError
from .iova_bitmap import IovaBitmap
from .memslot import Memslot
from .pte import PAGE_SIZE

__all__ = [
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "DirtyLog",
    "DirtyWriter",
    "Protector",
    "protect_words",
]

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1
_MANUAL_FLAGS: Final = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
_ALL_ONES: Final = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
U64 = npt.NDArray[np.uint64]
Offsets = npt.NDArray[np.int64]


class DirtyWriter(Protocol):
    """Who writes: a vCPU (its id, for the ring-full exit, and its ring)."""

    id: int
    dirty_ring: DirtyRing | None


class Protector(Protocol):
    """What re-protects pages (the MMU): the stage-2 leaves and the shadow PTEs."""

    def write_protect(
        self, slot: Memslot, first: int, count: int, pages: npt.NDArray[np.bool_] | None
    ) -> None:
        """Write-protect pages ``[first, first + count)`` of ``slot`` (only those set in
        ``pages`` when given) wherever they are mapped, and flush."""

    def start_logging(self, slot: Memslot) -> None:
        """Logging starts on ``slot``: write-protect all of it (and split, if eager)."""


def protect_words(
    protect: Callable[[Memslot, int, int, npt.NDArray[np.bool_] | None], None],
    slot: Memslot,
    words: U64,
    first_page: int,
    num_pages: int,
) -> None:
    """Call ``protect(slot, first, count, pages)`` once for the pages set in ``words`` (bit
    i = page ``first_page + i``), from the first to the last word holding any (``pages``
    None when every page of that span is set); not at all if none is."""
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return
    lo_w, hi_w = int(nz[0]), int(nz[-1]) + 1
    first = first_page + lo_w * 64
    count = min((hi_w - lo_w) * 64, first_page + num_pages - first)
    sub = words[lo_w:hi_w]
    whole = count % 64 == 0 and bool(np.all(sub == _ALL_ONES))
    protect(slot, first, count, None if whole else bitmap_to_bools(sub, count))


class DirtyLog:
    """A VM's dirty tracking: its mode, the per-slot bitmaps, and the vCPUs' rings."""

    def __init__(self, protector: Protector) -> None:
        self.protector = protector
        self.manual_protect = False
        self.initially_set = False
        #: KVM's dirty_ring_size: bytes per vCPU ring (0: no ring)
        self.ring_size = 0
        self.ring_with_bitmap = False

    # ------------------------------------------------------------------ mode
    @property
    def ring_entries(self) -> int:
        return self.ring_size // KVM_DIRTY_GFN_SIZE

    @property
    def uses_bitmap(self) -> bool:
        """KVM's ``kvm_use_dirty_bitmap``: no ring, or a ring with a bitmap."""
        return not self.ring_size or self.ring_with_bitmap

    def enable_manual_protect(self, args: int) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with ``args[0]`` = ENABLE [| INITIALLY_SET]."""
        if args & ~_MANUAL_FLAGS:
            raise DirtyLogError(
                f"unknown MANUAL_DIRTY_LOG_PROTECT2 flags {args & ~_MANUAL_FLAGS:#x}"
            )
        if args and not args & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            raise DirtyLogError("INITIALLY_SET needs MANUAL_PROTECT_ENABLE")
        self.manual_protect = bool(args & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.initially_set = bool(args & KVM_DIRTY_LOG_INITIALLY_SET)

    def enable_ring(self, size: int, *, vcpus: int, logging: bool) -> None:
        """KVM_CAP_DIRTY_LOG_RING with ``size`` in bytes (before any vCPU exists, once).

        The model also wants it before any slot logs (KVM would leave those slots' bitmaps
        half used: vCPU writes to the rings, others to the bitmaps)."""
        ring_entries(size)
        if self.ring_size:
            raise DirtyLogError("the dirty ring is already enabled (KVM allows it once)")
        if vcpus:
            raise DirtyLogError("the dirty ring must be enabled before vCPUs are created")
        if logging:
            raise DirtyLogError("the dirty ring must be enabled before dirty logging starts")
        self.ring_size = size

    def enable_ring_with_bitmap(self, *, memslots: int) -> None:
        """KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: writes without a vCPU go to a bitmap (which
        GET/CLEAR harvest); needs the ring, and no memslot yet."""
        if not self.ring_size:
            raise DirtyLogError("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP needs the dirty ring first")
        if memslots:
            raise DirtyLogError("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP needs a VM with no memslots")
        self.ring_with_bitmap = True

    def new_ring(self) -> DirtyRing | None:
        """The ring of a new vCPU (None without the capability)."""
        return DirtyRing(self.ring_entries) if self.ring_size else None

    # ------------------------------------------------------------------ memslots
    def _fresh_bitmap(self, slot: Memslot) -> U64:
        words = np.zeros(slot.bitmap_words(), dtype=np.uint64)
        if self.manual_protect and self.initially_set:
            full, tail = divmod(slot.npages, 64)
            words[:full] = _ALL_ONES
            if tail:
                words[full] = np.uint64((1 << tail) - 1)
        return words

    def logging_changed(self, slot: Memslot, was_logging: bool) -> None:
        """``slot``'s LOG_DIRTY_PAGES flag changed (kvm_prepare/commit_memory_region)."""
        if slot.logging and not was_logging:
            if self.uses_bitmap:
                slot.dirty_bitmap = self._fresh_bitmap(slot)
            if not (self.manual_protect and self.initially_set):
                self.protector.start_logging(slot)
        elif was_logging and not slot.logging:
            slot.dirty_bitmap = None

    # ------------------------------------------------------------------ marking
    def room(self, writer: DirtyWriter | None) -> int | None:
        """Pages ``writer`` can dirty before its ring-full exit (None: no limit)."""
        if writer is None or writer.dirty_ring is None:
            return None
        return writer.dirty_ring.room

    def mark(self, slot: Memslot, offsets: Offsets | int, writer: DirtyWriter | None) -> None:
        """Log pages ``offsets`` (slot-relative) of ``slot`` as written by ``writer``, for
        KVM's log (if the slot logs) and for every tracker of the slot
        (:mod:`vmm.dirtytrack`): a write that does not fault (a device's, through the host
        mapping), or a fault KVM's log takes.

        Called before the write is allowed (a fault maps the page only after this), so a
        refusal leaves nothing unlogged."""
        if slot.logging:
            self._mark_kvm(slot, offsets, writer)
        tracking = slot.tracking
        if tracking is not None:
            tracking.mark(offsets, slot.npages)

    def mark_fault(self, slot: Memslot, offsets: Offsets | int, writer: DirtyWriter | None) -> None:
        """A write fault on pages ``offsets`` of ``slot`` is about to map them writable: mark
        them for the trackers, and for KVM's log unless only a tracker had them protected
        (KVM saw them writable: without trackers this write would not have faulted)."""
        tracking = slot.tracking
        if tracking is None:
            self.mark(slot, offsets, writer)
            return
        if slot.logging:
            if isinstance(offsets, int):
                if not tracking.wp_only[offsets]:
                    self._mark_kvm(slot, offsets, writer)
            else:
                kvm = offsets[tracking.kvm_faults(offsets)]
                if kvm.shape[0]:
                    self._mark_kvm(slot, kvm, writer)
        tracking.mark(offsets, slot.npages)

    def kvm_faults(self, slot: Memslot, offsets: Offsets) -> npt.NDArray[np.bool_]:
        """Which write faults on pages ``offsets`` of ``slot`` KVM's log takes (what counts
        against a vCPU's ring): all of them on a logged slot, but for the pages only a
        tracker protected; none elsewhere."""
        if not slot.logging:
            return np.zeros(offsets.shape[0], dtype=np.bool_)
        if slot.tracking is None:
            return np.ones(offsets.shape[0], dtype=np.bool_)
        return slot.tracking.kvm_faults(offsets)

    def kvm_fault(self, slot: Memslot, offset: int) -> bool:
        """:meth:`kvm_faults` for one page."""
        return slot.logging and (slot.tracking is None or not slot.tracking.wp_only[offset])

    def _mark_kvm(self, slot: Memslot, offsets: Offsets | int, writer: DirtyWriter | None) -> None:
        """``mark_page_dirty_in_slot``: the writer's ring, or the slot's bitmap."""
        ring = writer.dirty_ring if writer is not None else None
        if ring is not None:
            if isinstance(offsets, int):
                ring.push(slot.slot, offsets)
            else:
                ring.push_many(slot.slot, offsets)
            return
        bitmap = slot.dirty_bitmap
        if bitmap is None:
            raise DirtyLogError(
                f"a write to logged slot {slot.slot} without a vCPU: in dirty-ring mode it "
                "needs KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (or run it on a vCPU)"
            )
        if isinstance(offsets, int):
            bitmap[offsets >> 6] |= np.uint64(1 << (offsets & 63))
        elif offsets.shape[0] == 1:
            off = int(offsets[0])
            bitmap[off >> 6] |= np.uint64(1 << (off & 63))
        else:
            bitmap |= bitmap_from_pages(offsets, slot.npages)

    # ------------------------------------------------------------------ harvesting
    def _bitmap(self, slot: Memslot) -> U64:
        if not self.uses_bitmap:
            raise DirtyLogError("the dirty ring is in use: there is no dirty bitmap (-ENXIO)")
        if slot.dirty_bitmap is None:
            raise DirtyLogError(f"slot {slot.slot} is not logging dirty pages (-ENOENT)")
        return slot.dirty_bitmap

    def get(self, slot: Memslot) -> U64:
        """KVM_GET_DIRTY_LOG: a copy of the bitmap. Without manual protect the bitmap is
        cleared and the pages it held are write-protected again."""
        bitmap = self._bitmap(slot)
        out = bitmap.copy()
        if not self.manual_protect:
            bitmap[:] = 0
            self._protect(slot, out, 0, slot.npages)
        return out

    def clear(self, slot: Memslot, first_page: int, num_pages: int, bitmap: Any) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the bits set in ``bitmap`` (bit i = page
        ``first_page + i``) and write-protect those pages. KVM allows it with or without
        manual protect; only a ring without a bitmap refuses it."""
        own = self._bitmap(slot)
        npages = slot.npages
        if first_page < 0 or num_pages < 0:
            raise DirtyLogError("first_page and num_pages must be non-negative")
        if first_page % 64:
            raise DirtyLogError(f"first_page {first_page} is not a multiple of 64")
        if first_page + num_pages > npages:
            raise DirtyLogError(
                f"pages [{first_page}, {first_page + num_pages}) run past the slot's {npages} pages"
            )
        if num_pages % 64 and first_page + num_pages != npages:
            raise DirtyLogError(
                f"num_pages {num_pages} is not a multiple of 64 and does not reach the "
                f"slot's end (page {npages})"
            )
        if num_pages == 0:
            return
        words = np.asarray(bitmap)
        if words.dtype != np.uint64:
            words = (
                np.frombuffer(bytes(words), dtype=np.uint64)
                if words.dtype == np.uint8
                else words.astype(np.uint64)
            )
        nwords = (num_pages + 63) // 64
        if words.shape[0] < nwords:
            raise DirtyLogError(f"bitmap holds {words.shape[0]} words, {nwords} needed")
        words = words[:nwords].copy()
        tail = num_pages % 64
        if tail:
            words[-1] &= np.uint64((1 << tail) - 1)
        w0 = first_page // 64
        words &= own[w0 : w0 + nwords]  # the bits that really are cleared
        own[w0 : w0 + nwords] &= ~words
        self._protect(slot, words, first_page, num_pages)

    def _protect(self, slot: Memslot, words: U64, first_page: int, num_pages: int) -> None:
        """Re-protect the pages set in ``words`` (bit i = page ``first_page + i``)."""
        protect_words(self.protector.write_protect, slot, words, first_page, num_pages)

    def reset_rings(self, rings: Iterable[DirtyRing], slots: Mapping[int, Memslot]) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect every collected entry; returns how many."""
        if not self.ring_size:
            raise DirtyLogError("the dirty ring is not enabled (-EINVAL)")
        total = 0
        for ring in rings:
            ids, offsets = ring.collect_for_reset()
            total += int(ids.shape[0])
            for sid in unique_sorted(ids).tolist():
                slot = slots.get(int(sid))
                if slot is None:
                    continue  # the slot went away: nothing of it is mapped any more
                offs = offsets[ids == sid].astype(np.int64)
                pages = np.zeros(slot.npages, dtype=np.bool_)
                pages[offs[offs < slot.npages]] = True
                self.protector.write_protect(slot, 0, slot.npages, pages)
        return total

    def export(self, slot: Memslot) -> IovaBitmap:
        """Harvest ``slot`` (GET, plus CLEAR under manual protect) in vfio's IOVA-bitmap
        format over the slot's GPA range."""
        words = self.get(slot)
        if self.manual_protect:
            self.clear(slot, 0, slot.npages, words)
        return IovaBitmap(slot.gpa, slot.size, PAGE_SIZE, words)

    def harvest_rings(
        self, rings: Iterable[DirtyRing], slots: Mapping[int, Memslot]
    ) -> dict[int, IovaBitmap]:
        """Harvest every ring in order, reset them, and hand the dirty pages out per memslot
        in vfio's IOVA-bitmap format (the dirty-ring form of :meth:`export`)."""
        if not self.ring_size:
            raise DirtyLogError("the dirty ring is not enabled")
        rings = list(rings)
        out: dict[int, IovaBitmap] = {}
        for ring in rings:
            ids, offsets = ring.harvest()
            for sid in unique_sorted(ids).tolist():
                slot = slots.get(int(sid))
                if slot is None:
                    continue
                bitmap = out.get(slot.slot)
                if bitmap is None:
                    bitmap = IovaBitmap(slot.gpa, slot.size, PAGE_SIZE)
                    out[slot.slot] = bitmap
                pages = offsets[ids == sid].astype(np.int64)
                bitmap.set_pages(pages[pages < slot.npages])
        self.reset_rings(rings, slots)
        return out
