"""vmm.walker: what the walker hands its visitors, and where (the visit context)."""

from __future__ import annotations

import numpy as np
import pytest

from vmm.errors import PageTableError
from vmm.pte import PTE_V, get_mode, leaf_perms
from vmm.stage2 import Stage2PageTable
from vmm.walker import TABLE_MASK, VisitCtx, Visitor, Walker, is_table, runs_of

MIB = 1 << 20
GIB = 1 << 30
HPA = 1 << 33


class Recorder(Visitor):
    """Records every callback with the context's view of where it is."""

    wants_table_pre = True
    wants_table_post = True

    def __init__(self, batch: bool = False) -> None:
        self.batch_leaf = batch
        self.calls: list[tuple[str, int, int, int]] = []  # (kind, level, first gpa, entries)

    def leaf(self, ctx: VisitCtx) -> None:
        assert ctx.tbl.shape[0] == ctx.nent and ctx.addr == ctx.gpa(ctx.i0)
        assert [ctx.word(i) for i in range(ctx.i0, ctx.i1)] == ctx.tbl[ctx.i0 : ctx.i1].tolist()
        self.calls.append(("leaf", ctx.level, ctx.addr, ctx.i1 - ctx.i0))

    def leaf_batch(self, ctx: VisitCtx, idx, rows, gpas) -> None:  # type: ignore[no-untyped-def]
        assert ctx.level == 1 and (ctx.pool.follow_many(ctx.tbl[idx]) == rows).all()
        self.calls.append(("batch", 0, int(gpas[0]), int(rows.size)))

    def table_pre(self, ctx: VisitCtx) -> None:
        assert is_table(ctx.word(ctx.i0))
        self.calls.append(("pre", ctx.level, ctx.addr, ctx.size))

    def table_post(self, ctx: VisitCtx) -> None:
        self.calls.append(("post", ctx.level, ctx.addr, ctx.size))


def _table() -> Stage2PageTable:
    pt = Stage2PageTable("sv39x4")
    pt.topup_for(GIB, 4 * MIB, 0)
    pt.map_range(GIB, 4 * MIB, HPA, leaf_perms(True), 0)  # two full level-0 tables
    pt.topup_for(GIB + 4 * MIB, 2 * MIB, 1)
    pt.map_range(GIB + 4 * MIB, 2 * MIB, HPA + 4 * MIB, leaf_perms(True), 1)  # a block
    return pt


def test_runs_tables_and_order() -> None:
    pt = _table()
    rec = Recorder()
    pt.walker.walk(GIB + 2 * MIB - 4096, GIB + 6 * MIB + 4096, rec)
    # In each table: the runs of leaves and invalid entries first, then each table entry.
    assert rec.calls == [
        ("pre", 2, GIB, GIB),  # the root entry holding everything
        ("leaf", 1, GIB + 4 * MIB, 2),  # the block and the invalid entry after it, one run
        ("pre", 1, GIB, 2 * MIB),  # the first level-0 table: only its last page is in range
        ("leaf", 0, GIB + 2 * MIB - 4096, 1),
        ("post", 1, GIB, 2 * MIB),
        ("pre", 1, GIB + 2 * MIB, 2 * MIB),  # the second: all of it
        ("leaf", 0, GIB + 2 * MIB, 512),
        ("post", 1, GIB + 2 * MIB, 2 * MIB),
        ("post", 2, GIB, GIB),
    ]


def test_batch_leaf_takes_every_covered_level0_table_at_once() -> None:
    pt = _table()
    rec = Recorder(batch=True)
    pt.walker.walk(GIB, GIB + 8 * MIB, rec)
    assert ("batch", 0, GIB, 2) in rec.calls
    assert not any(kind == "leaf" and level == 0 for kind, level, _g, _n in rec.calls)
    one = Recorder(batch=True)  # one covered table reached by the scalar path
    pt.walker.walk(GIB + 2 * MIB, GIB + 4 * MIB, one)
    assert ("batch", 0, GIB + 2 * MIB, 1) in one.calls


def test_a_leaf_turned_into_a_table_is_followed() -> None:
    pt = Stage2PageTable("sv39x4")
    pt.topup_for(GIB, 4096, 0)

    class Install(Visitor):
        def __init__(self) -> None:
            self.seen: list[int] = []

        def leaf(self, ctx: VisitCtx) -> None:
            self.seen.append(ctx.level)
            if ctx.level > 0 and not ctx.word(ctx.i0) & PTE_V:
                ctx.set_word(ctx.i0, ctx.pool.table_pte(pt.cache.take_one()))

    v = Install()
    with pt.mmu_lock():
        pt.walker.walk(GIB, GIB + 4096, v)
    assert v.seen == [2, 1, 0]
    assert pt.table_pages == 4 + 2


def test_walker_checks_its_range_and_helpers() -> None:
    pt = Stage2PageTable("sv39x4")
    walker = Walker(pt.pool, get_mode("sv39x4"), pt.root)
    with pytest.raises(PageTableError, match="41-bit"):
        walker.walk(0, (1 << 41) + 4096, Recorder())
    rec = Recorder()
    walker.walk(GIB, GIB, rec)  # empty range: nothing visited
    assert rec.calls == []
    assert runs_of(np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)) == [(0, 2), (3, 4), (6, 7)]
    assert is_table(PTE_V) and not is_table(leaf_perms(False)) and not is_table(0)
    assert TABLE_MASK == 0xF
