"""A vCPU's TLB: cached stage-2 translations tagged by VMID and level.

Each level has its own FIFO set (as real TLBs keep separate arrays per page size), keyed by
the virtual page number at that level (``gpa >> shift(level)``). An entry is the host memory
the leaf maps (a ``memoryview`` of the page or block) and whether it is writable. Each set is
kept as two dicts, vpn -> memoryview: every entry in ``read``, the writable ones also in
``write``. :meth:`Tlb.views` hands those dicts out, so a vCPU's hit is one dict look-up
and a slice, with no object in between.

Invalidation comes in the three shapes KVM issues: by address and level (a level hint: only
that level's entry goes, as with arm64's TTL hint or a RISC-V ``hfence.gvma`` with a level),
by range (every level), and by VMID. Filling an entry while an overlapping entry of another
size is still cached is a TLB conflict abort (:class:`~vmm.errors.TlbConflictAbort`): the
failure break-before-make exists to prevent. A page fill checks the larger levels with one
look-up each; a block fill also scans the smaller levels' entries (block fills are rare).
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .errors import TlbConflictAbort
from .pte import Stage2Mode

__all__ = ["DEFAULT_TLB_ENTRIES", "Tlb", "TlbEntry", "TlbViews"]

DEFAULT_TLB_ENTRIES: Final = 1024  # per level, per VMID
_SMALL_RANGE: Final = 64

#: Per level, vpn -> host memory of the leaf: all entries, and the writable ones.
TlbViews = tuple[list[dict[int, memoryview]], list[dict[int, memoryview]]]


class TlbEntry(NamedTuple):
    """A cached translation: the leaf's host memory, its write permission, its level."""

    mem: memoryview
    writable: bool
    level: int


class _VmidSets:
    """The sets of one VMID: per level, every entry (in fill order: the first is the
    oldest) and the writable ones; and, per level, the sets a fill there must be checked
    against: ``(set, level, vpn shift)`` of the larger and of the smaller levels."""

    __slots__ = ("downs", "read", "ups", "write")

    def __init__(self, levels: int, bits: int) -> None:
        self.read: list[dict[int, memoryview]] = [{} for _ in range(levels)]
        self.write: list[dict[int, memoryview]] = [{} for _ in range(levels)]
        self.ups = [
            [(self.read[up], up, (up - lv) * bits) for up in range(lv + 1, levels)]
            for lv in range(levels)
        ]
        self.downs = [
            [(self.read[down], down, (lv - down) * bits) for down in range(lv - 1, -1, -1)]
            for lv in range(levels)
        ]


