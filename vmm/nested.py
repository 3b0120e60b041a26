"""Nested guests (L2) with shadow stage-2 tables, and POWER KVM's nested rmap.

An L1 guest runs an L2 guest (identified by its ``lpid``) whose guest-physical space the L1
maps onto its own (:meth:`NestedGuest.set_l2_mapping`, what the L1's own stage-2 table for
its guest would say). The host keeps a *shadow* stage-2 table per lpid mapping L2 GPA ->
host, filled on L2 faults by composing the L1's mapping with the VM's stage 2.

Every shadow PTE records a reverse-map entry on the L1 page it came from, in the seed's
64-bit encoding (book3s_hv_nested.c)::

    0xFFF0000000000000  12-bit lpid
    0x000FFFFFFFFFF000  40-bit L2 guest page frame number (as a GPA, 4K-aligned)
    0x0000000000000001  single-entry flag

A memslot's rmap holds, per L1 page, nothing (0), one entry inline (flag set), or a list
(``Memslot.rmap_lists``); a duplicate entry is never added twice. When host memory under an
L1 range goes away (memslot delete or move, or :meth:`~vmm.vm.Vm.invalidate_range`),
:func:`remove_nest_rmap_range` walks the range's rmaps and clears exactly the shadow PTEs
that still point at the same host page, leaving stale entries (the shadow PTE was since
remapped elsewhere) alone, then frees the rmap entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from .errors import GuestMemoryFault, VmmError
from .pte import PAGE_SHIFT, PAGE_SIZE, PTE_PPN_SHIFT, PTE_W, leaf_perms
from .stage2 import Stage2PageTable

if TYPE_CHECKING:
    from .memslot import Memslot
    from .vm import Vm

__all__ = [
    "RMAP_NESTED_GPA_MASK",
    "RMAP_NESTED_IS_SINGLE_ENTRY",
    "RMAP_NESTED_LPID_MASK",
    "RMAP_NESTED_LPID_SHIFT",
    "NestedGuest",
    "insert_nest_rmap",
    "remove_nest_rmap_range",
    "rmap_decode",
    "rmap_encode",
    "rmap_entries",
]

RMAP_NESTED_LPID_MASK: Final = 0xFFF0_0000_0000_0000
RMAP_NESTED_LPID_SHIFT: Final = 52
RMAP_NESTED_GPA_MASK: Final = 0x000F_FFFF_FFFF_F000
RMAP_NESTED_IS_SINGLE_ENTRY: Final = 0x1
MAX_LPID: Final = (1 << 12) - 1
_SHADOW_VMID_BASE: Final = 1 << 12


def rmap_encode(lpid: int, l2_gpa: int) -> int:
    """The rmap word for the shadow PTE of L2 page ``l2_gpa`` in guest ``lpid``."""
    if not 0 <= lpid <= MAX_LPID:
        raise VmmError(f"lpid {lpid} does not fit the rmap's 12 bits")
    if l2_gpa & ~RMAP_NESTED_GPA_MASK:
        raise VmmError(f"L2 GPA {l2_gpa:#x} is not a 4K-aligned 52-bit address")
    return (lpid << RMAP_NESTED_LPID_SHIFT) | l2_gpa


def rmap_decode(rmap: int) -> tuple[int, int]:
    """``(lpid, l2_gpa)`` of an rmap word (the single-entry flag is ignored)."""
    return (rmap & RMAP_NESTED_LPID_MASK) >> RMAP_NESTED_LPID_SHIFT, rmap & RMAP_NESTED_GPA_MASK


def _rmap_array(slot: Memslot) -> npt.NDArray[np.uint64]:
    if slot.rmap is None:
        slot.rmap = np.zeros(slot.npages, dtype=np.uint64)
    return slot.rmap


def insert_nest_rmap(slot: Memslot, gfn_offset: int, rmap: int) -> bool:
    """Record ``rmap`` on page ``gfn_offset`` of ``slot``; False if it was there already."""
    arr = _rmap_array(slot)
    cur = int(arr[gfn_offset])
    if cur == 0 and gfn_offset not in slot.rmap_lists:
        arr[gfn_offset] = rmap | RMAP_NESTED_IS_SINGLE_ENTRY
        return True
    if cur & RMAP_NESTED_IS_SINGLE_ENTRY:
        old = cur & ~RMAP_NESTED_IS_SINGLE_ENTRY
        if old == rmap:
            return False
        slot.rmap_lists[gfn_offset] = [old, rmap]
        arr[gfn_offset] = 0  # the list head now lives in rmap_lists
        return True
    entries = slot.rmap_lists[gfn_offset]
    if rmap in entries:
        return False
    entries.append(rmap)
    return True


def rmap_entries(slot: Memslot, gfn_offset: int) -> list[int]:
    """The rmap words recorded on one page (flag stripped)."""
    if slot.rmap is not None:
        cur = int(slot.rmap[gfn_offset])
        if cur & RMAP_NESTED_IS_SINGLE_ENTRY:
            return [cur & ~RMAP_NESTED_IS_SINGLE_ENTRY]
    return list(slot.rmap_lists.get(gfn_offset, ()))


def remove_nest_rmap_range(vm: Vm, slot: Memslot, gpa: int, size: int) -> int:
    """Invalidate the shadow PTEs recorded on ``[gpa, gpa+size)`` of ``slot`` that still
    map the same host page; free those pages' rmap entries. Returns PTEs cleared."""
    if slot.rmap is None and not slot.rmap_lists:
        return 0
    first = (gpa - slot.gpa) >> PAGE_SHIFT
    last = (gpa + size - 1 - slot.gpa) >> PAGE_SHIFT
    offsets: set[int] = {o for o in slot.rmap_lists if first <= o <= last}
    if slot.rmap is not None:
        nz = np.flatnonzero(slot.rmap[first : last + 1]) + first
        offsets.update(nz.tolist())
    cleared = 0
    for off in sorted(offsets):
        hpa = slot.hpa + (off << PAGE_SHIFT)
        for rmap in rmap_entries(slot, off):
            lpid, l2_gpa = rmap_decode(rmap)
            guest = vm.nested.get(lpid)
            if guest is not None and guest.unmap_if_points_to(l2_gpa, hpa):
                cleared += 1
        if slot.rmap is not None:
            slot.rmap[off] = 0
        slot.rmap_lists.pop(off, None)
    return cleared


