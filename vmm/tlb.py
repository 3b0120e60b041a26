"""A vCPU's TLB: cached stage-2 translations tagged by VMID and level.

Each level has its own FIFO set (as real TLBs keep separate arrays per page size), keyed by
the virtual page number at that level (``gpa >> shift(level)``). An entry is the host memory
the leaf maps (a ``memoryview`` of the page or block) and whether it is writable. Each set is
kept as dicts a vCPU reads directly (:meth:`Tlb.views`, :meth:`Tlb.word_views`), so a hit is
one dict look-up and one store, with no object in between:

* vpn -> the leaf's bytes: every entry in ``read``, the writable ones also in ``write``;
* the same entries seen as little-endian 64-bit words (``memoryview.cast("Q")``, on a
  little-endian host), made on an entry's first 64-bit access (:meth:`Tlb.words`) and
  keyed by the leaf's GPA (``vpn << shift``): a 64-bit access at an 8-byte aligned ``gpa``
  finds its leaf at ``gpa & ~(size - 8)`` and its word at ``(gpa & (size - 1)) >> 3``; a
  misaligned ``gpa`` keeps low bits in that key, so it misses.

Eviction is FIFO: the oldest entry of the level goes when a new one would exceed the
capacity. The fill order is kept in a deque beside the dicts (an entry flushed and filled
again is queued again; its stale slot is skipped when it comes up), so evicting is O(1),
not a scan over the dict's deleted slots.

Invalidation comes in the three shapes KVM issues: by address and level (a level hint: only
that level's entry goes, as with arm64's TTL hint or a RISC-V ``hfence.gvma`` with a level),
by range (every level), and by VMID. Filling an entry while an overlapping entry of another
size is still cached is a TLB conflict abort (:class:`~vmm.errors.TlbConflictAbort`): the
failure break-before-make exists to prevent. A page fill checks the larger levels with one
look-up each; a block fill also scans the smaller levels' entries (block fills are rare).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .errors import TlbConflictAbort
from .pte import Stage2Mode

__all__ = ["DEFAULT_TLB_ENTRIES", "Tlb", "TlbEntry", "TlbViews"]

DEFAULT_TLB_ENTRIES: Final = 1024  # per level, per VMID
_SMALL_RANGE: Final = 64
#: ``memoryview.cast("Q")`` reads native words: the word views exist on little-endian hosts.
WORD_VIEWS: Final = sys.byteorder == "little"

#: Per level, vpn -> host memory of the leaf: all entries, and the writable ones.
TlbViews = tuple[list[dict[int, memoryview]], list[dict[int, memoryview]]]


class TlbEntry(NamedTuple):
    """A cached translation: the leaf's host memory, its write permission, its level."""

    mem: memoryview
    writable: bool
    level: int