class Tlb:
    """One hart's TLB (per-level FIFO sets, tagged by VMID)."""

    def __init__(self, mode: Stage2Mode, capacity: int = DEFAULT_TLB_ENTRIES) -> None:
        self.mode = mode
        self.capacity = capacity
        self.shifts = mode.shifts
        self.levels = mode.levels
        self.bits = mode.index_bits
        self._vmids: dict[int, _VmidSets] = {}
        self.fills = 0
        self.flushes = 0

    def _sets(self, vmid: int) -> _VmidSets:
        sets = self._vmids.get(vmid)
        if sets is None:
            sets = _VmidSets(self.levels, self.bits)
            self._vmids[vmid] = sets
        return sets

    def views(self, vmid: int) -> TlbViews:
        """``(read, write)``: per level, vpn -> memoryview of every entry / of the writable
        ones. The dicts are live (fills and flushes update them in place): a vCPU keeps them
        for its fast path."""
        sets = self._sets(vmid)
        return sets.read, sets.write

    def lookup(self, vmid: int, gpa: int) -> TlbEntry | None:
        """The cached translation of ``gpa``, smallest level first (None on a miss)."""
        sets = self._vmids.get(vmid)
        if sets is None:
            return None
        for level, d in enumerate(sets.read):
            vpn = gpa >> self.shifts[level]
            mem = d.get(vpn)
            if mem is not None:
                return TlbEntry(mem, vpn in sets.write[level], level)
        return None

    def __len__(self) -> int:
        return sum(len(d) for sets in self._vmids.values() for d in sets.read)

    # ------------------------------------------------------------------ fills
    def _conflict(self, vmid: int, sets: _VmidSets, level: int, vpn: int) -> None:
        for cached, up, diff in sets.ups[level]:
            if vpn >> diff in cached:
                raise TlbConflictAbort(vmid, vpn << self.shifts[level], level, up)
        for cached, down, diff in sets.downs[level]:
            if cached and any((k >> diff) == vpn for k in cached):
                raise TlbConflictAbort(vmid, vpn << self.shifts[level], level, down)

    def fill_leaf(self, vmid: int, gpa: int, mem: memoryview, writable: bool, level: int) -> None:
        """Cache the translation of a leaf found by a page walk (conflict-checked): its host
        memory ``mem``, its write permission and its level."""
        sets = self._vmids.get(vmid) or self._sets(vmid)
        vpn = gpa >> self.shifts[level]
        self._conflict(vmid, sets, level, vpn)
        read = sets.read[level]
        write = sets.write[level]
        if vpn not in read and len(read) >= self.capacity:
            oldest = next(iter(read))  # FIFO: the oldest entry goes
            del read[oldest]
            write.pop(oldest, None)
        read[vpn] = mem
        if writable:
            write[vpn] = mem
        else:
            write.pop(vpn, None)
        self.fills += 1

    def fill(self, vmid: int, gpa: int, entry: TlbEntry) -> None:
        """Cache a translation found by a page walk (conflict-checked)."""
        self.fill_leaf(vmid, gpa, entry.mem, entry.writable, entry.level)

    def check_bulk(self, vmid: int, level: int, vpns: npt.NDArray[np.int64]) -> None:
        """Conflict check for many fills at ``level`` against what is cached now."""
        sets = self._sets(vmid)
        if vpns.size == 0:
            return
        bits = self.bits
        for up in range(level + 1, self.levels):
            d = sets.read[up]
            if not d:
                continue
            keys = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
            probe = unique_sorted(vpns >> ((up - level) * bits))
            hit = np.isin(probe, keys)
            if hit.any():
                first = int(probe[np.flatnonzero(hit)[0]]) << ((up - level) * bits)
                raise TlbConflictAbort(vmid, first << self.shifts[level], level, up)
        keys_vpns = unique_sorted(vpns)
        for down in range(level - 1, -1, -1):
            d = sets.read[down]
            if not d:
                continue
            keys = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
            parents = keys >> ((level - down) * bits)
            hit = np.isin(parents, keys_vpns)
            if hit.any():
                vpn = int(parents[np.flatnonzero(hit)[0]])
                raise TlbConflictAbort(vmid, vpn << self.shifts[level], level, down)

    def insert_many(self, vmid: int, level: int, items: list[tuple[int, TlbEntry]]) -> None:
        """Insert already conflict-checked entries (the newest ``capacity`` stay)."""
        sets = self._sets(vmid)
        read = sets.read[level]
        write = sets.write[level]
        for vpn, entry in items[-self.capacity :]:
            if vpn in read:
                del read[vpn]  # re-inserted: it becomes the newest
            elif len(read) >= self.capacity:
                oldest = next(iter(read))
                del read[oldest]
                write.pop(oldest, None)
            read[vpn] = entry.mem
            if entry.writable:
                write[vpn] = entry.mem
            else:
                write.pop(vpn, None)
        self.fills += len(items)

    # ------------------------------------------------------------------ invalidation
    def flush_addr(self, vmid: int, gpa: int, level: int) -> None:
        """Invalidate the level-``level`` entry for ``gpa`` only (a level-hinted flush)."""
        sets = self._vmids.get(vmid)
        if sets is not None and level < self.levels:
            vpn = gpa >> self.shifts[level]
            sets.read[level].pop(vpn, None)
            sets.write[level].pop(vpn, None)
        self.flushes += 1

    def flush_range(self, vmid: int, gpa: int, size: int) -> None:
        """Invalidate every entry, of any level, that overlaps ``[gpa, gpa + size)``."""
        sets = self._vmids.get(vmid)
        self.flushes += 1
        if sets is None or size <= 0:
            return
        for level, read in enumerate(sets.read):
            if not read:
                continue
            write = sets.write[level]
            shift = self.shifts[level]
            lo, hi = gpa >> shift, (gpa + size - 1) >> shift
            if hi - lo < _SMALL_RANGE:
                for vpn in range(lo, hi + 1):
                    read.pop(vpn, None)
                    write.pop(vpn, None)
            elif lo <= min(read) and max(read) <= hi:
                read.clear()
                write.clear()
            else:
                for vpn in [k for k in read if lo <= k <= hi]:
                    del read[vpn]
                    write.pop(vpn, None)

    def flush_vmid(self, vmid: int) -> None:
        """Invalidate every entry of ``vmid``."""
        sets = self._vmids.get(vmid)
        if sets is not None:
            for group in (sets.read, sets.write):
                for d in group:
                    d.clear()
        self.flushes += 1
