"""The VM: its ioctls over memslots, capabilities, vCPUs, MMIO, nested guests and dirty logs.

KVM-shaped: :meth:`Vm.set_user_memory_region`, :meth:`Vm.create_vcpu`,
:meth:`Vm.get_dirty_log`, :meth:`Vm.clear_dirty_log`, :meth:`Vm.enable_cap`,
:meth:`Vm.reset_dirty_rings`, plus :meth:`Vm.track_dirty` (a dirty-page consumer of its own,
:mod:`vmm.dirtytrack`), :meth:`Vm.register_mmio`, :meth:`Vm.create_nested` and
:meth:`Vm.write_guest` (a device's write into guest memory, ``kvm_write_guest``).

The work is done by two parts the VM owns: the :class:`~vmm.mmu.Mmu` (the stage-2 table, the
fault handler, write-protection and zapping, which reach the nested shadow tables through
the rmap) and the MMU's :class:`~vmm.dirtylog.DirtyLog` (the one sink every write is logged
through, and GET/CLEAR/ring harvesting). This module checks the arguments as KVM does and
says what changed: a memslot created, moved (its dirty bitmap kept, as KVM keeps it when
logging is on before and after), deleted, or its flags changed.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .dirty import KVM_DIRTY_GFN_SIZE
from .dirtylog import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    DirtyLog,
    DirtyWriter,
)
from .dirtytrack import DirtyTracker, start_tracking, stop_tracking
from .errors import DirtyLogError, GuestMemoryFault, MemslotError, MmioError, VmmError
from .iova_bitmap import IovaBitmap
from .memory import Backing
from .memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    VALID_FLAGS,
    Memslot,
    MemslotTable,
)
from .mmio import MmioBus, MmioHandler
from .mmu import Mmu
from .nested import NestedGuest
from .pte import PAGE_SHIFT, PAGE_SIZE, Stage2Mode, get_mode
from .rmap import drop_rmaps
from .stage2 import Stage2PageTable
from .tlb import DEFAULT_TLB_ENTRIES
from .vcpu import Vcpu

__all__ = [
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "Vm",
]

KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: Final = 225
MAX_SLOTS: Final = 32768
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
        self.nested: dict[int, NestedGuest] = {}
        self.tlb_entries = tlb_entries
        self.mmu = Mmu(
            self.mode,
            self.vmid,
            self.memslots,
            self.vcpus,
            self.nested,
            eager_split=eager_split,
            eager_split_chunk=eager_split_chunk,
        )
        self.dirty: DirtyLog = self.mmu.dirty
        self.closed = False

    # ------------------------------------------------------------------ the MMU's parts
    @property
    def pt(self) -> Stage2PageTable:
        """The stage-2 page table."""
        return self.mmu.pt

    @property
    def faults(self) -> int:
        """Pages faulted in so far (one per faulting page, bulk or single)."""
        return self.mmu.faults

    @property
    def debug_skip_coalesce_tlbi(self) -> bool:
        """Skip the TLB invalidation before a coalesce (reproduces the TLB conflict)."""
        return self.mmu.pt.debug_skip_coalesce_tlbi

    @debug_skip_coalesce_tlbi.setter
    def debug_skip_coalesce_tlbi(self, value: bool) -> None:
        self.mmu.pt.debug_skip_coalesce_tlbi = value

    def handle_faults(self, pages: U64, write: bool, vcpu: DirtyWriter | None = None) -> int:
        """Resolve faults on 4K pages (see :meth:`vmm.mmu.Mmu.handle_faults`)."""
        return self.mmu.handle_faults(pages, write, vcpu)

    def handle_fault(self, gpa: int, write: bool, vcpu: DirtyWriter | None = None) -> int:
        """Resolve a fault on the page holding ``gpa`` (see :meth:`vmm.mmu.Mmu.fault_one`)."""
        return self.mmu.fault_one(gpa, write, vcpu)

    # The VM is the TLB flusher of the tables it owns (the MMU broadcasts to the vCPUs).
    def flush_range(self, vmid: int, gpa: int, size: int) -> None:
        self.mmu.flush_range(vmid, gpa, size)

    def flush_addr(self, vmid: int, gpa: int, level: int) -> None:
        self.mmu.flush_addr(vmid, gpa, level)

    def flush_vmid(self, vmid: int) -> None:
        self.mmu.flush_vmid(vmid)

    # ------------------------------------------------------------------ vCPUs
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU (with its dirty ring when the capability is on)."""
        if not isinstance(vcpu_id, int) or vcpu_id < 0:
            raise VmmError(f"vCPU id must be a non-negative integer, got {vcpu_id!r}")
        if vcpu_id in self.vcpus:
            raise VmmError(f"vCPU {vcpu_id} already exists")
        vcpu = Vcpu(self, vcpu_id, self.dirty.new_ring())
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    def default_vcpu(self) -> Vcpu | None:
        """The vCPU that runs work no caller placed (an L2 guest): the lowest id."""
        return self.vcpus[min(self.vcpus)] if self.vcpus else None

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
        # KVM RISC-V (kvm_arch_prepare_memory_region): base_gfn + npages must stay below
        # the G-stage GPA space's last frame, else -EFAULT.
        if guest_phys_addr < 0 or guest_phys_addr + memory_size >= self.mode.gpa_limit:
            raise MemslotError(
                f"memslot [{guest_phys_addr:#x}, {guest_phys_addr + memory_size:#x}) must end "
                f"below the top of {self.mode.name}'s {self.mode.gpa_bits}-bit guest-physical "
                f"space ({self.mode.gpa_limit:#x})"
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

    def _delete_slot(self, slot: Memslot) -> None:
        self.mmu.zap(slot, slot.gpa, slot.size)
        drop_rmaps(slot)
        slot.dirty_bitmap = None
        stop_tracking(slot)
        self.memslots.remove(slot)

    def _move_slot(self, slot: Memslot, gpa: int) -> None:
        """KVM_MR_MOVE: the old range is zapped; the dirty bitmap stays with the slot."""
        self.mmu.zap(slot, slot.gpa, slot.size)
        drop_rmaps(slot)
        self.memslots.remove(slot)
        slot.gpa = gpa
        self.memslots.insert(slot)

    def _change_flags(self, slot: Memslot, flags: int) -> None:
        was_logging = slot.logging
        slot.flags = flags
        self.dirty.logging_changed(slot, was_logging)

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
        self.mmu.flush_range(self.vmid, region.gpa, region.size)

    # ------------------------------------------------------------------ device access
    def write_guest(
        self, gpa: int, data: bytes | bytearray | memoryview, vcpu: Vcpu | None = None
    ) -> None:
        """A device's write into guest memory (``kvm_write_guest``): through the host
        mapping, not stage 2, and logged through the dirty sink like any other write (on
        ``vcpu``'s ring when given; otherwise the slot's bitmap)."""
        source = memoryview(data).cast("B")
        for slot, start, view_off, n in self._guest_span(gpa, len(source), write=True):
            first = (start - slot.gpa) >> PAGE_SHIFT
            last = (start + n - 1 - slot.gpa) >> PAGE_SHIFT
            self.dirty.mark(slot, np.arange(first, last + 1, dtype=np.int64), vcpu)
            done = start - gpa
            slot.backing.mem[view_off : view_off + n] = source[done : done + n]

    def read_guest(self, gpa: int, n: int) -> bytes:
        """A device's read of guest memory (``kvm_read_guest``)."""
        out = bytearray()
        for slot, _start, view_off, size in self._guest_span(gpa, n, write=False):
            out += slot.backing.mem[view_off : view_off + size]
        return bytes(out)

    def _guest_span(self, gpa: int, n: int, *, write: bool) -> list[tuple[Memslot, int, int, int]]:
        """``(slot, gpa, backing offset, bytes)`` pieces of ``[gpa, gpa + n)``, slot by slot."""
        if gpa < 0 or n < 0:
            raise VmmError(f"bad guest access: {n} bytes at {gpa:#x}")
        pieces = []
        pos = gpa
        while pos < gpa + n:
            slot = self.memslots.find(pos)
            if slot is None:
                raise GuestMemoryFault(pos)
            if write and slot.readonly:
                raise MemslotError(f"write to read-only slot {slot.slot} at {pos:#x} (-EFAULT)")
            size = min(gpa + n, slot.end) - pos
            pieces.append((slot, pos, slot.backing_offset + pos - slot.gpa, size))
            pos += size
        return pieces

    # ------------------------------------------------------------------ dirty log
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP with ``args[0]`` as KVM reads it: MANUAL_DIRTY_LOG_PROTECT2 takes
        ENABLE [| INITIALLY_SET]; DIRTY_LOG_RING takes the ring's size in *bytes* (a power
        of two, at least a page: 16-byte entries); DIRTY_LOG_RING_WITH_BITMAP takes nothing.
        ``flags`` must be 0 (KVM: -EINVAL otherwise)."""
        if flags:
            raise DirtyLogError(f"capability {cap}: flags must be 0, got {flags:#x}")
        arg = args[0] if args else 0
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            self.dirty.enable_manual_protect(arg)
        elif cap == KVM_CAP_DIRTY_LOG_RING:
            self.enable_dirty_ring(arg)
        elif cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
            self.dirty.enable_ring_with_bitmap(memslots=len(self.memslots))
        else:
            raise DirtyLogError(f"capability {cap} is not supported by this model")

    def enable_dirty_ring(self, size: int) -> None:
        """KVM_CAP_DIRTY_LOG_RING: a ring of ``size`` bytes per vCPU (``size // 16``
        entries), before any vCPU exists."""
        self.dirty.enable_ring(
            size, vcpus=len(self.vcpus), logging=any(s.logging for s in self.memslots)
        )

    @property
    def dirty_ring_entries(self) -> int:
        """Entries of each vCPU's dirty ring (0: no ring)."""
        return self.dirty.ring_size // KVM_DIRTY_GFN_SIZE

    def get_dirty_log(self, slot: int) -> U64:
        """KVM_GET_DIRTY_LOG (see :meth:`vmm.dirtylog.DirtyLog.get`)."""
        return self.dirty.get(self.memslot(slot))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """KVM_CLEAR_DIRTY_LOG (see :meth:`vmm.dirtylog.DirtyLog.clear`)."""
        self.dirty.clear(self.memslot(slot), first_page, num_pages, bitmap)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect every collected ring entry; returns how many."""
        return self.dirty.reset_rings(self._rings(), self.memslots.by_id)

    def export_dirty(self, slot: int) -> IovaBitmap:
        """Harvest the slot's dirty pages in vfio's IOVA-bitmap format."""
        return self.dirty.export(self.memslot(slot))

    def track_dirty(self, slot: int) -> DirtyTracker:
        """A new consumer of ``slot``'s written pages, independent of KVM's log and of the
        other consumers: ``tracker.harvest()`` returns the pages written since its last
        harvest (see :mod:`vmm.dirtytrack`); ``tracker.close()`` when done."""
        return start_tracking(self.memslot(slot), self.mmu)

    def harvest_dirty_rings(self) -> dict[int, IovaBitmap]:
        """Harvest and reset every vCPU's ring; IOVA bitmaps per memslot."""
        return self.dirty.harvest_rings(self._rings(), self.memslots.by_id)

    def _rings(self) -> list[Any]:
        return [v.dirty_ring for v in self.vcpus.values() if v.dirty_ring is not None]

    # ------------------------------------------------------------------ nested
    def create_nested(self, lpid: int) -> NestedGuest:
        """A nested (L2) guest of this VM with its own shadow stage-2 table."""
        if lpid in self.nested:
            raise VmmError(f"nested guest lpid {lpid} already exists")
        guest = NestedGuest(self, lpid)
        self.nested[lpid] = guest
        return guest

    def invalidate_range(self, gpa: int, size: int) -> None:
        """Host memory under ``[gpa, gpa+size)`` goes away (an MMU-notifier invalidate):
        unmap it from stage 2 and drop the nested shadow PTEs that still point at it."""
        self.mmu.invalidate_range(gpa, size)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Free the page tables (stage 2 and shadows)."""
        if self.closed:
            return
        for guest in self.nested.values():
            guest.pt.free()
        self.mmu.pt.free()
        self.closed = True
