"""A vCPU: guest accesses through TLB -> stage-2 walk -> fault handler -> retry.

:meth:`Vcpu.read` / :meth:`Vcpu.write` and the fixed-width :meth:`Vcpu.read64` /
:meth:`Vcpu.write64` (and 32-bit forms) are the per-access path. A TLB hit is one dict
look-up in the TLB's own per-level dicts (:meth:`vmm.tlb.Tlb.views`: 4K pages first, then
the next level's blocks) and one slice or ``struct`` store into the leaf's host memory; an
aligned 64-bit access to a 4K page is one look-up in the TLB's word views
(:meth:`vmm.tlb.Tlb.word_views`) and one item store. A miss walks the stage-2 table like
the hart's page walker, fills the TLB (conflict-checked) or faults to the VM's handler and
retries (reading back the leaf the fault made). MMIO regions dispatch to their device; a
write to a READONLY slot raises :class:`~vmm.errors.MmioExit` as KVM exits to userspace.

:meth:`Vcpu.touch` / :meth:`Vcpu.access_many` are the bulk path the page-table benchmark
needs (every page of a 1 GiB region): the same semantics done with vector operations, the
translation of all addresses at once, the faults handled in one batch, the retry walked
again, the TLB filled with the newest translations and the data moved with numpy.

The vCPU sees its VM through :class:`VcpuHost` (what it uses of :class:`vmm.vm.Vm`), so this
module does not import the VM.
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from ._arrays import unique_first, unique_sorted
from .dirty import DirtyRing
from .errors import DirtyRingFull, GuestMemoryFault, MmioExit, ModelBug, VmmError
from .memory import HOST_PHYS, Backing
from .memslot import MemslotTable
from .mmio import MmioBus, MmioHandler
from .pte import PAGE_SHIFT, PAGE_SIZE, PTE_PPN_SHIFT, PTE_W, Stage2Mode
from .stage2 import Stage2PageTable
from .tlb import Tlb, TlbEntry

__all__ = ["TOUCH_PATTERN", "Vcpu", "VcpuHost"]

TOUCH_PATTERN: Final = 0x0123456789ABCDEF
_MAX_RETRIES: Final = 8
_PAGE_MASK: Final = PAGE_SIZE - 1
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_U32: Final = 0xFFFF_FFFF
_Q: Final = struct.Struct("<Q")
#: what a 64-bit store passes as its data when it resolves its leaf (the walk only needs
#: to know it is a write; an MMIO exit is raised again with the real bytes)
_WORD: Final = bytes(8)
_I: Final = struct.Struct("<I")
U64 = npt.NDArray[np.uint64]
_NO_BACKING: Final = Backing(bytearray(PAGE_SIZE), PAGE_SIZE, PAGE_SIZE, "none")


class VcpuHost(Protocol):
    """What a vCPU uses of its VM."""

    mode: Stage2Mode
    vmid: int
    tlb_entries: int
    mmio: MmioBus
    memslots: MemslotTable

    @property
    def pt(self) -> Stage2PageTable: ...

    def handle_faults(self, pages: U64, write: bool, vcpu: Vcpu | None = None) -> int: ...

    def handle_fault(self, gpa: int, write: bool, vcpu: Vcpu | None = None) -> int: ...


class Vcpu:
    """One vCPU of a :class:`~vmm.vm.Vm`."""

    def __init__(self, vm: VcpuHost, vcpu_id: int, dirty_ring: DirtyRing | None = None) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.tlb = Tlb(vm.mode, vm.tlb_entries)
        self._vmid = vm.vmid
        read, write = self.tlb.views(vm.vmid)
        read_words, write_words = self.tlb.word_views(vm.vmid)
        # level 0 (4K pages) and level 1 (2M, or 4M on Sv32x4): the hits the fast paths see
        self._r0, self._w0 = read[0], write[0]
        self._r1, self._w1 = read[1], write[1]
        self._rq0, self._wq0 = read_words[0], write_words[0]
        self._rq1, self._wq1 = read_words[1], write_words[1]
        self._shift1 = vm.mode.shift(1)
        self._mask1 = (1 << self._shift1) - 1
        #: an 8-byte aligned GPA's key in the level-1 word views (see vmm.tlb)
        self._word_key1 = ~(self._mask1 & ~7)
        self.dirty_ring = dirty_ring
        self.mmio_reads = 0
        self.mmio_writes = 0
        #: guest page -> (start, end, handler) of the MMIO region seen there last: the
        #: fast dispatch of read32/write32
        self._mmio_pages: dict[int, tuple[int, int, MmioHandler]] = {}
        self._shifts = vm.mode.shifts
        self._read_sets, self._write_sets = read, write
        #: the TLB's dicts of blocks (levels 1 and up): is any block cached at all?
        self._block_sets = read[1:]
        self._sets_by_level = [
            (level, read[level], write[level], shift) for level, shift in enumerate(self._shifts)
        ]
        #: the backing the last TLB fill came from (most fills hit the same one)
        self._backing: Backing = _NO_BACKING
        self._backing_hpa = _NO_BACKING.hpa
        # the hart's walk of its VM's stage-2 table, the VM's fault handler, the TLB fill
        self._pt = vm.pt
        self._translate = vm.pt.translate
        self._fault = vm.handle_fault
        self._fillers = [self.tlb.filler(vm.vmid, level) for level in range(vm.mode.levels)]
        self._mmio_find = vm.mmio.find
        self._pack_q = _Q.pack_into
        self._unpack_q = _Q.unpack_from

    # ------------------------------------------------------------------ per access
    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at ``gpa`` as the guest sees them."""
        mem = self._r0.get(gpa >> PAGE_SHIFT)
        if mem is not None:
            off = gpa & _PAGE_MASK
            if 0 <= n <= PAGE_SIZE - off:
                return mem[off : off + n].tobytes()
        else:
            mem = self._r1.get(gpa >> self._shift1)
            if mem is not None:
                off = gpa & self._mask1
                if 0 <= n <= len(mem) - off:
                    return mem[off : off + n].tobytes()
        return self._access(gpa, n, None)

    def read_into(self, gpa: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` (writable, bytes format) with the ``len(buffer)`` bytes at ``gpa``:
        :meth:`read` without a new ``bytes`` object per access, for a driver that copies
        into a buffer it reuses. Same translation, faults and MMIO dispatch as :meth:`read`."""
        n = len(buffer)
        mem = self._r0.get(gpa >> PAGE_SHIFT)
        if mem is not None:
            off = gpa & _PAGE_MASK
            if n <= PAGE_SIZE - off:
                buffer[:] = mem[off : off + n]
                return
        else:
            mem = self._r1.get(gpa >> self._shift1)
            if mem is not None:
                off = gpa & self._mask1
                if n <= len(mem) - off:
                    buffer[:] = mem[off : off + n]
                    return
        self._read_leaves_into(gpa, memoryview(buffer).cast("B"))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa``."""
        mem = self._w0.get(gpa >> PAGE_SHIFT)
        if mem is not None:
            off = gpa & _PAGE_MASK
            n = len(data)
            if n <= PAGE_SIZE - off:
                mem[off : off + n] = data
                return
        else:
            mem = self._w1.get(gpa >> self._shift1)
            if mem is not None:
                off = gpa & self._mask1
                n = len(data)
                if n <= len(mem) - off:
                    mem[off : off + n] = data
                    return
        self._access(gpa, len(data), data)

    # The fixed-width accesses: an 8-byte aligned access to a cached 4K page is one look-up
    # in the TLB's word views (keyed so that a misaligned GPA misses: see vmm.tlb) and one
    # item access; ``-4089`` is ``~0xFF8`` and 4095 the page mask, spelled as literals
    # because constants cost less than global look-ups on the hottest path. Anything else
    # (a block, a page without its word view yet, a misaligned GPA, a value to wrap, a
    # miss) takes the slow path.
    def read64(self, gpa: int) -> int:
        """A 64-bit little-endian load."""
        try:
            return self._rq0[gpa & -4089][(gpa & 4095) >> 3]
        except KeyError:
            return self._load64(gpa)

    def write64(self, gpa: int, value: int) -> None:
        """A 64-bit little-endian store (``value`` taken modulo 2**64)."""
        try:
            self._wq0[gpa & -4089][(gpa & 4095) >> 3] = value
        except (KeyError, ValueError):
            self._store64(gpa, value & _U64)

    def _words(self, gpa: int, write: bool) -> memoryview | None:
        """The word view of the cached 4K page or block holding the aligned ``gpa`` (made
        on the entry's first 64-bit access), None if neither level caches it. (A cached
        entry is memory: MMIO regions never reach the TLB.)"""
        words = (self._wq1 if write else self._rq1).get(gpa & self._word_key1)
        if words is None:
            if gpa >> 12 in (self._w0 if write else self._r0):
                return self.tlb.words(self._vmid, gpa, 0, write)
            if gpa >> self._shift1 in (self._w1 if write else self._r1):
                return self.tlb.words(self._vmid, gpa, 1, write)
        return words

    def _load64(self, gpa: int) -> int:
        """:meth:`read64` off the fast path."""
        if not gpa & 7:
            words = self._words(gpa, False)
            if words is not None:
                return words[(gpa & (len(words) * 8 - 1)) >> 3]
            if gpa >= 0 and self._mmio_find(gpa) is None:
                mem = self._resolve(gpa, None)
                return self._unpack_q(mem, gpa & (len(mem) - 1))[0]  # type: ignore[no-any-return]
        return int.from_bytes(self._access(gpa, 8, None), "little")

    def _store64(self, gpa: int, value: int) -> None:
        """:meth:`write64` off the fast path (``value`` already wrapped). With only 4K pages
        cached (no block entry at any level), the look-ups :meth:`_resolve` would do are
        the page's: its word view is made, or its read-only entry dropped (a permission
        fault), or it is a miss; then the walk."""
        if not gpa & 7:
            blocks = any(self._block_sets)
            if blocks:
                words = self._words(gpa, True)
            elif gpa >> 12 in self._w0:
                words = self.tlb.words(self._vmid, gpa, 0, True)
            else:
                words = None
            if words is not None:
                words[(gpa & (len(words) * 8 - 1)) >> 3] = value
                return
            if gpa >= 0 and self._mmio_find(gpa) is None:
                resolve = self._resolve if blocks else self._walk
                if not blocks and gpa >> 12 in self._r0:  # read-only: drop it and walk
                    self.tlb.flush_addr(self._vmid, gpa, 0)
                try:
                    mem = resolve(gpa, _WORD)
                except MmioExit:
                    raise MmioExit(gpa, value.to_bytes(8, "little"), True) from None
                self._pack_q(mem, gpa & (len(mem) - 1), value)
                return
        self._access(gpa, 8, value.to_bytes(8, "little"))

    def read32(self, gpa: int) -> int:
        """A 32-bit load (a device register through MMIO dispatch, or memory)."""
        hit = self._mmio_pages.get(gpa >> 12)
        if hit is not None:
            base, end, handler = hit
            if base <= gpa <= end - 4:
                self.mmio_reads += 1
                return handler.mmio_read(gpa - base, 4) & 0xFFFF_FFFF
        mem = self._r0.get(gpa >> 12)
        if mem is not None:
            try:
                return _I.unpack_from(mem, gpa & 4095)[0]  # type: ignore[no-any-return]
            except struct.error:
                pass
        return int.from_bytes(self.read(gpa, 4), "little")

    def write32(self, gpa: int, value: int) -> None:
        """A 32-bit store; a device register (a doorbell) is one look-up and one call."""
        hit = self._mmio_pages.get(gpa >> 12)
        if hit is not None:
            base, end, handler = hit
            if base <= gpa <= end - 4:
                self.mmio_writes += 1
                handler.mmio_write(gpa - base, 4, value & 0xFFFF_FFFF)
                return
        self.write(gpa, (value & _U32).to_bytes(4, "little"))

    def forget_mmio(self) -> None:
        """Drop the MMIO dispatch cache (the VM calls this when a region goes away)."""
        self._mmio_pages.clear()

    # ------------------------------------------------------------------ slow path
    def _access(self, gpa: int, n: int, data: bytes | bytearray | memoryview | None) -> bytes:
        """MMIO dispatch, or memory leaf by leaf (a 2M block is one slice)."""
        if n < 0 or gpa < 0:
            raise VmmError(f"bad guest access: {n} bytes at {gpa:#x}")
        if n == 0:
            return b""
        mmio = self.vm.mmio
        region = mmio.find(gpa)
        if region is not None:
            self._mmio_pages[gpa >> PAGE_SHIFT] = (region.gpa, region.end, region.handler)
            if data is None:
                self.mmio_reads += 1
                return mmio.read(region, gpa, n).to_bytes(n, "little")
            self.mmio_writes += 1
            mmio.write(region, gpa, n, int.from_bytes(data, "little"))
            return b""
        if data is None:
            out = bytearray(n)
            self._read_leaves_into(gpa, memoryview(out))
            return bytes(out)
        mem = self._resolve(gpa, data)
        off = gpa & (len(mem) - 1)
        if n <= len(mem) - off:  # one leaf: the usual case
            mem[off : off + n] = data
            return b""
        source = memoryview(data).cast("B")
        pos = 0
        while pos < n:
            addr = gpa + pos
            mem = self._resolve(addr, source[pos:]) if pos else mem
            off = addr & (len(mem) - 1)
            chunk = min(n - pos, len(mem) - off)
            mem[off : off + chunk] = source[pos : pos + chunk]
            pos += chunk
        return b""

    def _read_leaves_into(self, gpa: int, out: memoryview) -> None:
        """Reads that miss the fast path: MMIO dispatch, or memory leaf by leaf."""
        n = len(out)
        if n == 0:
            return
        if gpa < 0 or self.vm.mmio.find(gpa) is not None:
            out[:] = self._access(gpa, n, None)
            return
        pos = 0
        while pos < n:
            addr = gpa + pos
            mem = self._resolve(addr, None)
            off = addr & (len(mem) - 1)
            chunk = min(n - pos, len(mem) - off)
            out[pos : pos + chunk] = mem[off : off + chunk]
            pos += chunk

    def _resolve(self, gpa: int, data: bytes | bytearray | memoryview | None) -> memoryview:
        """The host memory of the leaf that maps ``gpa`` for this access (a read if
        ``data`` is None): a TLB hit at any level, or :meth:`_walk`. ``data`` is the rest
        of the write, for an MMIO exit."""
        write = data is not None
        for level, read_set, write_set, shift in self._sets_by_level:
            if read_set:
                vpn = gpa >> shift
                mem = read_set.get(vpn)
                if mem is not None:
                    if not write or vpn in write_set:
                        return mem
                    # A cached read-only entry: a permission fault. Drop it and walk.
                    self.tlb.flush_addr(self._vmid, gpa, level)
                    break
        return self._walk(gpa, data)

    def _walk(self, gpa: int, data: bytes | bytearray | memoryview | None) -> memoryview:
        """A TLB miss for this access (a read if ``data`` is None): walk the stage-2 table,
        fault to the VM and walk again as needed, fill the TLB. When the fault made the
        leaf in place (:attr:`~vmm.stage2.Stage2PageTable.made`), the retry reads that
        entry, where its walk would end, instead of descending again."""
        write = data is not None
        pte, level = self._translate(gpa)
        if not pte or (write and not pte & PTE_W):
            pte, level = self._fault_and_walk(gpa, data)
        mem = self._leaf_memory(pte, level)
        self._fillers[level](gpa, mem, bool(pte & PTE_W))
        return mem

    def _fault_and_walk(
        self, gpa: int, data: bytes | bytearray | memoryview | None
    ) -> tuple[int, int]:
        """Fault to the VM until the walk finds a leaf that allows the access."""
        write = data is not None
        pt = self._pt
        for _ in range(_MAX_RETRIES):
            try:
                handled = self._fault(gpa, write, self)
            except MmioExit:
                assert data is not None
                raise MmioExit(gpa, bytes(data), True) from None
            if handled == 0:
                raise DirtyRingFull(self.id)
            made = pt.made
            if made is not None and gpa >> made[1] == made[0]:
                pt.made = None  # (a valid leaf: set_leaf just wrote it)
                pte, level = pt.pool.words[made[2]], made[3]
            else:
                pte, level = self._translate(gpa)
            if pte and (not write or pte & PTE_W):
                return pte, level
        raise ModelBug(f"no forward progress on the access at GPA {gpa:#x}")

    def _leaf_memory(self, pte: int, level: int) -> memoryview:
        """The host memory a leaf maps (what a TLB entry holds)."""
        size = 1 << self._shifts[level]
        off = ((pte >> PTE_PPN_SHIFT) << PAGE_SHIFT) - self._backing_hpa
        backing = self._backing
        if off < 0 or off + size > backing.size or not backing.live:
            hpa = (pte >> PTE_PPN_SHIFT) << PAGE_SHIFT
            found = HOST_PHYS.owner(hpa)
            if found is None or hpa + size > found.hpa_end:
                raise ModelBug(f"leaf PTE {pte:#x} points at HPA {hpa:#x} that no backing holds")
            self._backing = backing = found
            self._backing_hpa = found.hpa
            off = hpa - found.hpa
        return backing.mem[off : off + size]

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
            first = int(gpas[int(np.argmax(idx < 0))])
            raise GuestMemoryFault(
                first,
                f"bulk access at GPA {first:#x} hits no memslot "
                "(bulk accesses are for RAM; use read/write for MMIO)",
            )
        if write:
            slots = vm.memslots.ordered()
            ro = np.array([s.readonly for s in slots], dtype=np.bool_)[idx]
            if ro.any():
                first = int(gpas[int(np.argmax(ro))])
                raise MmioExit(first, (value & _U64).to_bytes(8, "little"), True)
        page_mask = np.uint64(~_PAGE_MASK & _U64)
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
        offset_mask = np.array([(1 << s) - 1 for s in vm.mode.shifts], dtype=np.uint64)[levels]
        hpas = ((ptes >> np.uint64(PTE_PPN_SHIFT)) << np.uint64(PAGE_SHIFT)) + (gpas & offset_mask)
        return _move_data(hpas, write, value)

    def _fill_bulk(self, gpas: U64, ptes: U64, levels: npt.NDArray[np.int8]) -> None:
        vm = self.vm
        tlb = self.tlb
        cap = tlb.capacity
        for level in unique_sorted(levels).tolist():
            sel = levels == level
            shift = vm.mode.shifts[level]
            vpns_all = (gpas[sel] >> np.uint64(shift)).astype(np.int64)
            vpns, first = unique_first(vpns_all)
            tlb.check_bulk(vm.vmid, level, vpns)
            keep = first[-cap:]
            lvl_ptes = ptes[sel][keep]
            items = [
                (vpn, TlbEntry(self._leaf_memory(pte, level), bool(pte & PTE_W), level))
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
            backing.u64[words] = np.uint64(value & _U64)
        else:
            assert out is not None
            out[remaining[mine]] = backing.u64[words]
        remaining = remaining[~mine]
    return out