class NestedGuest:
    """An L2 guest: the L1's L2->L1 mapping and the host's shadow table L2 -> host."""

    def __init__(self, vm: Vm, lpid: int) -> None:
        if not 0 <= lpid <= MAX_LPID:
            raise VmmError(f"lpid must be in [0, {MAX_LPID}], got {lpid}")
        self.vm = vm
        self.lpid = lpid
        self.l2_to_l1: dict[int, int] = {}
        self.pt = Stage2PageTable(vm.mode, _SHADOW_VMID_BASE + lpid, pool=vm.pt.pool, flusher=vm)

    def set_l2_mapping(self, l2_gpa: int, l1_gpa: int, size: int) -> None:
        """The L1 maps L2 ``[l2_gpa, +size)`` to its ``[l1_gpa, +size)`` (4K pages).

        A remap drops the old shadow PTEs of the range (the L1's TLB invalidation would)."""
        if (l2_gpa | l1_gpa | size) % PAGE_SIZE or size <= 0:
            raise VmmError("L2 mappings are whole 4K pages")
        for off in range(0, size, PAGE_SIZE):
            self.l2_to_l1[(l2_gpa + off) >> PAGE_SHIFT] = (l1_gpa + off) >> PAGE_SHIFT
        if self.pt.unmap_range(l2_gpa, size):
            self.vm.flush_range(self.pt.vmid, l2_gpa, size)

    def _shadow_fault(self, l2_gpa: int, write: bool) -> None:
        page = l2_gpa & ~(PAGE_SIZE - 1)
        l1_gfn = self.l2_to_l1.get(page >> PAGE_SHIFT)
        if l1_gfn is None:
            raise GuestMemoryFault(l2_gpa, f"L2 GPA {l2_gpa:#x} of lpid {self.lpid} is unmapped")
        l1_gpa = l1_gfn << PAGE_SHIFT
        slot = self.vm.memslots.find(l1_gpa)
        if slot is None:
            raise GuestMemoryFault(l1_gpa)
        # The L1 page must be mapped in stage 2 first (fault it in like an L1 access).
        pte, _ = self.vm.pt.translate(l1_gpa)
        if not pte or (write and not pte & PTE_W):
            self.vm.handle_faults(np.array([l1_gpa], dtype=np.uint64), write)
            pte, _level = self.vm.pt.translate(l1_gpa)
        hpa = slot.hpa_of(l1_gpa)
        writable = bool(pte & PTE_W)
        self.pt.topup_for(page, PAGE_SIZE, 0)
        if self.pt.map_range(page, PAGE_SIZE, hpa, leaf_perms(writable), 0):
            self.vm.flush_range(self.pt.vmid, page, PAGE_SIZE)
        insert_nest_rmap(slot, (l1_gpa - slot.gpa) >> PAGE_SHIFT, rmap_encode(self.lpid, page))

    def translate(self, l2_gpa: int, write: bool = False) -> int:
        """The HPA an L2 access reaches (faulting the shadow table in as needed)."""
        for _ in range(3):
            pte, level = self.pt.translate(l2_gpa)
            if pte and (not write or pte & PTE_W):
                size = self.vm.mode.level_size(level)
                return ((pte >> PTE_PPN_SHIFT) << PAGE_SHIFT) + (l2_gpa & (size - 1))
            self._shadow_fault(l2_gpa, write)
        raise VmmError(f"L2 access at {l2_gpa:#x} did not resolve")

    def read(self, l2_gpa: int, n: int) -> bytes:
        """Read from L2 guest memory (within one page)."""
        from .memory import HOST_PHYS

        hpa = self.translate(l2_gpa)
        backing = HOST_PHYS.owner(hpa)
        assert backing is not None
        off = hpa - backing.hpa
        return bytes(backing.mem[off : off + n])

    def write(self, l2_gpa: int, data: bytes) -> None:
        """Write to L2 guest memory (within one page)."""
        from .memory import HOST_PHYS

        hpa = self.translate(l2_gpa, write=True)
        backing = HOST_PHYS.owner(hpa)
        assert backing is not None
        off = hpa - backing.hpa
        backing.mem[off : off + len(data)] = data

    def unmap_if_points_to(self, l2_gpa: int, hpa: int) -> bool:
        """Clear the shadow PTE of ``l2_gpa`` if it maps host page ``hpa``."""
        pte, level = self.pt.translate(l2_gpa)
        if not pte or level != 0 or (pte >> PTE_PPN_SHIFT) << PAGE_SHIFT != hpa:
            return False
        if self.pt.unmap_range(l2_gpa & ~(PAGE_SIZE - 1), PAGE_SIZE):
            self.vm.flush_range(self.pt.vmid, l2_gpa & ~(PAGE_SIZE - 1), PAGE_SIZE)
        return True
