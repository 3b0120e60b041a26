"""The one stage-2 page-table walker, with visitor callbacks (arm64's ``kvm_pgtable_walk``).

The walker visits the tables that cover ``[start, end)`` and tells the visitor where it is
with a :class:`VisitCtx` (arm64's ``kvm_pgtable_visit_ctx``): the table, the entries visited,
their level, the GPA they map, the walk's range and the page allocator (``mm_ops``). In each
table it hands the visitor whole *runs* of non-table entries at once (``ctx.tbl[ctx.i0:ctx.i1]``,
a numpy view), never one PTE at a time, so a visitor acts per entry or in bulk with vector
operations. Table entries are descended into, with optional ``table_pre`` / ``table_post``
callbacks. After a leaf visit the walker reads the entries again, so a visitor that turned
an entry into a table (a map installing the next level, a split) is followed into it.

A walk that meets one entry per level (a fault's map, a get-leaf) takes a scalar path: the
entries are read from the pool's flat word view, with no vector set-up. The context object
is reused from callback to callback of one walk: it is valid only during the callback.

A visitor that sets ``batch_leaf`` also gets, at level 1, every child table that the range
covers entirely in one :meth:`Visitor.leaf_batch` call (row indices into the pool): that is
how a 1 GiB range of 4 KiB leaves is processed in one vector operation instead of 512 calls.
Batched children get no ``table_pre``/``table_post`` calls; the visitor does that work.

The walker knows the table format (:mod:`vmm.pte`) and the page pool (:mod:`vmm.tablepool`);
it knows nothing of the operations, which live in :mod:`vmm.stage2`.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .errors import PageTableError
from .pte import PTE_RWX, PTE_V, Stage2Mode
from .tablepool import TablePagePool

__all__ = ["TABLE_MASK", "PteArray", "VisitCtx", "Visitor", "Walker", "is_table", "runs_of"]

PteArray = npt.NDArray[Any]
#: ``pte & TABLE_MASK == PTE_V``: a valid entry that points to the next-level table.
TABLE_MASK: Final = PTE_V | PTE_RWX


def is_table(pte: int) -> bool:
    """Whether ``pte`` points to a next-level table (valid, R=W=X=0)."""
    return pte & TABLE_MASK == PTE_V


class VisitCtx:
    """Where a callback is: entries ``tbl[i0:i1]`` at ``level`` of the walk of ``[start, end)``.

    The table is ``nent`` words from word ``flat`` of the pool (the x4 root is its four
    pages as one table); :attr:`tbl` is it as a numpy view, :meth:`word`/:meth:`set_word`
    read and write one entry as an int. ``base`` is the GPA entry 0 maps and ``shift``
    log2 of the bytes an entry at ``level`` maps, so entry ``i`` maps :meth:`gpa`.
    """

    __slots__ = ("base", "end", "flat", "i0", "i1", "level", "nent", "pool", "shift", "start")

    def __init__(self, pool: TablePagePool, start: int, end: int) -> None:
        self.pool = pool
        self.start = start
        self.end = end
        self.flat = 0
        self.nent = 0
        self.level = 0
        self.i0 = 0
        self.i1 = 0
        self.base = 0
        self.shift = 0

    def at(self, flat: int, nent: int, level: int, i0: int, i1: int, base: int, shift: int) -> None:
        self.flat = flat
        self.nent = nent
        self.level = level
        self.i0 = i0
        self.i1 = i1
        self.base = base
        self.shift = shift

    @property
    def tbl(self) -> PteArray:
        """The table as a numpy view of its entries."""
        return self.pool.flat[self.flat : self.flat + self.nent]

    def gpa(self, i: int) -> int:
        """The GPA entry ``i`` of the table maps."""
        return self.base + (i << self.shift)

    @property
    def addr(self) -> int:
        """The GPA of the first visited entry."""
        return self.base + (self.i0 << self.shift)

    @property
    def size(self) -> int:
        """Bytes one entry at this level maps."""
        return 1 << self.shift

    def word(self, i: int) -> int:
        """Entry ``i`` of the table as a Python int (a scalar read)."""
        return int(self.pool.words[self.flat + i])

    def set_word(self, i: int, pte: int) -> None:
        """Store entry ``i`` of the table (a scalar write)."""
        self.pool.words[self.flat + i] = pte


class Visitor:
    """Base visitor: override the callbacks an operation needs and set its flags."""

    wants_leaf = True
    wants_table_pre = False
    wants_table_post = False
    batch_leaf = False

    def leaf(self, ctx: VisitCtx) -> None:
        """Entries ``ctx.tbl[ctx.i0:ctx.i1]`` are leaves or invalid."""

    def leaf_batch(
        self,
        ctx: VisitCtx,
        idx: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.int64],
    ) -> None:
        """Level-0 tables ``rows`` (pointed to by ``ctx.tbl[idx]``, a level-1 table, and
        mapping from ``gpas``) lie entirely inside the walk's range."""

    def table_pre(self, ctx: VisitCtx) -> None:
        """``ctx.tbl[ctx.i0]`` points to a table; called before descending (it may replace
        the entry, e.g. with a block: the walker then does not descend)."""

    def table_post(self, ctx: VisitCtx) -> None:
        """``ctx.tbl[ctx.i0]`` pointed to a table whose walk just finished."""


