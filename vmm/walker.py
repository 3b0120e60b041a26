"""The one stage-2 page-table walker, with visitor callbacks (arm64's ``kvm_pgtable_walk``).

The walker visits the tables that cover ``[start, end)``. In each table it hands the visitor
whole *runs* of non-table entries at once (a numpy view of the table plus an index range),
never one PTE at a time, so a visitor can act per entry or in bulk with vector operations.
Table entries are descended into, with optional ``table_pre`` / ``table_post`` callbacks.
After a leaf visit the walker re-reads the run, so a visitor that turned an entry into a
table (a map installing the next level, a split) is followed into it.

A visitor that sets ``batch_leaf`` also gets, at level 1, every child table that the range
covers entirely in one :meth:`Visitor.leaf_batch` call (row indices into the pool): that is
how a 1 GiB range of 4 KiB leaves is processed in one vector operation instead of 512 calls.
Batched children get no ``table_pre``/``table_post`` calls; the visitor does that work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .pte import PTE_PPN_SHIFT, PTE_RWX, PTE_V

if TYPE_CHECKING:
    from .stage2 import Stage2PageTable

__all__ = ["PteArray", "Visitor", "Walker"]

PteArray = npt.NDArray[Any]
_TABLE_MASK = PTE_V | PTE_RWX


class Visitor:
    """Base visitor: override the callbacks an operation needs and set its flags."""

    wants_leaf = True
    wants_table_pre = False
    wants_table_post = False
    batch_leaf = False

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        """Entries ``tbl[i0:i1]`` at ``level`` are leaves or invalid; ``base`` is the
        GPA the table starts at (entry ``i`` maps ``base + (i << shift(level))``)."""

    def leaf_batch(
        self,
        parent: PteArray,
        idx: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.int64],
    ) -> None:
        """Level-0 tables ``rows`` (pointed to by ``parent[idx]``, starting at ``gpas``) lie
        entirely inside the range."""

    def table_pre(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        """``tbl[i]`` points to a table; called before descending (it may replace it)."""

    def table_post(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        """``tbl[i]`` pointed to a table whose walk just finished."""


def runs_of(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``(start, stop)`` of every run of True in ``mask``."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


class Walker:
    """Walks one :class:`~vmm.stage2.Stage2PageTable` for a visitor."""

    def __init__(self, pt: Stage2PageTable) -> None:
        self.pt = pt
        self.shifts = [pt.mode.shift(level) for level in range(pt.mode.levels)]

    def walk(self, start: int, end: int, visitor: Visitor) -> None:
        """Visit ``[start, end)``; the range must lie inside the mode's GPA space."""
        pt = self.pt
        pt.check_range(start, end - start)
        if end <= start:
            return
        self._walk(pt.root_view(), pt.mode.root_level, start, end, 0, visitor)

    def _walk_one(
        self, tbl: PteArray, level: int, i: int, start: int, end: int, base: int, v: Visitor
    ) -> None:
        """One entry at ``level`` > 0: scalar checks, no vector set-up (the fault path)."""
        if v.wants_leaf and int(tbl[i]) & _TABLE_MASK != PTE_V:
            v.leaf(tbl, level, i, i + 1, base)
        shift = self.shifts[level]
        gpa = base + (i << shift)
        if v.wants_table_pre and int(tbl[i]) & _TABLE_MASK == PTE_V:
            v.table_pre(tbl, level, i, gpa)
        pte = int(tbl[i])
        if pte & _TABLE_MASK != PTE_V:
            return
        pt = self.pt
        child = pt.pool.pages[(pte >> PTE_PPN_SHIFT) - pt.pool.base_ppn]
        size = 1 << shift
        if level == 1 and v.batch_leaf and gpa >= start and gpa + size <= end:
            rows = np.array([(pte >> PTE_PPN_SHIFT) - pt.pool.base_ppn], dtype=np.int64)
            v.leaf_batch(tbl, np.array([i], dtype=np.int64), rows, np.array([gpa]))
            return
        self._walk(child, level - 1, max(start, gpa), min(end, gpa + size), gpa, v)
        if v.wants_table_post:
            v.table_post(tbl, level, i, gpa)

    def _walk(self, tbl: PteArray, level: int, start: int, end: int, base: int, v: Visitor) -> None:
        shift = self.shifts[level]
        i0 = (start - base) >> shift
        i1 = ((end - 1 - base) >> shift) + 1
        if level == 0:
            if v.wants_leaf:
                v.leaf(tbl, 0, i0, i1, base)
            return
        if i1 - i0 == 1:
            self._walk_one(tbl, level, i0, start, end, base, v)
            return
        ents = tbl[i0:i1]
        tmask = (ents & _TABLE_MASK) == PTE_V
        if v.wants_leaf:
            if not tmask.any():
                v.leaf(tbl, level, i0, i1, base)
                tmask = (tbl[i0:i1] & _TABLE_MASK) == PTE_V
            elif not tmask.all():
                for a, b in runs_of(~tmask):
                    v.leaf(tbl, level, i0 + a, i0 + b, base)
                tmask = (tbl[i0:i1] & _TABLE_MASK) == PTE_V
        tidx = np.flatnonzero(tmask)
        if tidx.size == 0:
            return
        tidx += i0
        pt = self.pt
        size = 1 << shift
        if level == 1 and v.batch_leaf:
            gpas = base + (tidx << shift)
            full = (gpas >= start) & (gpas + size <= end)
            if full.any():
                fidx = tidx[full]
                rows = (tbl[fidx] >> PTE_PPN_SHIFT).astype(np.int64) - pt.pool.base_ppn
                v.leaf_batch(tbl, fidx, rows, gpas[full])
                tidx = tidx[~full]
        base_ppn = pt.pool.base_ppn
        for i in tidx.tolist():
            gpa = base + (i << shift)
            if v.wants_table_pre:
                v.table_pre(tbl, level, i, gpa)
            pte = int(tbl[i])
            if pte & _TABLE_MASK != PTE_V:
                continue
            child = pt.pool.pages[(pte >> PTE_PPN_SHIFT) - base_ppn]
            self._walk(child, level - 1, max(start, gpa), min(end, gpa + size), gpa, v)
            if v.wants_table_post:
                v.table_post(tbl, level, i, gpa)
