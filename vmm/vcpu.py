"""A vCPU: guest accesses through TLB -> stage-2 walk -> fault handler -> retry.

:meth:`Vcpu.read` / :meth:`Vcpu.write` are the per-access path: a TLB hit is one dict
look-up and a ``memoryview`` slice. A miss walks the stage-2 table like the hart's page
walker, fills the TLB (conflict-checked) or faults to the VM's handler and retries. MMIO
regions dispatch to their device; a write to a READONLY slot raises
:class:`~vmm.errors.MmioExit` as KVM exits to userspace.

:meth:`Vcpu.touch` / :meth:`Vcpu.access_many` are the bulk path the page-table benchmark
needs (every page of a 1 GiB region): the same semantics done with vector operations, the
translation of all addresses at once, the faults handled in one batch, the retry walked
again, the TLB filled with the newest translations and the data moved with numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from ._arrays import unique_first, unique_sorted
from .dirty import DirtyRing
from .errors import DirtyRingFull, GuestMemoryFault, MmioExit, ModelBug, VmmError
from .memory import HOST_PHYS, Backing
from .mmio import MmioRegion
from .pte import PAGE_SHIFT, PAGE_SIZE, PTE_PPN_SHIFT, PTE_W
from .tlb import Tlb, TlbEntry

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["TOUCH_PATTERN", "Vcpu"]

TOUCH_PATTERN: Final = 0x0123456789ABCDEF
_MAX_RETRIES: Final = 8
U64 = npt.NDArray[np.uint64]


class Vcpu:
    """One vCPU of a :class:`~vmm.vm.Vm`."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.tlb = Tlb(vm.mode, vm.tlb_entries)
        self._tlb0 = self.tlb.sets(vm.vmid)[0]
        # the second level's blocks (2M, or 4M on Sv32x4): hits there are fast too
        self._tlb1 = self.tlb.sets(vm.vmid)[1]
        self._shift1 = vm.mode.shift(1)
        self._size1 = 1 << self._shift1
        self._mask1 = self._size1 - 1
        self.dirty_ring: DirtyRing | None = (
            DirtyRing(vm.dirty_ring_entries) if vm.dirty_ring_entries else None
        )
        self.mmio_reads = 0
        self.mmio_writes = 0
        #: guest page -> the MMIO region seen there last (read32/write32's fast dispatch)
        self._mmio_pages: dict[int, MmioRegion] = {}

    # ------------------------------------------------------------------ per access
    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at ``gpa`` as the guest sees them."""
        entry = self._tlb0.get(gpa >> PAGE_SHIFT)
        if entry is not None:
            off = gpa & (PAGE_SIZE - 1)
            if off + n <= PAGE_SIZE:
                return entry.mem[off : off + n].tobytes()
        else:
            entry = self._tlb1.get(gpa >> self._shift1)
            if entry is not None:
                off = gpa & self._mask1
                if off + n <= self._size1:
                    return entry.mem[off : off + n].tobytes()
        return self._access(gpa, n, None)

    def read_into(self, gpa: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` (writable, bytes format) with the ``len(buffer)`` bytes at ``gpa``:
        :meth:`read` without a new ``bytes`` object per access, for a driver that copies
        into a buffer it reuses. Same translation, faults and MMIO dispatch as :meth:`read`."""
        n = len(buffer)
        entry = self._tlb0.get(gpa >> PAGE_SHIFT)
        if entry is not None:
            off = gpa & (PAGE_SIZE - 1)
            if off + n <= PAGE_SIZE:
                buffer[:] = entry.mem[off : off + n]
                return
        else:
            entry = self._tlb1.get(gpa >> self._shift1)
            if entry is not None:
                off = gpa & self._mask1
                if off + n <= self._size1:
                    buffer[:] = entry.mem[off : off + n]
                    return
        self._read_leaves_into(gpa, memoryview(buffer).cast("B"))

    def _read_leaves_into(self, gpa: int, out: memoryview) -> None:
        """:meth:`read_into`'s slow path: MMIO dispatch, or memory leaf by leaf."""
        n = len(out)
        if n == 0 or gpa < 0 or self.vm.mmio.find(gpa) is not None:
            out[:] = self._access(gpa, n, None)
            return
        pos = 0
        while pos < n:
            addr = gpa + pos
            mem = self._resolve(addr, None).mem
            off = addr & (len(mem) - 1)
            chunk = min(n - pos, len(mem) - off)
            out[pos : pos + chunk] = mem[off : off + chunk]
            pos += chunk

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa``."""
        entry = self._tlb0.get(gpa >> PAGE_SHIFT)
        if entry is not None:
            if entry.writable:
                off = gpa & (PAGE_SIZE - 1)
                n = len(data)
                if off + n <= PAGE_SIZE:
                    entry.mem[off : off + n] = data
                    return
        else:
            entry = self._tlb1.get(gpa >> self._shift1)
            if entry is not None and entry.writable:
                off = gpa & self._mask1
                n = len(data)
                if off + n <= self._size1:
                    entry.mem[off : off + n] = data
                    return
        self._access(gpa, len(data), data)

    def read32(self, gpa: int) -> int:
        """A 32-bit load (a device register through MMIO dispatch, or memory)."""
        region = self._mmio_pages.get(gpa >> PAGE_SHIFT)
        if region is not None and region.gpa <= gpa and gpa + 4 <= region.end:
            self.mmio_reads += 1
            return int(region.handler.mmio_read(gpa - region.gpa, 4)) & 0xFFFF_FFFF
        return int.from_bytes(self.read(gpa, 4), "little")

    def write32(self, gpa: int, value: int) -> None:
        """A 32-bit store; a device register write is one look-up and one call."""
        region = self._mmio_pages.get(gpa >> PAGE_SHIFT)
        if region is not None and region.gpa <= gpa and gpa + 4 <= region.end:
            self.mmio_writes += 1
            region.handler.mmio_write(gpa - region.gpa, 4, value & 0xFFFF_FFFF)
            return
        self.write(gpa, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def read64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def forget_mmio(self) -> None:
        """Drop the MMIO dispatch cache (the VM calls this when a region goes away)."""
        self._mmio_pages.clear()

    def _access(self, gpa: int, n: int, data: bytes | bytearray | memoryview | None) -> bytes:
        """The slow path: MMIO dispatch, or memory leaf by leaf (a 2M block is one slice)."""
        if n < 0 or gpa < 0:
            raise VmmError(f"bad guest access: {n} bytes at {gpa:#x}")
        if n == 0:
            return b""
        vm = self.vm
        region = vm.mmio.find(gpa)
        if region is not None:
            self._mmio_pages[gpa >> PAGE_SHIFT] = region
            if data is None:
                self.mmio_reads += 1
                return vm.mmio.read(region, gpa, n).to_bytes(n, "little")
            self.mmio_writes += 1
            vm.mmio.write(region, gpa, n, int.from_bytes(data, "little"))
            return b""
        source = None if data is None else memoryview(data).cast("B")
        out = bytearray() if data is None else None
        pos = 0
        while pos < n:
            addr = gpa + pos
            in_page = min(n - pos, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            mem = self._resolve(addr, None if source is None else source[pos : pos + in_page]).mem
            off = addr & (len(mem) - 1)
            chunk = min(n - pos, len(mem) - off)
            if source is None:
                assert out is not None
                out += mem[off : off + chunk]
            else:
                mem[off : off + chunk] = source[pos : pos + chunk]
            pos += chunk
        return bytes(out) if out is not None else b""

    def _resolve(self, gpa: int, data: memoryview | None) -> TlbEntry:
        """The TLB entry that maps ``gpa`` for this access (a read if ``data`` is None),
        after walking and faulting as needed; ``data`` is the write, for an MMIO exit."""
        vm = self.vm
        write = data is not None
        for _ in range(_MAX_RETRIES):
            entry = self.tlb.lookup(vm.vmid, gpa)
            if entry is not None:
                if write and not entry.writable:
                    # A cached read-only entry: permission fault, drop it and re-walk.
                    self.tlb.flush_addr(vm.vmid, gpa, entry.level)
                else:
                    return entry
            pte, level = vm.pt.translate(gpa)
            if pte and (not write or pte & PTE_W):
                self.tlb.fill(vm.vmid, gpa, self._entry(pte, level))
                continue
            if vm.mmio.find(gpa) is None and vm.memslots.find(gpa) is None:
                raise GuestMemoryFault(gpa)
            slot = vm.memslots.find(gpa)
            if write and slot is not None and slot.readonly:
                raise MmioExit(gpa, bytes(data or b""), True)
            page = np.array([gpa & ~(PAGE_SIZE - 1)], dtype=np.uint64)
            if vm.handle_faults(page, write, self) == 0:
                raise DirtyRingFull(self.id)
        raise ModelBug(f"no forward progress on the access at GPA {gpa:#x}")

    def _entry(self, pte: int, level: int) -> TlbEntry:
        size = self.vm.mode.level_size(level)
        hpa = (pte >> PTE_PPN_SHIFT) << PAGE_SHIFT
        backing = HOST_PHYS.owner(hpa)
        if backing is None or hpa + size > backing.hpa_end:
            raise ModelBug(f"leaf PTE {pte:#x} points at HPA {hpa:#x} that no backing holds")
        off = hpa - backing.hpa
        return TlbEntry(backing.mem[off : off + size], bool(pte & PTE_W), level)

    # ------------------------------------------------------------------ bulk
    def touch(
        self,
        gpa: int,
        size: int,
        *,
        write: bool = True,
        stride: int = PAGE_SIZE,
        value: int = TOUCH_PATTERN,
    ) -> U64 | None:
        """Access 8 bytes every ``stride`` bytes of ``[gpa, gpa + size)``, as the selftest
        guests do: write ``value`` or read (the values read are returned)."""
        if stride <= 0 or stride % 8 or gpa % 8:
            raise VmmError("touch needs an 8-byte aligned GPA and a positive stride, multiple of 8")
        gpas = np.arange(gpa, gpa + size, stride, dtype=np.uint64)
        return self.access_many(gpas, write=write, value=value)

    def access_many(self, gpas: U64, *, write: bool, value: int = TOUCH_PATTERN) -> U64 | None:
        """8-byte accesses at each GPA of ``gpas`` (RAM only), in order, in bulk."""
        vm = self.vm
        gpas = np.ascontiguousarray(gpas, dtype=np.uint64)
        if gpas.shape[0] == 0:
            return None if write else np.empty(0, dtype=np.uint64)
        if (gpas & np.uint64(7)).any():
            raise VmmError("bulk accesses must be 8-byte aligned")
        idx = vm.memslots.find_many(gpas)
        if (idx < 0).any():
            raise GuestMemoryFault(
                int(gpas[int(np.argmax(idx < 0))]),
                f"bulk access at GPA {int(gpas[int(np.argmax(idx < 0))]):#x} hits no memslot "
                "(bulk accesses are for RAM; use read/write for MMIO)",
            )
        if write:
            slots = vm.memslots.ordered()
            ro = np.array([s.readonly for s in slots], dtype=np.bool_)[idx]
            if ro.any():
                first = int(gpas[int(np.argmax(ro))])
                raise MmioExit(first, value.to_bytes(8, "little"), True)
        page_mask = np.uint64(~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF)
        for _ in range(_MAX_RETRIES):
            ptes, levels = vm.pt.translate_bulk(gpas)
            need = ptes == 0
            if write:
                need |= (ptes & np.uint64(PTE_W)) == 0
            if not need.any():
                break
            fault_at = np.flatnonzero(need)
            pages_all = gpas[fault_at] & page_mask
            pages, _ = unique_first(pages_all)
            handled = vm.handle_faults(pages, write, self)
            if handled < pages.shape[0]:
                stop_page = pages[handled]
                stop = int(fault_at[int(np.argmax(pages_all == stop_page))])
                if stop:
                    self.access_many(gpas[:stop], write=write, value=value)
                raise DirtyRingFull(self.id, completed=stop)
        else:
            raise ModelBug("bulk access made no forward progress")
        self._fill_bulk(gpas, ptes, levels)
        offset_mask = np.array(
            [vm.mode.level_size(lv) - 1 for lv in range(vm.mode.levels)], dtype=np.uint64
        )[levels]
        hpas = ((ptes >> np.uint64(PTE_PPN_SHIFT)) << np.uint64(PAGE_SHIFT)) + (gpas & offset_mask)
        return _move_data(hpas, write, value)

    def _fill_bulk(self, gpas: U64, ptes: U64, levels: npt.NDArray[np.int8]) -> None:
        vm = self.vm
        tlb = self.tlb
        cap = tlb.capacity
        for level in unique_sorted(levels).tolist():
            sel = levels == level
            shift = vm.mode.shift(level)
            vpns_all = (gpas[sel] >> np.uint64(shift)).astype(np.int64)
            vpns, first = unique_first(vpns_all)
            tlb.check_bulk(vm.vmid, level, vpns)
            keep = first[-cap:]
            lvl_ptes = ptes[sel][keep]
            items = [
                (vpn, self._entry(pte, level))
                for vpn, pte in zip(vpns_all[keep].tolist(), lvl_ptes.tolist(), strict=True)
            ]
            tlb.insert_many(vm.vmid, level, items)


def _move_data(hpas: U64, write: bool, value: int) -> U64 | None:
    out = None if write else np.empty(hpas.shape[0], dtype=np.uint64)
    remaining = np.arange(hpas.shape[0])
    while remaining.size:
        probe = int(hpas[remaining[0]])
        backing: Backing | None = HOST_PHYS.owner(probe)
        if backing is None:
            raise ModelBug(f"HPA {probe:#x} belongs to no backing")
        h = hpas[remaining]
        mine = (h >= np.uint64(backing.hpa)) & (h < np.uint64(backing.hpa_end))
        words = ((h[mine] - np.uint64(backing.hpa)) >> np.uint64(3)).astype(np.int64)
        if write:
            backing.u64[words] = np.uint64(value)
        else:
            assert out is not None
            out[remaining[mine]] = backing.u64[words]
        remaining = remaining[~mine]
    return out
