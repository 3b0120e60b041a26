"""A vCPU's TLB: cached stage-2 translations tagged by VMID and level.

Each level has its own FIFO set (as real TLBs keep separate arrays per page size), keyed by
the virtual page number at that level (``gpa >> shift(level)``). An entry is the host memory
the leaf maps (a ``memoryview`` of the page or block) and whether it is writable, so a hit is
one dict look-up and a slice.

Invalidation comes in the three shapes KVM issues: by address and level (a level hint: only
that level's entry goes, as with arm64's TTL hint or a RISC-V ``hfence.gvma`` with a level),
by range (every level), and by VMID. Filling an entry while an overlapping entry of another
size is still cached is a TLB conflict abort (:class:`~vmm.errors.TlbConflictAbort`): the
failure break-before-make exists to prevent.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .errors import TlbConflictAbort
from .pte import Stage2Mode

__all__ = ["DEFAULT_TLB_ENTRIES", "Tlb", "TlbEntry"]

DEFAULT_TLB_ENTRIES: Final = 1024  # per level, per VMID
_SMALL_RANGE: Final = 64


class TlbEntry(NamedTuple):
    """What a hit needs: the leaf's host memory and its write permission."""

    mem: memoryview
    writable: bool
    level: int


class Tlb:
    """One hart's TLB (per-level FIFO sets, tagged by VMID)."""

    def __init__(self, mode: Stage2Mode, capacity: int = DEFAULT_TLB_ENTRIES) -> None:
        self.mode = mode
        self.capacity = capacity
        self.shifts = [mode.shift(level) for level in range(mode.levels)]
        self._vmids: dict[int, list[dict[int, TlbEntry]]] = {}
        self.fills = 0
        self.flushes = 0

    def sets(self, vmid: int) -> list[dict[int, TlbEntry]]:
        """The per-level dicts of ``vmid`` (created empty on first use)."""
        sets = self._vmids.get(vmid)
        if sets is None:
            sets = [{} for _ in range(self.mode.levels)]
            self._vmids[vmid] = sets
        return sets

    def lookup(self, vmid: int, gpa: int) -> TlbEntry | None:
        for level, d in enumerate(self.sets(vmid)):
            entry = d.get(gpa >> self.shifts[level])
            if entry is not None:
                return entry
        return None

    def __len__(self) -> int:
        return sum(len(d) for sets in self._vmids.values() for d in sets)

    # ------------------------------------------------------------------ fills
    def _conflict(self, vmid: int, sets: list[dict[int, TlbEntry]], level: int, vpn: int) -> None:
        bits = self.mode.index_bits
        for other, d in enumerate(sets):
            if other == level or not d:
                continue
            if other > level:
                if (vpn >> ((other - level) * bits)) in d:
                    raise TlbConflictAbort(vmid, vpn << self.shifts[level], level, other)
            else:
                diff = (level - other) * bits
                if any((k >> diff) == vpn for k in d):
                    raise TlbConflictAbort(vmid, vpn << self.shifts[level], level, other)

    def fill(self, vmid: int, gpa: int, entry: TlbEntry) -> None:
        """Cache a translation found by a page walk (conflict-checked)."""
        sets = self.sets(vmid)
        level = entry.level
        vpn = gpa >> self.shifts[level]
        self._conflict(vmid, sets, level, vpn)
        d = sets[level]
        if vpn not in d and len(d) >= self.capacity:
            del d[next(iter(d))]
        d[vpn] = entry
        self.fills += 1

    def check_bulk(self, vmid: int, level: int, vpns: npt.NDArray[np.int64]) -> None:
        """Conflict check for many fills at ``level`` against what is cached now."""
        sets = self.sets(vmid)
        bits = self.mode.index_bits
        for other, d in enumerate(sets):
            if other == level or not d or vpns.size == 0:
                continue
            keys = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
            if other > level:
                probe = unique_sorted(vpns >> ((other - level) * bits))
                hit = np.isin(probe, keys)
                if hit.any():
                    first = int(probe[np.flatnonzero(hit)[0]]) << ((other - level) * bits)
                    raise TlbConflictAbort(vmid, first << self.shifts[level], level, other)
            else:
                up = keys >> ((level - other) * bits)
                hit = np.isin(up, vpns)
                if hit.any():
                    vpn = int(up[np.flatnonzero(hit)[0]])
                    raise TlbConflictAbort(vmid, vpn << self.shifts[level], level, other)

    def insert_many(self, vmid: int, level: int, items: list[tuple[int, TlbEntry]]) -> None:
        """Insert already conflict-checked entries (the newest ``capacity`` stay)."""
        d = self.sets(vmid)[level]
        for vpn, entry in items[-self.capacity :]:
            if vpn not in d and len(d) >= self.capacity:
                del d[next(iter(d))]
            d[vpn] = entry
        self.fills += len(items)

    # ------------------------------------------------------------------ invalidation
    def flush_addr(self, vmid: int, gpa: int, level: int) -> None:
        """Invalidate the level-``level`` entry for ``gpa`` only (a level-hinted flush)."""
        sets = self._vmids.get(vmid)
        if sets is not None and level < len(sets):
            sets[level].pop(gpa >> self.shifts[level], None)
        self.flushes += 1

    def flush_range(self, vmid: int, gpa: int, size: int) -> None:
        """Invalidate every entry, of any level, that overlaps ``[gpa, gpa + size)``."""
        sets = self._vmids.get(vmid)
        self.flushes += 1
        if sets is None or size <= 0:
            return
        for level, d in enumerate(sets):
            if not d:
                continue
            shift = self.shifts[level]
            lo, hi = gpa >> shift, (gpa + size - 1) >> shift
            if hi - lo < _SMALL_RANGE:
                for vpn in range(lo, hi + 1):
                    d.pop(vpn, None)
            elif lo <= min(d) and max(d) <= hi:
                d.clear()
            else:
                for vpn in [k for k in d if lo <= k <= hi]:
                    del d[vpn]

    def flush_vmid(self, vmid: int) -> None:
        sets = self._vmids.get(vmid)
        if sets is not None:
            for d in sets:
                d.clear()
        self.flushes += 1

    def flush_all(self) -> None:
        for vmid in list(self._vmids):
            self.flush_vmid(vmid)