class _Level:
    """One level's set of one VMID: the dicts a vCPU reads and the FIFO order.

    ``order`` holds vpns in fill order. An entry dropped before its turn (a flush, or a
    re-insertion that makes it the newest) leaves its slot behind, counted in ``stale``;
    since a vpn's stale slots are older than its live one, the oldest live entry is the
    first slot whose vpn has no stale count left."""

    __slots__ = (
        "capacity", "downs", "fills", "level", "order", "queue_limit", "read", "read_words",
        "shift", "stale", "up_reads", "ups", "vmid", "write", "write_words",
    )  # fmt: skip

    def __init__(self, vmid: int, level: int, shift: int, capacity: int) -> None:
        self.vmid = vmid
        self.level = level
        self.shift = shift
        self.capacity = capacity
        #: queue slots (live and stale) the level may hold before it is compacted
        self.queue_limit = 2 * capacity + _SMALL_RANGE
        self.fills = 0
        #: the sets a fill here is checked against: ``(dict, level, vpn shift)`` of the
        #: larger levels (and their dicts alone) and of the smaller ones (set by _VmidSets)
        self.ups: list[tuple[dict[int, memoryview], int, int]] = []
        self.up_reads: list[dict[int, memoryview]] = []
        self.downs: list[tuple[dict[int, memoryview], int, int]] = []
        self.read: dict[int, memoryview] = {}
        self.write: dict[int, memoryview] = {}
        self.read_words: dict[int, memoryview] = {}
        self.write_words: dict[int, memoryview] = {}
        self.order: deque[int] = deque()
        self.stale: dict[int, int] = {}

    def fill(self, gpa: int, mem: memoryview, writable: bool) -> None:
        """:meth:`Tlb.fill_leaf` at this level (every TLB miss comes here: the conflict
        check, the eviction and the store are written out in place). An entry already
        cached for that page keeps its place in the FIFO order."""
        vpn = gpa >> self.shift
        if any(self.up_reads):
            for cached, up, diff in self.ups:
                if vpn >> diff in cached:
                    raise TlbConflictAbort(self.vmid, vpn << self.shift, self.level, up)
        if self.level:
            for cached, down, diff in self.downs:
                if cached and any((k >> diff) == vpn for k in cached):
                    raise TlbConflictAbort(self.vmid, vpn << self.shift, self.level, down)
        read, write = self.read, self.write
        if vpn not in read:
            order = self.order
            if len(read) >= self.capacity:
                if self.stale:
                    self.evict_oldest()
                else:  # the usual eviction: the oldest slot is live
                    oldest = order.popleft()
                    del read[oldest]
                    write.pop(oldest, None)
                    words = self.read_words
                    if words and words.pop(oldest << self.shift, None) is not None:
                        self.write_words.pop(oldest << self.shift, None)
            elif len(order) >= self.queue_limit:
                self.compact()
                order = self.order
            order.append(vpn)
        read[vpn] = mem
        if writable:
            write[vpn] = mem
        else:
            write.pop(vpn, None)
        if self.read_words and self.read_words.pop(vpn << self.shift, None) is not None:
            self.write_words.pop(vpn << self.shift, None)
        self.fills += 1

    def put(self, vpn: int, mem: memoryview, writable: bool) -> None:
        """Store an entry (its FIFO slot is the caller's business). Its word views, if it
        had any, are dropped: :meth:`words` makes them again on demand."""
        self.read[vpn] = mem
        if writable:
            self.write[vpn] = mem
        else:
            self.write.pop(vpn, None)
        key = vpn << self.shift
        if self.read_words.pop(key, None) is not None:
            self.write_words.pop(key, None)

    def words(self, vpn: int, write: bool) -> memoryview | None:
        """The entry of ``vpn`` as 64-bit words (made and cached on first use), if it is
        cached (and writable, for a ``write``)."""
        mem = (self.write if write else self.read).get(vpn)
        if mem is None or not WORD_VIEWS:
            return None
        key = vpn << self.shift
        words = self.read_words.get(key)
        if words is None:
            words = self.read_words[key] = mem.cast("Q")
            if vpn in self.write:
                self.write_words[key] = words
        return words

    def drop(self, vpn: int) -> None:
        """Forget ``vpn``'s entry (its FIFO slot goes stale)."""
        if self.read.pop(vpn, None) is not None:
            self.write.pop(vpn, None)
            if self.read_words:
                key = vpn << self.shift
                if self.read_words.pop(key, None) is not None:
                    self.write_words.pop(key, None)
            self.stale[vpn] = self.stale.get(vpn, 0) + 1

    def evict_oldest(self) -> None:
        """Drop the entry filled longest ago."""
        order, stale, read = self.order, self.stale, self.read
        while order:
            vpn = order.popleft()
            if stale:
                left = stale.get(vpn)
                if left:
                    if left == 1:
                        del stale[vpn]
                    else:
                        stale[vpn] = left - 1
                    continue
            del read[vpn]
            self.write.pop(vpn, None)
            if self.read_words:
                key = vpn << self.shift
                if self.read_words.pop(key, None) is not None:
                    self.write_words.pop(key, None)
            return

    def compact(self) -> None:
        """Rebuild the order from the dict's (fill order, live entries only)."""
        self.order = deque(self.read)
        self.stale.clear()

    def clear(self) -> None:
        for d in (self.read, self.write, self.read_words, self.write_words):
            d.clear()
        self.order.clear()
        self.stale.clear()


class _VmidSets:
    """The sets of one VMID: per level, a :class:`_Level`; and, per level, the sets a fill
    there must be checked against: ``(dict, level, vpn shift)`` of the larger and of the
    smaller levels."""

    __slots__ = ("downs", "levels", "read", "read_words", "ups", "write", "write_words")

    def __init__(self, vmid: int, shifts: tuple[int, ...], bits: int, capacity: int) -> None:
        count = len(shifts)
        self.levels = [_Level(vmid, lv, shift, capacity) for lv, shift in enumerate(shifts)]
        self.read = [lv.read for lv in self.levels]
        self.write = [lv.write for lv in self.levels]
        self.read_words = [lv.read_words for lv in self.levels]
        self.write_words = [lv.write_words for lv in self.levels]
        self.ups = [
            [(self.read[up], up, (up - lv) * bits) for up in range(lv + 1, count)]
            for lv in range(count)
        ]
        self.downs = [
            [(self.read[down], down, (lv - down) * bits) for down in range(lv - 1, -1, -1)]
            for lv in range(count)
        ]
        for level in self.levels:
            level.ups = self.ups[level.level]
            level.up_reads = [cached for cached, _up, _diff in level.ups]
            level.downs = self.downs[level.level]


