"""Nested guests (L2) with shadow stage-2 tables, kept in step with the L1 through the rmap.

An L1 guest runs an L2 guest (identified by its ``lpid``) whose guest-physical space the L1
maps onto its own (:meth:`NestedGuest.set_l2_mapping`, what the L1's own stage-2 table for
its guest would say). The host keeps a *shadow* stage-2 table per lpid mapping L2 GPA ->
host, filled on L2 faults by composing the L1's mapping with the VM's stage 2. An L2 runs
on one of the VM's vCPUs: its accesses fault the L1 page on that vCPU, so a write is logged
where any write of that vCPU is (its dirty ring, or the slot's bitmap). A shadow PTE is
writable only while the L1's stage-2 PTE is.

Every shadow PTE records a reverse-map entry on the L1 page it came from (:mod:`vmm.rmap`).
Whatever the host does to an L1 page it also does to the shadow PTEs the rmap names, if
they still map the same host page (a stale entry, whose L2 page was since remapped, is left
alone, as in book3s_hv_nested.c):

* :func:`unmap_shadows` when the page's host memory goes away (memslot delete or move, an
  MMU-notifier invalidation), freeing the rmap entries;
* :func:`protect_shadows` when the page is write-protected for dirty logging (logging
  starts, GET/CLEAR, a ring reset), so an L2 write faults and is logged again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from .dirtylog import DirtyWriter
from .errors import DirtyRingFull, GuestMemoryFault, VmmError
from .memory import HOST_PHYS
from .memslot import Memslot, MemslotTable
from .pte import PAGE_SHIFT, PAGE_SIZE, PTE_PPN_SHIFT, PTE_W, Stage2Mode, leaf_perms
from .rmap import (
    MAX_LPID,
    drop_rmaps,
    insert_nest_rmap,
    pages_with_rmaps,
    rmap_decode,
    rmap_encode,
    rmap_entries,
)
from .stage2 import Stage2PageTable

__all__ = ["L1Host", "NestedGuest", "protect_shadows", "unmap_shadows"]

_SHADOW_VMID_BASE: Final = 1 << 12
_MAX_RETRIES: Final = 3


class L1Host(Protocol):
    """What a nested guest needs of the VM it runs in."""

    mode: Stage2Mode
    memslots: MemslotTable

    @property
    def pt(self) -> Stage2PageTable: ...

    def handle_faults(
        self, pages: npt.NDArray[np.uint64], write: bool, vcpu: DirtyWriter | None = None
    ) -> int: ...

    def flush_range(self, vmid: int, gpa: int, size: int) -> None: ...

    def flush_addr(self, vmid: int, gpa: int, level: int) -> None: ...

    def flush_vmid(self, vmid: int) -> None: ...

    def default_vcpu(self) -> DirtyWriter | None: ...


class NestedGuest:
    """An L2 guest: the L1's L2->L1 mapping and the host's shadow table L2 -> host."""

    def __init__(self, host: L1Host, lpid: int) -> None:
        if not 0 <= lpid <= MAX_LPID:
            raise VmmError(f"lpid must be in [0, {MAX_LPID}], got {lpid}")
        self.host = host
        self.lpid = lpid
        self.l2_to_l1: dict[int, int] = {}
        self.pt = Stage2PageTable(
            host.mode, _SHADOW_VMID_BASE + lpid, pool=host.pt.pool, flusher=host
        )

    def set_l2_mapping(self, l2_gpa: int, l1_gpa: int, size: int) -> None:
        """The L1 maps L2 ``[l2_gpa, +size)`` to its ``[l1_gpa, +size)`` (4K pages).

        A remap drops the old shadow PTEs of the range (the L1's TLB invalidation would)."""
        if (l2_gpa | l1_gpa | size) % PAGE_SIZE or size <= 0:
            raise VmmError("L2 mappings are whole 4K pages")
        for off in range(0, size, PAGE_SIZE):
            self.l2_to_l1[(l2_gpa + off) >> PAGE_SHIFT] = (l1_gpa + off) >> PAGE_SHIFT
        if self.pt.unmap_range(l2_gpa, size):
            self.host.flush_range(self.pt.vmid, l2_gpa, size)

    def _shadow_fault(self, l2_gpa: int, write: bool, vcpu: DirtyWriter | None) -> None:
        page = l2_gpa & ~(PAGE_SIZE - 1)
        l1_gfn = self.l2_to_l1.get(page >> PAGE_SHIFT)
        if l1_gfn is None:
            raise GuestMemoryFault(l2_gpa, f"L2 GPA {l2_gpa:#x} of lpid {self.lpid} is unmapped")
        host = self.host
        l1_gpa = l1_gfn << PAGE_SHIFT
        slot = host.memslots.find(l1_gpa)
        if slot is None:
            raise GuestMemoryFault(l1_gpa)
        # The L1 page must be mapped (writable, for a write) in stage 2 first: fault it in
        # on the vCPU that runs the L2, so a write is logged as that vCPU's.
        pte, _ = host.pt.translate(l1_gpa)
        if not pte or (write and not pte & PTE_W):
            if host.handle_faults(np.array([l1_gpa], dtype=np.uint64), write, vcpu) == 0:
                assert vcpu is not None
                raise DirtyRingFull(vcpu.id)
            pte, _ = host.pt.translate(l1_gpa)
        self.pt.topup_for(page, PAGE_SIZE, 0)
        if self.pt.map_range(
            page, PAGE_SIZE, slot.hpa_of(l1_gpa), leaf_perms(bool(pte & PTE_W)), 0
        ):
            host.flush_range(self.pt.vmid, page, PAGE_SIZE)
        insert_nest_rmap(slot, (l1_gpa - slot.gpa) >> PAGE_SHIFT, rmap_encode(self.lpid, page))

    def translate(self, l2_gpa: int, write: bool = False, vcpu: DirtyWriter | None = None) -> int:
        """The HPA an L2 access reaches, faulting the shadow table in as needed. The access
        runs on ``vcpu`` (default: the VM's first vCPU, if it has any)."""
        runner = vcpu if vcpu is not None else self.host.default_vcpu()
        for _ in range(_MAX_RETRIES):
            pte, level = self.pt.translate(l2_gpa)
            if pte and (not write or pte & PTE_W):
                size = self.host.mode.level_size(level)
                return ((pte >> PTE_PPN_SHIFT) << PAGE_SHIFT) + (l2_gpa & (size - 1))
            self._shadow_fault(l2_gpa, write, runner)
        raise VmmError(f"L2 access at {l2_gpa:#x} did not resolve")

    def _host_view(self, hpa: int, n: int) -> memoryview:
        backing = HOST_PHYS.owner(hpa)
        if backing is None:
            raise VmmError(f"HPA {hpa:#x} belongs to no backing")
        if (hpa & (PAGE_SIZE - 1)) + n > PAGE_SIZE:
            raise VmmError("an L2 access stays within one 4K page")
        off = hpa - backing.hpa
        return backing.mem[off : off + n]

    def read(self, l2_gpa: int, n: int, vcpu: DirtyWriter | None = None) -> bytes:
        """Read from L2 guest memory (within one page)."""
        return bytes(self._host_view(self.translate(l2_gpa, False, vcpu), n))

    def write(self, l2_gpa: int, data: bytes, vcpu: DirtyWriter | None = None) -> None:
        """Write to L2 guest memory (within one page)."""
        self._host_view(self.translate(l2_gpa, True, vcpu), len(data))[:] = data

    def _if_points_to(self, l2_gpa: int, hpa: int, operation: Callable[[int, int], bool]) -> bool:
        """Apply a range ``operation`` of the shadow table to the page of ``l2_gpa`` (and
        flush) if its shadow PTE maps host page ``hpa``; whether it did."""
        pte, level = self.pt.translate(l2_gpa)
        if not pte or level != 0 or (pte >> PTE_PPN_SHIFT) << PAGE_SHIFT != hpa:
            return False
        page = l2_gpa & ~(PAGE_SIZE - 1)
        if operation(page, PAGE_SIZE):
            self.host.flush_range(self.pt.vmid, page, PAGE_SIZE)
        return True

    def unmap_if_points_to(self, l2_gpa: int, hpa: int) -> bool:
        """Clear the shadow PTE of ``l2_gpa`` if it maps host page ``hpa``."""
        return self._if_points_to(l2_gpa, hpa, self.pt.unmap_range)

    def protect_if_points_to(self, l2_gpa: int, hpa: int) -> bool:
        """Write-protect the shadow PTE of ``l2_gpa`` if it maps host page ``hpa``."""
        return self._if_points_to(l2_gpa, hpa, self.pt.wp_range)


def _shadows(
    guests: Mapping[int, NestedGuest], slot: Memslot, first: int, last: int
) -> Iterator[tuple[int, list[tuple[NestedGuest, int]], int]]:
    """Per page ``[first, last]`` of ``slot`` holding rmap entries: its offset, the
    ``(guest, L2 GPA)`` its entries name (guests that still exist), and its host page."""
    for off in pages_with_rmaps(slot, first, last):
        named = []
        for rmap in rmap_entries(slot, off):
            lpid, l2_gpa = rmap_decode(rmap)
            guest = guests.get(lpid)
            if guest is not None:
                named.append((guest, l2_gpa))
        yield off, named, slot.hpa + (off << PAGE_SHIFT)


def unmap_shadows(guests: Mapping[int, NestedGuest], slot: Memslot, gpa: int, size: int) -> int:
    """Invalidate the shadow PTEs recorded on ``[gpa, gpa+size)`` of ``slot`` that still
    map the same host page, and free those pages' rmap entries. Returns PTEs cleared."""
    first = (gpa - slot.gpa) >> PAGE_SHIFT
    last = (gpa + size - 1 - slot.gpa) >> PAGE_SHIFT
    cleared = 0
    for off, named, hpa in list(_shadows(guests, slot, first, last)):
        cleared += sum(guest.unmap_if_points_to(l2_gpa, hpa) for guest, l2_gpa in named)
        drop_rmaps(slot, off)
    return cleared


def protect_shadows(
    guests: Mapping[int, NestedGuest],
    slot: Memslot,
    first: int,
    count: int,
    pages: npt.NDArray[np.bool_] | None,
) -> int:
    """Write-protect the shadow PTEs recorded on pages ``[first, first + count)`` of
    ``slot`` (those set in ``pages``, when given) that still map the same host page
    (kvmhv_update_nest_rmap_rc_list). Returns PTEs write-protected."""
    protected = 0
    for off, named, hpa in _shadows(guests, slot, first, first + count - 1):
        if pages is None or pages[off - first]:
            protected += sum(guest.protect_if_points_to(l2_gpa, hpa) for guest, l2_gpa in named)
    return protected