def runs_of(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``(start, stop)`` of every run of True in ``mask``."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


class Walker:
    """Walks one stage-2 table (root row ``root`` of ``pool``) for visitors."""

    def __init__(self, pool: TablePagePool, mode: Stage2Mode, root: int) -> None:
        self.pool = pool
        self.mode = mode
        self.root = root
        self.shifts = mode.shifts
        self.per = mode.entries_per_table
        self.limit = mode.gpa_limit

    def check_range(self, gpa: int, size: int) -> None:
        """Refuse a range outside the mode's guest-physical space."""
        if gpa < 0 or size < 0 or gpa + size > self.limit:
            raise PageTableError(
                f"GPA range [{gpa:#x}, {gpa + size:#x}) is beyond {self.mode.name}'s "
                f"{self.mode.gpa_bits}-bit guest-physical space"
            )

    def walk(self, start: int, end: int, visitor: Visitor) -> None:
        """Visit ``[start, end)``; the range must lie inside the mode's GPA space."""
        if start < 0 or end > self.limit or end < start:
            self.check_range(start, end - start)
        if end <= start:
            return
        ctx = VisitCtx(self.pool, start, end)
        self._walk(
            ctx, self.root * self.per, self.mode.root_entries, self.mode.root_level,
            start, end, 0, visitor,
        )  # fmt: skip

    def _walk_one(
        self,
        ctx: VisitCtx,
        flat: int,
        nent: int,
        level: int,
        i: int,
        start: int,
        end: int,
        base: int,
        v: Visitor,
    ) -> None:
        """One entry at ``level`` > 0: scalar reads, no numpy view (the fault path)."""
        words = self.pool.words
        shift = self.shifts[level]
        pte = words[flat + i]
        if v.wants_leaf and pte & TABLE_MASK != PTE_V:
            ctx.at(flat, nent, level, i, i + 1, base, shift)
            v.leaf(ctx)
            words = self.pool.words
            pte = words[flat + i]
        if pte & TABLE_MASK != PTE_V:
            return
        gpa = base + (i << shift)
        if v.wants_table_pre:
            ctx.at(flat, nent, level, i, i + 1, base, shift)
            v.table_pre(ctx)
            pte = self.pool.words[flat + i]
            if pte & TABLE_MASK != PTE_V:
                return
        size = 1 << shift
        row = self.pool.follow(pte)
        if level == 1 and v.batch_leaf and gpa >= start and gpa + size <= end:
            ctx.at(flat, nent, level, i, i + 1, base, shift)
            rows = np.array([row], dtype=np.int64)
            v.leaf_batch(ctx, np.array([i], dtype=np.int64), rows, np.array([gpa], dtype=np.int64))
            return
        self._walk(
            ctx, row * self.per, self.per, level - 1, max(start, gpa), min(end, gpa + size),
            gpa, v,
        )  # fmt: skip
        if v.wants_table_post:
            ctx.at(flat, nent, level, i, i + 1, base, shift)
            v.table_post(ctx)

    def _walk(
        self,
        ctx: VisitCtx,
        flat: int,
        nent: int,
        level: int,
        start: int,
        end: int,
        base: int,
        v: Visitor,
    ) -> None:
        shift = self.shifts[level]
        i0 = (start - base) >> shift
        i1 = ((end - 1 - base) >> shift) + 1
        if level == 0:
            if v.wants_leaf:
                ctx.at(flat, nent, 0, i0, i1, base, shift)
                v.leaf(ctx)
            return
        if i1 - i0 == 1:
            self._walk_one(ctx, flat, nent, level, i0, start, end, base, v)
            return
        pool = self.pool
        tbl = pool.flat[flat : flat + nent]
        tmask = (tbl[i0:i1] & TABLE_MASK) == PTE_V
        if v.wants_leaf:
            if not tmask.any():
                ctx.at(flat, nent, level, i0, i1, base, shift)
                v.leaf(ctx)
                tbl = pool.flat[flat : flat + nent]
                tmask = (tbl[i0:i1] & TABLE_MASK) == PTE_V
            elif not tmask.all():
                for a, b in runs_of(~tmask):
                    ctx.at(flat, nent, level, i0 + a, i0 + b, base, shift)
                    v.leaf(ctx)
                tbl = pool.flat[flat : flat + nent]
                tmask = (tbl[i0:i1] & TABLE_MASK) == PTE_V
        tidx = np.flatnonzero(tmask)
        if tidx.size == 0:
            return
        tidx += i0
        size = 1 << shift
        if level == 1 and v.batch_leaf:
            gpas = base + (tidx << shift)
            full = (gpas >= start) & (gpas + size <= end)
            if full.any():
                fidx = tidx[full]
                ctx.at(flat, nent, level, int(fidx[0]), int(fidx[-1]) + 1, base, shift)
                v.leaf_batch(ctx, fidx, pool.follow_many(tbl[fidx]), gpas[full])
                tidx = tidx[~full]
        per = self.per
        for i in tidx.tolist():
            gpa = base + (i << shift)
            if v.wants_table_pre:
                ctx.at(flat, nent, level, i, i + 1, base, shift)
                v.table_pre(ctx)
            pte = pool.words[flat + i]
            if pte & TABLE_MASK != PTE_V:
                continue
            self._walk(
                ctx, pool.follow(pte) * per, per, level - 1, max(start, gpa),
                min(end, gpa + size), gpa, v,
            )  # fmt: skip
            if v.wants_table_post:
                ctx.at(flat, nent, level, i, i + 1, base, shift)
                v.table_post(ctx)