class Tlb:
    """One hart's TLB (per-level FIFO sets, tagged by VMID)."""

    def __init__(self, mode: Stage2Mode, capacity: int = DEFAULT_TLB_ENTRIES) -> None:
        self.mode = mode
        self.capacity = capacity
        self.shifts = mode.shifts
        self.levels = mode.levels
        self.bits = mode.index_bits
        self._vmids: dict[int, _VmidSets] = {}
        self.flushes = 0

    def _sets(self, vmid: int) -> _VmidSets:
        sets = self._vmids.get(vmid)
        if sets is None:
            sets = _VmidSets(vmid, tuple(self.shifts), self.bits, self.capacity)
            self._vmids[vmid] = sets
        return sets

    def views(self, vmid: int) -> TlbViews:
        """``(read, write)``: per level, vpn -> memoryview of every entry / of the writable
        ones. The dicts are live (fills and flushes update them in place): a vCPU keeps them
        for its fast path."""
        sets = self._sets(vmid)
        return sets.read, sets.write

    def word_views(self, vmid: int) -> TlbViews:
        """``(read, write)``: per level, the leaf's GPA -> the leaf as little-endian 64-bit
        words (``memoryview`` format ``Q``), every entry / the writable ones; live, as
        :meth:`views`. Empty on a big-endian host."""
        sets = self._sets(vmid)
        return sets.read_words, sets.write_words

    def words(self, vmid: int, gpa: int, level: int, write: bool) -> memoryview | None:
        """The cached level-``level`` entry holding ``gpa`` as 64-bit words (None if it is
        not cached, or not writable for a ``write``); it then sits in :meth:`word_views`."""
        sets = self._vmids.get(vmid)
        if sets is None:
            return None
        lv = sets.levels[level]
        return lv.words(gpa >> lv.shift, write)

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
    @property
    def fills(self) -> int:
        """Entries filled so far (every level, every VMID)."""
        return sum(lv.fills for sets in self._vmids.values() for lv in sets.levels)

    def filler(self, vmid: int, level: int) -> Callable[[int, memoryview, bool], None]:
        """``fill(gpa, mem, writable)``: :meth:`fill_leaf` for one VMID and level, bound
        once (a vCPU's miss path)."""
        return self._sets(vmid).levels[level].fill

    def fill_leaf(self, vmid: int, gpa: int, mem: memoryview, writable: bool, level: int) -> None:
        """Cache the translation of a leaf found by a page walk (conflict-checked): its host
        memory ``mem``, its write permission and its level. An entry already cached for
        that page keeps its place in the FIFO order."""
        (self._vmids.get(vmid) or self._sets(vmid)).levels[level].fill(gpa, mem, writable)

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
        lv = self._sets(vmid).levels[level]
        for vpn, entry in items[-self.capacity :]:
            if vpn in lv.read:
                lv.drop(vpn)  # re-inserted: it becomes the newest
            elif len(lv.read) >= self.capacity:
                lv.evict_oldest()
            if len(lv.order) >= lv.queue_limit:
                lv.compact()
            lv.order.append(vpn)
            lv.put(vpn, entry.mem, entry.writable)
        lv.fills += len(items)

    # ------------------------------------------------------------------ invalidation
    def flush_addr(self, vmid: int, gpa: int, level: int) -> None:
        """Invalidate the level-``level`` entry for ``gpa`` only (a level-hinted flush)."""
        sets = self._vmids.get(vmid)
        if sets is not None and 0 <= level < self.levels:
            lv = sets.levels[level]
            lv.drop(gpa >> lv.shift)
        self.flushes += 1

    def flush_range(self, vmid: int, gpa: int, size: int) -> None:
        """Invalidate every entry, of any level, that overlaps ``[gpa, gpa + size)``."""
        sets = self._vmids.get(vmid)
        self.flushes += 1
        if sets is None or size <= 0:
            return
        for lv in sets.levels:
            read = lv.read
            if not read:
                continue
            lo, hi = gpa >> lv.shift, (gpa + size - 1) >> lv.shift
            if hi - lo < _SMALL_RANGE:
                for vpn in range(lo, hi + 1):
                    lv.drop(vpn)
            elif lo <= min(read) and max(read) <= hi:
                lv.clear()
            else:
                for vpn in [k for k in read if lo <= k <= hi]:
                    lv.drop(vpn)

    def flush_vmid(self, vmid: int) -> None:
        """Invalidate every entry of ``vmid``."""
        sets = self._vmids.get(vmid)
        if sets is not None:
            for lv in sets.levels:
                lv.clear()
        self.flushes += 1
