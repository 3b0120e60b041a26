"""The VM's MMU (arch/riscv/kvm/mmu.c): the stage-2 table, the fault handler, and the range
operations memslot changes and dirty logging need, applied to the shadow tables too.

:meth:`Mmu.handle_faults` takes the faulting pages of one or many accesses, finds their
memslots, picks the largest leaf the backing's page size and the GPA/HPA alignment allow (4K
while the slot is dirty-logged), tops the page cache up, takes the MMU lock, maps, and
flushes once per mapped range. A write fault on a logged slot is marked dirty through the
VM's one dirty sink (:class:`~vmm.dirtylog.DirtyLog`) *before* the page is mapped writable,
as ``kvm_riscv_gstage_map`` calls ``mark_page_dirty`` first; a vCPU whose ring has reached
its soft limit gets no more pages (the fault reports how many it handled). The first write
into a block under logging splits it (lazily: the block's other pages refault; or eagerly
when logging starts, with ``eager_split``). Once logging is off, a fault inside a split block
maps the whole block again: the table is coalesced back with break-before-make.

Faults come one at a time from a vCPU's access (a scalar path) or in bulk from
:meth:`vmm.vcpu.Vcpu.access_many`: a few runs of consecutive pages are mapped with one walk
each, many scattered ones with a single sparse walk per leaf level
(:meth:`~vmm.stage2.Stage2PageTable.map_pages`).

The MMU implements the dirty log's :class:`~vmm.dirtylog.Protector` (write-protect the
stage-2 leaves and, through the nested rmap, the shadow PTEs on the same pages) and zaps
ranges the same way. It is also the TLB flusher of every table: a flush is broadcast to the
TLBs of all vCPUs (a remote fence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .dirty import few_pages
from .dirtylog import DirtyLog, DirtyWriter, protect_words
from .errors import GuestMemoryFault, MmioExit
from .iova_bitmap import IovaBitmap
from .memslot import KVM_MEM_READONLY, Memslot, MemslotTable
from .nested import NestedGuest, protect_shadows, unmap_shadows
from .pte import PAGE_SHIFT, PAGE_SIZE, PTE_W, Stage2Mode, leaf_perms
from .stage2 import Stage2PageTable
from .tlb import Tlb

__all__ = ["Mmu"]

_SPARSE_RUNS: Final = 8  # more fault runs than this: one sparse walk instead of one per run
#: a tracker's harvest of at most this many pages protects them one walk each
_SCALAR_PROTECT: Final = 32
_U64_ALL: Final = 0xFFFF_FFFF_FFFF_FFFF
_WRITABLE: Final = leaf_perms(True)
_READ_ONLY: Final = leaf_perms(False)
U64 = npt.NDArray[np.uint64]


class _HasTlb(Protocol):
    tlb: Tlb


class Mmu:
    """Stage 2, faults, write-protection and zapping for one VM."""

    def __init__(
        self,
        mode: Stage2Mode,
        vmid: int,
        memslots: MemslotTable,
        vcpus: Mapping[int, _HasTlb],
        nested: Mapping[int, NestedGuest],
        *,
        eager_split: bool = False,
        eager_split_chunk: int = 2 << 20,
    ) -> None:
        self.mode = mode
        self.vmid = vmid
        self.memslots = memslots
        self.vcpus = vcpus
        self.nested = nested
        self.eager_split = eager_split
        self.eager_split_chunk = eager_split_chunk
        self.pt = Stage2PageTable(mode, vmid, flusher=self)
        self.dirty = DirtyLog(self)
        self.faults = 0
        self._shifts = mode.shifts
        self._root_level = mode.root_level

    # ------------------------------------------------------------------ TLB flusher
    def flush_range(self, vmid: int, gpa: int, size: int) -> None:
        for vcpu in self.vcpus.values():
            vcpu.tlb.flush_range(vmid, gpa, size)

    def flush_addr(self, vmid: int, gpa: int, level: int) -> None:
        for vcpu in self.vcpus.values():
            vcpu.tlb.flush_addr(vmid, gpa, level)

    def flush_vmid(self, vmid: int) -> None:
        for vcpu in self.vcpus.values():
            vcpu.tlb.flush_vmid(vmid)

    # ------------------------------------------------------------------ protection
    def _write_protect(
        self, slot: Memslot, first: int, count: int, pages: npt.NDArray[np.bool_] | None
    ) -> None:
        gpa = slot.gpa + (first << PAGE_SHIFT)
        size = count << PAGE_SHIFT
        flush = self.pt.wp_range(gpa, size) if pages is None else self.pt.wp_masked(gpa, pages)
        if flush:
            self.flush_range(self.vmid, gpa, size)
        protect_shadows(self.nested, slot, first, count, pages)

    def write_protect(
        self, slot: Memslot, first: int, count: int, pages: npt.NDArray[np.bool_] | None
    ) -> None:
        """Write-protect pages ``[first, first + count)`` of ``slot`` (those set in
        ``pages``, when given) in stage 2 and in every shadow table that maps them, for
        KVM's log: their next write is KVM's to log (whatever a tracker did before)."""
        if slot.tracking is not None:
            slot.tracking.forget(first, count, pages)
        self._write_protect(slot, first, count, pages)

    def protect_for_trackers(self, slot: Memslot, words: U64 | None) -> None:
        """Write-protect the pages of ``slot`` set in ``words`` (None: every page) for its
        dirty trackers (:mod:`vmm.dirtytrack`). Those writable now, which KVM's log saw
        writable (already logged), are remembered as protected for the trackers only.

        A harvest of a few pages protects them one by one (a walk each, in place); more, or
        the whole slot of a new tracker, in bulk: one vectorised walk asks which are
        writable, one masked walk protects them. (Only the whole-slot protection of a new
        tracker can meet a writable block, and it asks about every page of it; a tracked
        slot maps 4K leaves from then on.)"""
        tracking = slot.tracking
        assert tracking is not None
        pages = None if words is None else few_pages(words, _SCALAR_PROTECT)
        if pages is not None:
            gpas = [slot.gpa + (page << PAGE_SHIFT) for page in pages]
            nested = self.nested
            for page, gpa, writable in zip(pages, gpas, self.pt.wp_pages(gpas), strict=True):
                if writable:
                    tracking.wp_only[page] = True
                    self.flush_range(self.vmid, gpa, PAGE_SIZE)
                if nested:
                    protect_shadows(nested, slot, page, 1, None)
            return
        if words is None:
            offsets = np.arange(slot.npages, dtype=np.int64)
        else:
            offsets = IovaBitmap(slot.gpa, slot.size, PAGE_SIZE, words).dirty_pages()
        gpas_array = np.uint64(slot.gpa) + (offsets.astype(np.uint64) << np.uint64(PAGE_SHIFT))
        ptes, _levels = self.pt.translate_bulk(gpas_array)
        tracking.wp_only[offsets[(ptes & np.uint64(PTE_W)) != 0]] = True
        if words is None:
            self._write_protect(slot, 0, slot.npages, None)
        else:
            protect_words(self._write_protect, slot, words, 0, slot.npages)

    def start_logging(self, slot: Memslot) -> None:
        """Logging starts on ``slot``: write-protect it everywhere (and split it, if eager)."""
        if slot.tracking is not None:
            slot.tracking.forget(0, slot.npages, None)
        flush = self.pt.wp_range(slot.gpa, slot.size)
        if self.eager_split:
            flush |= self.pt.split_range(slot.gpa, slot.size, self.eager_split_chunk)
        if flush:
            self.flush_range(self.vmid, slot.gpa, slot.size)
        protect_shadows(self.nested, slot, 0, slot.npages, None)

    def zap(self, slot: Memslot, gpa: int, size: int) -> None:
        """Unmap ``[gpa, gpa+size)`` of ``slot`` from stage 2 and from the shadow tables."""
        _forget_range(slot, gpa, size)
        unmap_shadows(self.nested, slot, gpa, size)
        if self.pt.unmap_range(gpa, size):
            self.flush_range(self.vmid, gpa, size)

    def invalidate_range(self, gpa: int, size: int) -> None:
        """Host memory under ``[gpa, gpa+size)`` goes away (an MMU-notifier invalidate)."""
        for slot in self.memslots:
            lo, hi = max(gpa, slot.gpa), min(gpa + size, slot.end)
            if lo < hi:
                _forget_range(slot, lo, hi - lo)
                unmap_shadows(self.nested, slot, lo, hi - lo)
        if self.pt.unmap_range(gpa, size):
            self.flush_range(self.vmid, gpa, size)

    # ------------------------------------------------------------------ faults
    def handle_faults(self, pages: U64, write: bool, vcpu: DirtyWriter | None = None) -> int:
        """Resolve faults on the 4K pages ``pages`` (GPAs, unique, in access order) of an
        access by ``vcpu`` (None: no vCPU, e.g. a device).

        Returns how many pages (a prefix) were handled: fewer than given only when the
        vCPU's dirty ring reached its soft limit. Raises :class:`GuestMemoryFault` for a
        page outside every memslot and :class:`MmioExit` for a write to a READONLY slot.
        """
        n = int(pages.shape[0])
        if n == 0:
            return 0
        if n == 1:
            return self.fault_one(int(pages[0]), write, vcpu)
        self.faults += n
        idx = self.memslots.find_many(pages)
        if (idx < 0).any():
            raise GuestMemoryFault(int(pages[int(np.argmax(idx < 0))]))
        slots = self.memslots.ordered()
        handled = n
        if write:
            ro = np.array([s.readonly for s in slots], dtype=np.bool_)[idx]
            if ro.any():
                raise MmioExit(int(pages[int(np.argmax(ro))]), b"", True)
            room = self.dirty.room(vcpu)
            if room is not None:
                logged = np.zeros(n, dtype=np.bool_)
                for si in unique_sorted(idx).tolist():
                    here = idx == si
                    slot = slots[si]
                    offsets = ((pages[here] - np.uint64(slot.gpa)) >> np.uint64(PAGE_SHIFT)).astype(
                        np.int64
                    )
                    logged[here] = self.dirty.kvm_faults(slot, offsets)
                dirtying = np.cumsum(logged)
                if int(dirtying[-1]) > room:
                    handled = int(np.searchsorted(dirtying, room, side="right"))
                    pages, idx = pages[:handled], idx[:handled]
        if handled == 0:
            return 0
        for si in unique_sorted(idx).tolist():
            self._fault_slot(slots[si], pages[idx == si], write, vcpu)
        return handled

    def fault_one(self, gpa: int, write: bool, vcpu: DirtyWriter | None = None) -> int:
        """:meth:`handle_faults` for the one page holding ``gpa``, with scalar look-ups."""
        self.faults += 1
        slot = self.memslots.find(gpa)
        if slot is None:
            raise GuestMemoryFault(gpa)
        flags = slot.flags
        tracked = slot.write_tracked
        if write:
            if flags & KVM_MEM_READONLY:
                raise MmioExit(gpa, b"", True)
            if tracked or slot.tracking is not None:
                offset = (gpa - slot.gpa) >> PAGE_SHIFT
                if self.dirty.room(vcpu) == 0 and self.dirty.kvm_fault(slot, offset):
                    return 0
                self.dirty.mark_fault(slot, offset, vcpu)
        level = (
            0 if tracked or slot.backing.page_size == PAGE_SIZE else self._level_for_one(slot, gpa)
        )
        shift = self._shifts[level]
        start = gpa >> shift << shift
        pt = self.pt
        pt.cache.topup(self._root_level - level)  # at most one new table per level below
        with pt.mmu_lock():
            flush = pt.set_leaf(
                start,
                slot.hpa + (start - slot.gpa),
                _WRITABLE if write or not (tracked or flags & KVM_MEM_READONLY) else _READ_ONLY,
                level,
                split="drop" if tracked else "preserve",
            )
        if flush:
            self.flush_range(self.vmid, start, 1 << shift)
        return 1

    def _levels_for(self, slot: Memslot, pages: U64) -> npt.NDArray[np.int8]:
        """The leaf level each faulting page gets (the largest the slot allows there)."""
        levels = np.zeros(pages.shape[0], dtype=np.int8)
        if slot.write_tracked:
            return levels
        delta = slot.hpa - slot.gpa
        undecided = np.ones(pages.shape[0], dtype=np.bool_)
        lo, hi = np.uint64(slot.gpa), np.uint64(slot.end)
        for level in range(self.mode.root_level, 0, -1):
            size = 1 << self._shifts[level]
            if size > slot.backing.page_size or delta % size:
                continue
            start = pages & np.uint64(~(size - 1) & _U64_ALL)
            ok = undecided & (start >= lo) & (start + np.uint64(size) <= hi)
            levels[ok] = level
            undecided &= ~ok
        return levels

    def _level_for_one(self, slot: Memslot, gpa: int) -> int:
        """Scalar :meth:`_levels_for` for one faulting page."""
        if slot.write_tracked:
            return 0
        delta = slot.hpa - slot.gpa
        page_size = slot.backing.page_size
        for level in range(self.mode.root_level, 0, -1):
            size = 1 << self._shifts[level]
            if size > page_size or delta % size:
                continue
            start = gpa & ~(size - 1)
            if start >= slot.gpa and start + size <= slot.end:
                return level
        return 0

    def _tables_needed(
        self, runs: list[tuple[int, int, int]], run_arrays: list[tuple[U64, U64, int]]
    ) -> int:
        """Upper bound of the table pages mapping the fault runs can take: per run when
        they are few; otherwise, for every level from the lowest leaf level up, one table
        per distinct region a table of that level covers."""
        if runs:
            return sum(self.pt.tables_needed(g, s, lv) for g, s, lv in runs)
        lowest = min(lv for _f, _e, lv in run_arrays)
        firsts = np.concatenate([f for f, _e, _l in run_arrays])
        lasts = np.concatenate([e for _f, e, _l in run_arrays])
        total = 0
        for level in range(lowest, self.mode.root_level):
            shift = np.uint64(self._shifts[level + 1])
            lo, hi = firsts >> shift, lasts >> shift
            total += int(unique_sorted(np.sort(np.concatenate((lo, hi)))).shape[0])
            total += int((hi - lo).astype(np.int64).clip(min=1).sum()) - int(lo.shape[0])
        return total

    def _fault_slot(self, slot: Memslot, pages: U64, write: bool, vcpu: DirtyWriter | None) -> None:
        tracked = slot.write_tracked
        if write and (tracked or slot.tracking is not None):
            offsets = ((pages - np.uint64(slot.gpa)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            self.dirty.mark_fault(slot, offsets, vcpu)
        perms = leaf_perms(not slot.readonly and (write or not tracked))
        split = "drop" if tracked else "preserve"
        levels = self._levels_for(slot, pages)
        # Runs of consecutive blocks per level: (gpa, size, level) for a few, arrays for many.
        runs: list[tuple[int, int, int]] = []
        run_arrays: list[tuple[U64, U64, int]] = []  # (first gpa, last byte, level)
        for level in unique_sorted(levels).tolist():
            shift = self._shifts[level]
            blocks = unique_sorted(pages[levels == level] >> np.uint64(shift)).astype(np.int64)
            breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
            starts = np.concatenate(([0], breaks))
            stops = np.concatenate((breaks, [blocks.shape[0]]))
            first = (blocks[starts] << shift).astype(np.uint64)
            last = ((blocks[stops - 1] + 1) << shift).astype(np.uint64) - np.uint64(1)
            run_arrays.append((first, last, level))
            if len(runs) + first.shape[0] <= _SPARSE_RUNS:
                for g, e in zip(first.tolist(), last.tolist(), strict=True):
                    runs.append((g, e + 1 - g, level))
        if sum(int(f.shape[0]) for f, _e, _l in run_arrays) > _SPARSE_RUNS:
            runs = []
        pt = self.pt
        pt.cache.topup(self._tables_needed(runs, run_arrays))
        flushes: list[tuple[int, int]] = []
        with pt.mmu_lock():
            if runs:
                for gpa, size, level in runs:
                    if pt.map_range(gpa, size, slot.hpa_of(gpa), perms, level, split=split):
                        flushes.append((gpa, size))
            else:
                # Many scattered faults: one sparse walk per leaf level.
                delta = slot.hpa - slot.gpa
                for level in unique_sorted(levels).tolist():
                    block = 1 << self._shifts[level]
                    mask = np.uint64(~(block - 1) & _U64_ALL)
                    chosen = unique_sorted(pages[levels == level] & mask)
                    if pt.map_pages(chosen, delta, perms, level, split=split):
                        lo, hi = int(chosen[0]), int(chosen[-1]) + block
                        flushes.append((lo, hi - lo))
        for gpa, size in flushes:
            self.flush_range(self.vmid, gpa, size)


def _forget_range(slot: Memslot, gpa: int, size: int) -> None:
    """``[gpa, gpa+size)`` of ``slot`` is unmapped: no page there is protected for the
    trackers only any more (its next write faults for KVM's log too)."""
    if slot.tracking is not None:
        first = (gpa - slot.gpa) >> PAGE_SHIFT
        slot.tracking.forget(first, -(-(gpa + size - slot.gpa) // PAGE_SIZE) - first, None)
