"""The VM: memslots, the stage-2 table, the fault handler, dirty logging, MMIO and vCPUs.

KVM-shaped: :meth:`Vm.set_user_memory_region`, :meth:`Vm.create_vcpu`,
:meth:`Vm.get_dirty_log`, :meth:`Vm.clear_dirty_log`, :meth:`Vm.enable_cap`,
:meth:`Vm.enable_dirty_ring`, :meth:`Vm.reset_dirty_rings`, plus :meth:`Vm.register_mmio`.

The fault handler (:meth:`Vm.handle_faults`) takes the faulting pages of one or many
accesses, finds their memslots, picks the largest leaf the backing's page size and the
GPA/HPA alignment allow (4K while the slot is dirty-logged), tops the page cache up, takes
the MMU lock, maps, and flushes once per mapped range. Faults come in bulk from
:meth:`vmm.vcpu.Vcpu.access_many`: a few runs of consecutive pages are mapped with one walk
each, many scattered ones with a single sparse walk per leaf level
(:meth:`~vmm.stage2.Stage2PageTable.map_pages`). A write fault on a logged slot marks
the page dirty (bitmap, or the vCPU's dirty ring) and maps it writable; the first write into a
block under logging splits it (lazily: the block's other pages refault; or eagerly when
logging is enabled, with ``eager_split=True``). Once logging is off, a fault inside a split
block maps the whole block again: the table is coalesced back with break-before-make.

The VM is also the TLB flusher of its page tables: every flush is broadcast to the TLBs of
all its vCPUs (a remote fence).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .dirty import bitmap_to_bools
from .errors import (
    DirtyLogError,
    GuestMemoryFault,
    MemslotError,
    MmioError,
    MmioExit,
    VmmError,
)
from .memory import Backing
from .memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    VALID_FLAGS,
    Memslot,
    MemslotTable,
)
from .mmio import MmioBus, MmioHandler
from .pte import PAGE_SHIFT, PAGE_SIZE, Stage2Mode, get_mode, leaf_perms
from .stage2 import Stage2PageTable
from .tlb import DEFAULT_TLB_ENTRIES

if TYPE_CHECKING:
    from .iova_bitmap import IovaBitmap
    from .nested import NestedGuest
    from .vcpu import Vcpu

__all__ = [
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "Vm",
]

KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1
_MANUAL_FLAGS: Final = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
MAX_SLOTS: Final = 32768
_SPARSE_RUNS: Final = 8  # more fault runs than this: one sparse walk instead of one per run
_U64_ALL: Final = 0xFFFF_FFFF_FFFF_FFFF
_vmids = itertools.count(1)
U64 = npt.NDArray[np.uint64]


class Vm:
    """A virtual machine's memory side (KVM's ``struct kvm``)."""

    def __init__(
        self,
        mode: str | Stage2Mode = "sv39x4",
        vmid: int | None = None,
        *,
        tlb_entries: int = DEFAULT_TLB_ENTRIES,
        eager_split: bool = False,
        eager_split_chunk: int = 2 << 20,
    ) -> None:
        self.mode = get_mode(mode)
        self.vmid = next(_vmids) if vmid is None else vmid
        self.memslots = MemslotTable()
        self.mmio = MmioBus()
        self.vcpus: dict[int, Vcpu] = {}
        self.tlb_entries = tlb_entries
        self.eager_split = eager_split
        self.eager_split_chunk = eager_split_chunk
        self.pt = Stage2PageTable(self.mode, self.vmid, flusher=self)
        self.manual_protect = False
        self.initially_set = False
        self.dirty_ring_entries = 0
        self.nested: dict[int, NestedGuest] = {}
        self.faults = 0
        self.closed = False

    # ------------------------------------------------------------------ debug switch
    @property
    def debug_skip_coalesce_tlbi(self) -> bool:
        """Skip the TLB invalidation before a coalesce (reproduces the TLB conflict)."""
        return self.pt.debug_skip_coalesce_tlbi

    @debug_skip_coalesce_tlbi.setter
    def debug_skip_coalesce_tlbi(self, value: bool) -> None:
        self.pt.debug_skip_coalesce_tlbi = value

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

    # ------------------------------------------------------------------ vCPUs
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        from .vcpu import Vcpu

        if not isinstance(vcpu_id, int) or vcpu_id < 0:
            raise VmmError(f"vCPU id must be a non-negative integer, got {vcpu_id!r}")
        if vcpu_id in self.vcpus:
            raise VmmError(f"vCPU {vcpu_id} already exists")
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    # ------------------------------------------------------------------ memslots
    def set_user_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        backing: Backing | None = None,
        backing_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, move, delete (size 0) or change flags."""
        if not isinstance(slot, int) or not 0 <= slot < MAX_SLOTS:
            raise MemslotError(f"slot id must be in [0, {MAX_SLOTS}), got {slot!r}")
        if flags & ~VALID_FLAGS:
            raise MemslotError(f"unknown memslot flags {flags & ~VALID_FLAGS:#x}")
        if guest_phys_addr % PAGE_SIZE or memory_size % PAGE_SIZE or memory_size < 0:
            raise MemslotError(
                f"memslot GPA {guest_phys_addr:#x} and size {memory_size:#x} must be "
                "non-negative multiples of 4 KiB"
            )
        old = self.memslots.by_id.get(slot)
        if memory_size == 0:
            if old is None:
                raise MemslotError(f"cannot delete slot {slot}: it does not exist")
            self._delete_slot(old)
            return
        if guest_phys_addr + memory_size > self.mode.gpa_limit:
            raise MemslotError(
                f"memslot [{guest_phys_addr:#x}, {guest_phys_addr + memory_size:#x}) is beyond "
                f"{self.mode.name}'s {self.mode.gpa_bits}-bit guest-physical space"
            )
        if old is not None:
            if memory_size != old.size:
                raise MemslotError(
                    f"slot {slot}: the size of an existing slot cannot change "
                    f"({old.size:#x} -> {memory_size:#x}); delete it first"
                )
            if (flags ^ old.flags) & KVM_MEM_READONLY:
                raise MemslotError(f"slot {slot}: KVM_MEM_READONLY cannot change on a live slot")
            if backing is not None and backing is not old.backing:
                raise MemslotError(f"slot {slot}: the backing of a live slot cannot change")
            if guest_phys_addr != old.gpa:
                self._check_free(guest_phys_addr, memory_size, ignore=old)
                self._move_slot(old, guest_phys_addr)
            if flags != old.flags:
                self._change_flags(old, flags)
            return
        if backing is None:
            raise MemslotError(f"slot {slot}: a new memslot needs a backing")
        if backing_offset < 0 or backing_offset % PAGE_SIZE:
            raise MemslotError(f"backing offset {backing_offset:#x} must be 4 KiB-aligned")
        if backing_offset + memory_size > backing.size:
            raise MemslotError(
                f"slot {slot}: size {memory_size:#x} at backing offset {backing_offset:#x} "
                f"exceeds the backing's {backing.size:#x} bytes"
            )
        if backing.hpa_end > self.mode.hpa_limit:
            raise MemslotError(f"the backing's HPA range does not fit {self.mode.name}'s PPN")
        self._check_free(guest_phys_addr, memory_size)
        new = Memslot(slot, 0, guest_phys_addr, memory_size, backing, backing_offset)
        self.memslots.insert(new)
        if flags:
            self._change_flags(new, flags)

    def _check_free(self, gpa: int, size: int, ignore: Memslot | None = None) -> None:
        other = self.memslots.overlapping(gpa, size, ignore=ignore)
        if other is not None:
            raise MemslotError(
                f"memslot [{gpa:#x}, {gpa + size:#x}) overlaps slot {other.slot} "
                f"[{other.gpa:#x}, {other.end:#x})"
            )
        region = self.mmio.overlapping(gpa, size)
        if region is not None:
            raise MemslotError(
                f"memslot [{gpa:#x}, {gpa + size:#x}) overlaps the MMIO region "
                f"[{region.gpa:#x}, {region.end:#x})"
            )

    def _zap(self, slot: Memslot) -> None:
        """Unmap a slot's range from stage 2 and from every nested shadow table."""
        from .nested import remove_nest_rmap_range

        remove_nest_rmap_range(self, slot, slot.gpa, slot.size)
        if self.pt.unmap_range(slot.gpa, slot.size):
            self.flush_range(self.vmid, slot.gpa, slot.size)

    def _delete_slot(self, slot: Memslot) -> None:
        self._zap(slot)
        slot.rmap = None
        slot.rmap_lists.clear()
        slot.dirty_bitmap = None
        self.memslots.remove(slot)

    def _move_slot(self, slot: Memslot, gpa: int) -> None:
        self._zap(slot)
        slot.rmap = None
        slot.rmap_lists.clear()
        self.memslots.remove(slot)
        slot.gpa = gpa
        if slot.dirty_bitmap is not None:
            slot.dirty_bitmap = self._fresh_bitmap(slot)
        self.memslots.insert(slot)

    def _fresh_bitmap(self, slot: Memslot) -> U64:
        words = np.zeros(slot.bitmap_words(), dtype=np.uint64)
        if self.manual_protect and self.initially_set:
            full, tail = divmod(slot.npages, 64)
            words[:full] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
            if tail:
                words[full] = np.uint64((1 << tail) - 1)
        return words

    def _change_flags(self, slot: Memslot, flags: int) -> None:
        was_logging = slot.logging
        slot.flags = flags
        if slot.logging and not was_logging:
            if not self.dirty_ring_entries:
                slot.dirty_bitmap = self._fresh_bitmap(slot)
            if not (self.manual_protect and self.initially_set):
                flush = self.pt.wp_range(slot.gpa, slot.size)
                if self.eager_split:
                    flush |= self.pt.split_range(slot.gpa, slot.size, self.eager_split_chunk)
                if flush:
                    self.flush_range(self.vmid, slot.gpa, slot.size)
        elif was_logging and not slot.logging:
            slot.dirty_bitmap = None

    def memslot(self, slot: int) -> Memslot:
        found = self.memslots.by_id.get(slot)
        if found is None:
            raise MemslotError(f"slot {slot} does not exist")
        return found

    # ------------------------------------------------------------------ MMIO
    def register_mmio(self, gpa: int, size: int, handler: MmioHandler) -> None:
        """Route guest accesses to ``[gpa, gpa + size)`` to ``handler``."""
        if gpa < 0 or size <= 0 or gpa + size > self.mode.gpa_limit:
            raise MmioError(
                f"MMIO region [{gpa:#x}, {gpa + size:#x}) is not inside {self.mode.name}'s "
                "guest-physical space"
            )
        slot = self.memslots.overlapping(gpa, size)
        if slot is not None:
            raise MmioError(
                f"MMIO region [{gpa:#x}, {gpa + size:#x}) overlaps memslot {slot.slot} "
                f"[{slot.gpa:#x}, {slot.end:#x})"
            )
        self.mmio.add(gpa, size, handler)

    def unregister_mmio(self, gpa: int) -> None:
        region = self.mmio.remove(gpa)
        for vcpu in self.vcpus.values():
            vcpu.forget_mmio()
        self.flush_range(self.vmid, region.gpa, region.size)

    # ------------------------------------------------------------------ faults
    def handle_faults(self, pages: U64, write: bool, vcpu: Vcpu | None = None) -> int:
        """Resolve faults on the 4K pages ``pages`` (GPAs, unique, in access order).

        Returns how many pages (a prefix) were handled: fewer than given only when the
        faulting vCPU's dirty ring filled up. Raises :class:`GuestMemoryFault` for a page
        outside every memslot and :class:`MmioExit` for a write to a READONLY slot.
        """
        n = int(pages.shape[0])
        if n == 0:
            return 0
        if n == 1:
            return self._fault_one(int(pages[0]), write, vcpu)
        self.faults += n
        idx = self.memslots.find_many(pages)
        if (idx < 0).any():
            gpa = int(pages[int(np.argmax(idx < 0))])
            raise GuestMemoryFault(gpa)
        slots = self.memslots.ordered()
        ring = vcpu.dirty_ring if vcpu is not None else None
        handled = n
        if write:
            ro = np.array([slots[i].readonly for i in range(len(slots))], dtype=np.bool_)[idx]
            if ro.any():
                gpa = int(pages[int(np.argmax(ro))])
                raise MmioExit(gpa, b"", True)
            if ring is not None:
                logged = np.array([s.logging for s in slots], dtype=np.bool_)[idx]
                dirtying = np.cumsum(logged)
                if int(dirtying[-1]) > ring.room:
                    handled = int(np.searchsorted(dirtying, ring.room, side="right"))
                    pages, idx = pages[:handled], idx[:handled]
        if handled == 0:
            return 0
        for si in unique_sorted(idx).tolist():
            slot = slots[si]
            mine = pages[idx == si]
            self._fault_slot(slot, mine, write, vcpu)
        return handled

    def _fault_one(self, gpa: int, write: bool, vcpu: Vcpu | None) -> int:
        """:meth:`handle_faults` for one page, with scalar look-ups."""
        self.faults += 1
        slot = self.memslots.find(gpa)
        if slot is None:
            raise GuestMemoryFault(gpa)
        if write:
            if slot.readonly:
                raise MmioExit(gpa, b"", True)
            ring = vcpu.dirty_ring if vcpu is not None else None
            if ring is not None and slot.logging and ring.room == 0:
                return 0
        level = self._level_for_one(slot, gpa)
        size = self.mode.level_size(level)
        start = gpa & ~(size - 1)
        pt = self.pt
        pt.cache.topup(pt.tables_needed(start, size, level))
        with pt.mmu_lock():
            flush = pt.map_range(
                start,
                size,
                slot.hpa_of(start),
                leaf_perms(not slot.readonly and (write or not slot.logging)),
                level,
                split="drop" if slot.logging else "preserve",
            )
        if flush:
            self.flush_range(self.vmid, start, size)
        if write and slot.logging:
            offset = (gpa - slot.gpa) >> PAGE_SHIFT
            ring = vcpu.dirty_ring if vcpu is not None else None
            if ring is not None:
                ring.push_many(slot.slot, np.array([offset], dtype=np.int64))
            elif slot.dirty_bitmap is not None:
                slot.dirty_bitmap[offset >> 6] |= np.uint64(1 << (offset & 63))
        return 1

    def _levels_for(self, slot: Memslot, pages: U64) -> npt.NDArray[np.int8]:
        levels = np.zeros(pages.shape[0], dtype=np.int8)
        if slot.logging:
            return levels
        mode = self.mode
        delta = slot.hpa - slot.gpa
        undecided = np.ones(pages.shape[0], dtype=np.bool_)
        for level in range(mode.root_level, 0, -1):
            size = mode.level_size(level)
            if size > slot.backing.page_size or delta % size:
                continue
            start = pages & np.uint64(~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF)
            lo, hi = np.uint64(slot.gpa), np.uint64(slot.end)
            inside = (start >= lo) & (start + np.uint64(size) <= hi)
            ok = undecided & inside
            levels[ok] = level
            undecided &= ~ok
        return levels

    def _level_for_one(self, slot: Memslot, gpa: int) -> int:
        """Scalar :meth:`_levels_for` for one faulting page."""
        if slot.logging:
            return 0
        mode = self.mode
        delta = slot.hpa - slot.gpa
        for level in range(mode.root_level, 0, -1):
            size = mode.level_size(level)
            if size > slot.backing.page_size or delta % size:
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
        mode = self.mode
        lowest = min(lv for _f, _e, lv in run_arrays)
        firsts = np.concatenate([f for f, _e, _l in run_arrays])
        lasts = np.concatenate([e for _f, e, _l in run_arrays])
        total = 0
        for level in range(lowest, mode.root_level):
            shift = np.uint64(mode.shift(level + 1))
            lo, hi = firsts >> shift, lasts >> shift
            total += int(unique_sorted(np.sort(np.concatenate((lo, hi)))).shape[0])
            total += int((hi - lo).astype(np.int64).clip(min=1).sum()) - int(lo.shape[0])
        return total

    def _fault_slot(self, slot: Memslot, pages: U64, write: bool, vcpu: Vcpu | None) -> None:
        mode = self.mode
        writable = not slot.readonly and (write or not slot.logging)
        perms = leaf_perms(writable)
        split = "drop" if slot.logging else "preserve"
        # Runs of consecutive blocks per level: (gpa, size, level) for a few, arrays for many.
        runs: list[tuple[int, int, int]] = []
        run_arrays: list[tuple[U64, U64, int]] = []  # (first gpa, last byte, level)
        if pages.shape[0] == 1:
            level = self._level_for_one(slot, int(pages[0]))
            size = mode.level_size(level)
            runs.append((int(pages[0]) & ~(size - 1), size, level))
            levels = np.empty(0, dtype=np.int8)
        else:
            levels = self._levels_for(slot, pages)
        for level in unique_sorted(levels).tolist():
            size = mode.level_size(level)
            shift = mode.shift(level)
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
        total_runs = sum(int(f.shape[0]) for f, _e, _l in run_arrays) or len(runs)
        if total_runs > _SPARSE_RUNS:
            runs = []
        self.pt.cache.topup(self._tables_needed(runs, run_arrays))
        flushes: list[tuple[int, int]] = []
        with self.pt.mmu_lock():
            if runs:
                for gpa, size, level in runs:
                    if self.pt.map_range(gpa, size, slot.hpa_of(gpa), perms, level, split=split):
                        flushes.append((gpa, size))
            else:
                # Many scattered faults: one sparse walk per leaf level.
                delta = slot.hpa - slot.gpa
                for level in unique_sorted(levels).tolist():
                    block = mode.level_size(level)
                    mask = np.uint64(~(block - 1) & _U64_ALL)
                    chosen = unique_sorted(pages[levels == level] & mask)
                    if self.pt.map_pages(chosen, delta, perms, level, split=split):
                        lo, hi = int(chosen[0]), int(chosen[-1]) + block
                        flushes.append((lo, hi - lo))
        for gpa, size in flushes:
            self.flush_range(self.vmid, gpa, size)
        if write and slot.logging:
            offsets = ((pages - np.uint64(slot.gpa)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            self._mark_dirty(slot, offsets, vcpu)

    def _mark_dirty(self, slot: Memslot, offsets: npt.NDArray[np.int64], vcpu: Vcpu | None) -> None:
        ring = vcpu.dirty_ring if vcpu is not None else None
        if ring is not None:
            ring.push_many(slot.slot, offsets)
            return
        if slot.dirty_bitmap is None:
            return
        if offsets.shape[0] == 1:
            off = int(offsets[0])
            slot.dirty_bitmap[off >> 6] |= np.uint64(1 << (off & 63))
            return
        bools = np.zeros(slot.bitmap_words() * 64, dtype=np.bool_)
        bools[offsets] = True
        slot.dirty_bitmap |= np.packbits(bools, bitorder="little").view(np.uint64)

    # ------------------------------------------------------------------ dirty log
    def enable_cap(self, cap: int, flags: int = 0, *args: int) -> None:
        """KVM_ENABLE_CAP for MANUAL_DIRTY_LOG_PROTECT2 (flags ENABLE|INITIALLY_SET) and
        DIRTY_LOG_RING (``flags`` is the ring size in entries)."""
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            if flags & ~_MANUAL_FLAGS:
                raise DirtyLogError(f"unknown MANUAL_DIRTY_LOG_PROTECT2 flags {flags:#x}")
            if flags and not flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                raise DirtyLogError("INITIALLY_SET needs MANUAL_PROTECT_ENABLE")
            self.manual_protect = bool(flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.initially_set = bool(flags & KVM_DIRTY_LOG_INITIALLY_SET)
        elif cap == KVM_CAP_DIRTY_LOG_RING:
            self.enable_dirty_ring(flags)
        else:
            raise DirtyLogError(f"capability {cap} is not supported by this model")

    def enable_dirty_ring(self, entries: int) -> None:
        """KVM_CAP_DIRTY_LOG_RING: a ring of ``entries`` per vCPU (before any vCPU exists)."""
        from .dirty import DirtyRing

        if self.vcpus:
            raise DirtyLogError("the dirty ring must be enabled before vCPUs are created")
        if any(slot.logging for slot in self.memslots):
            raise DirtyLogError("the dirty ring must be enabled before dirty logging starts")
        DirtyRing(entries)  # validates the size
        self.dirty_ring_entries = entries

    def _logged_slot(self, slot_id: int) -> Memslot:
        slot = self.memslot(slot_id)
        if slot.dirty_bitmap is None:
            if self.dirty_ring_entries:
                raise DirtyLogError("the dirty ring is in use: there is no dirty bitmap")
            raise DirtyLogError(f"slot {slot_id} is not logging dirty pages")
        return slot

    def get_dirty_log(self, slot: int) -> U64:
        """KVM_GET_DIRTY_LOG: the slot's bitmap. Without manual protect it is cleared and the
        dirty pages are write-protected again (one flush)."""
        memslot = self._logged_slot(slot)
        bitmap = memslot.dirty_bitmap
        assert bitmap is not None
        out = bitmap.copy()
        if not self.manual_protect:
            bitmap[:] = 0
            self._reprotect(memslot, out, 0, memslot.npages)
        return out

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the bits set in ``bitmap`` (bit i = page
        ``first_page + i``) and write-protect those pages."""
        if not self.manual_protect:
            raise DirtyLogError("KVM_CLEAR_DIRTY_LOG needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        memslot = self._logged_slot(slot)
        npages = memslot.npages
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
        own = memslot.dirty_bitmap
        assert own is not None
        w0 = first_page // 64
        words &= own[w0 : w0 + nwords]
        own[w0 : w0 + nwords] &= ~words
        self._reprotect(memslot, words, first_page, num_pages)

    def _reprotect(self, slot: Memslot, words: U64, first_page: int, num_pages: int) -> None:
        nz = np.flatnonzero(words)
        if nz.size == 0:
            return
        lo_w, hi_w = int(nz[0]), int(nz[-1]) + 1
        first = first_page + lo_w * 64
        count = min((hi_w - lo_w) * 64, first_page + num_pages - first)
        sub = words[lo_w:hi_w]
        gpa = slot.gpa + (first << PAGE_SHIFT)
        if count % 64 == 0 and bool(np.all(sub == np.uint64(0xFFFF_FFFF_FFFF_FFFF))):
            flush = self.pt.wp_range(gpa, count << PAGE_SHIFT)
        else:
            flush = self.pt.wp_masked(gpa, bitmap_to_bools(sub, count))
        if flush:
            self.flush_range(self.vmid, gpa, count << PAGE_SHIFT)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect every collected ring entry; returns how many."""
        total = 0
        for vcpu in self.vcpus.values():
            ring = vcpu.dirty_ring
            if ring is None:
                continue
            slots, offsets = ring.collect_for_reset()
            total += int(slots.shape[0])
            for sid in np.unique(slots).tolist():
                slot = self.memslots.by_id.get(int(sid))
                if slot is None:
                    continue
                offs = offsets[slots == sid].astype(np.int64)
                bools = np.zeros(slot.npages, dtype=np.bool_)
                bools[offs[offs < slot.npages]] = True
                if self.pt.wp_masked(slot.gpa, bools):
                    self.flush_range(self.vmid, slot.gpa, slot.size)
        return total

    def export_dirty(self, slot: int) -> IovaBitmap:
        """Harvest the slot's dirty pages (GET, plus CLEAR under manual protect) and hand
        them out in vfio's IOVA-bitmap format over the slot's GPA range."""
        from .iova_bitmap import IovaBitmap

        memslot = self._logged_slot(slot)
        words = self.get_dirty_log(slot)
        if self.manual_protect:
            self.clear_dirty_log(slot, 0, memslot.npages, words)
        return IovaBitmap(memslot.gpa, memslot.size, PAGE_SIZE, words)

    def harvest_dirty_rings(self) -> dict[int, IovaBitmap]:
        """Harvest every vCPU's ring in order, reset the rings, and hand the dirty pages out
        per memslot in vfio's IOVA-bitmap format (the dirty-ring form of
        :meth:`export_dirty`)."""
        from .iova_bitmap import IovaBitmap

        if not self.dirty_ring_entries:
            raise DirtyLogError("the dirty ring is not enabled")
        out: dict[int, IovaBitmap] = {}
        for vcpu in self.vcpus.values():
            assert vcpu.dirty_ring is not None
            slots, offsets = vcpu.dirty_ring.harvest()
            for sid in unique_sorted(slots).tolist():
                slot = self.memslots.by_id.get(int(sid))
                if slot is None:
                    continue
                bitmap = out.get(slot.slot)
                if bitmap is None:
                    bitmap = IovaBitmap(slot.gpa, slot.size, PAGE_SIZE)
                    out[slot.slot] = bitmap
                pages = offsets[slots == sid].astype(np.int64)
                bitmap.set_pages(pages[pages < slot.npages])
        self.reset_dirty_rings()
        return out

    # ------------------------------------------------------------------ nested
    def create_nested(self, lpid: int) -> NestedGuest:
        """A nested (L2) guest of this VM with its own shadow stage-2 table."""
        from .nested import NestedGuest

        if lpid in self.nested:
            raise VmmError(f"nested guest lpid {lpid} already exists")
        guest = NestedGuest(self, lpid)
        self.nested[lpid] = guest
        return guest

    def invalidate_range(self, gpa: int, size: int) -> None:
        """Host memory under ``[gpa, gpa+size)`` goes away (an MMU-notifier invalidate):
        unmap it from stage 2 and drop the nested shadow PTEs that still point at it."""
        from .nested import remove_nest_rmap_range

        for slot in self.memslots:
            lo, hi = max(gpa, slot.gpa), min(gpa + size, slot.end)
            if lo < hi:
                remove_nest_rmap_range(self, slot, lo, hi - lo)
        if self.pt.unmap_range(gpa, size):
            self.flush_range(self.vmid, gpa, size)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Free the page tables (stage 2 and shadows)."""
        if self.closed:
            return
        for guest in self.nested.values():
            guest.pt.free()
        self.pt.free()
        self.closed = True
