"""Stage-2 page-table format, walker operations and a property test against a dict model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmm
from vmm.pte import (
    PTE_A,
    PTE_D,
    PTE_PPN_SHIFT,
    PTE_R,
    PTE_RWX,
    PTE_U,
    PTE_V,
    PTE_W,
    PTE_X,
    leaf_perms,
)
from vmm.reference import PerPageWalker

GIB = 1 << 30
MIB = 1 << 20
HPA = 0x1_0000_0000


def _map(
    pt: vmm.Stage2PageTable, gpa: int, size: int, hpa: int, level: int, w: bool = True
) -> bool:
    pt.topup_for(gpa, size, level)
    return pt.map_range(gpa, size, hpa, leaf_perms(w), level)


def _decode_walk(pt: vmm.Stage2PageTable, gpa: int) -> tuple[int, int] | None:
    """Walk the raw table words with nothing but the privileged spec (independent decoder)."""
    mode = pt.mode
    words = pt.pool.pages.reshape(-1)
    table_hpa = pt.root_hpa
    level = mode.root_level
    while True:
        if level == mode.root_level:
            idx = (gpa >> mode.shift(level)) & (mode.root_entries - 1)
        else:
            idx = (gpa >> mode.shift(level)) & (mode.entries_per_table - 1)
        word_index = (table_hpa - pt.pool.base_hpa) // mode.pte_bytes + idx
        pte = int(words[word_index])
        if not pte & PTE_V:
            return None
        ppn = pte >> PTE_PPN_SHIFT
        if pte & PTE_RWX:
            offset = gpa & (mode.level_size(level) - 1)
            return (ppn << 12) + offset, level
        table_hpa = ppn << 12
        level -= 1


@pytest.mark.parametrize(
    ("mode", "levels", "sizes"),
    [
        ("sv32x4", 2, [4096, 4 * MIB]),
        ("sv39x4", 3, [4096, 2 * MIB, GIB]),
        ("sv48x4", 4, [4096, 2 * MIB, GIB]),
    ],
)
def test_leaves_at_every_level_decode_with_the_spec(
    mode: str, levels: int, sizes: list[int]
) -> None:
    pt = vmm.Stage2PageTable(mode, vmid=3)
    assert pt.mode.levels == levels
    assert pt.mode.root_entries * pt.mode.pte_bytes == 16384  # the x4 root: four pages
    assert pt.root_hpa % 16384 == 0
    gpa = 4 * GIB if mode != "sv32x4" else 2 * GIB
    for level, size in enumerate(sizes):
        target = gpa + level * 2 * GIB if mode != "sv32x4" else gpa + level * 64 * MIB
        hpa = HPA + level * 4 * GIB if mode != "sv32x4" else 0x1_0000_0000 + level * 64 * MIB
        _map(pt, target, size, hpa, level)
        assert _decode_walk(pt, target + size - 8) == (hpa + size - 8, level)
        pte, lvl = pt.translate(target + 12)
        assert lvl == level
        assert pte & (PTE_V | PTE_R | PTE_W | PTE_X | PTE_U | PTE_A | PTE_D) == (
            PTE_V | PTE_R | PTE_W | PTE_X | PTE_U | PTE_A | PTE_D
        )
        leaf = pt.get_leaf(target + 12)
        assert leaf is not None and leaf.level == level and leaf.hpa == hpa
    # The words are of the mode's width.
    assert pt.pool.pages.dtype.itemsize == pt.mode.pte_bytes


def test_gpa_beyond_mode_is_rejected() -> None:
    pt = vmm.Stage2PageTable("sv39x4")
    with pytest.raises(vmm.PageTableError, match="41-bit"):
        _map(pt, 1 << 41, 4096, HPA, 0)
    with pytest.raises(vmm.PageTableError, match="not aligned"):
        _map(pt, 4096, 2 * MIB, HPA, 1)
    with pytest.raises(vmm.PageTableError, match="level 3 does not exist"):
        pt.map_range(0, GIB, HPA, leaf_perms(True), 3)


def test_map_without_topup_is_a_reported_bug() -> None:
    pt = vmm.Stage2PageTable()
    pt.cache.drain()
    with pt.mmu_lock(), pytest.raises(vmm.PageCacheEmpty, match="top"):
        pt.map_range(0, 4096, HPA, leaf_perms(True), 0)
    with pt.mmu_lock(), pytest.raises(vmm.ModelBug, match="under the MMU lock"):
        pt.cache.topup(8)


def test_one_gib_of_4k_uses_the_hardware_table_memory() -> None:
    pt = vmm.Stage2PageTable()
    _map(pt, GIB, GIB, HPA, 0)
    hardware = 512 + 1 + 4  # leaf tables, one level-1 table, the x4 root
    assert pt.table_pages == hardware
    assert pt.pool.in_use <= hardware * 1.05
    # Range operations report whether a flush is needed, and do the work in bulk.
    assert pt.wp_range(GIB, GIB) is True
    assert pt.wp_range(GIB, GIB) is False
    _g, ptes, _l = pt.leaves(GIB, GIB)
    assert ptes.size == 262144 and not (ptes & PTE_W).any()
    assert pt.unmap_range(GIB, GIB) is True
    assert pt.leaves(GIB, GIB)[0].size == 0
    assert pt.table_pages == 4  # tables the range covered entirely were freed


def test_split_and_coalesce_round_trip() -> None:
    pt = vmm.Stage2PageTable()
    _map(pt, GIB, 4 * MIB, HPA, 1)
    assert pt.split_range(GIB, 4 * MIB) is True
    g, _p, lv = pt.leaves(GIB, 4 * MIB)
    assert g.size == 1024 and set(lv.tolist()) == {0}
    assert _decode_walk(pt, GIB + 5 * 4096 + 3) == (HPA + 5 * 4096 + 3, 0)
    assert pt.coalesce_range(GIB, 4 * MIB, 1) is True
    g, _p, lv = pt.leaves(GIB, 4 * MIB)
    assert g.size == 2 and set(lv.tolist()) == {1}


def test_map_4k_into_block_preserves_or_drops_the_rest() -> None:
    pt = vmm.Stage2PageTable()
    _map(pt, GIB, 2 * MIB, HPA, 1, w=False)
    _map(pt, GIB + 4096, 4096, HPA + 4096, 0, w=True)
    g, p, lv = pt.leaves(GIB, 2 * MIB)
    assert g.size == 512 and set(lv.tolist()) == {0}
    assert int((p & PTE_W).astype(bool).sum()) == 1
    pt.topup_for(GIB, 2 * MIB, 1)
    pt.map_range(GIB, 2 * MIB, HPA, leaf_perms(False), 1)  # coalesce back
    pt.topup_for(GIB, 4096, 0)
    pt.map_range(GIB, 4096, HPA, leaf_perms(True), 0, split="drop")
    g, _p, _lv = pt.leaves(GIB, 2 * MIB)
    assert g.tolist() == [GIB]


def test_ioremap_and_free() -> None:
    pt = vmm.Stage2PageTable()
    before = pt.pool.in_use
    pt.ioremap(0x1000_0000, 0x2000_0000, 64 * 1024, writable=False)
    pte, level = pt.translate(0x1000_0000 + 4096 * 3)
    assert level == 0 and pte & PTE_R and not pte & (PTE_W | PTE_X)
    pt.free()
    assert pt.pool.in_use == before - 4 - len(pt.cache) or pt.pool.in_use >= 0


def test_per_page_reference_agrees_with_the_walker() -> None:
    fast = vmm.Stage2PageTable()
    slow = vmm.Stage2PageTable()
    for pt in (fast, slow):
        _map(pt, GIB, 8 * MIB, HPA, 0)
        _map(pt, GIB + 8 * MIB, 4 * MIB, HPA + 8 * MIB, 1)
    fast.wp_range(GIB + 4 * MIB, 8 * MIB)
    PerPageWalker(slow).wp_range(GIB + 4 * MIB, 8 * MIB)
    assert np.array_equal(fast.leaves()[1], slow.leaves()[1])
    fast.unmap_range(GIB + 2 * MIB, 4 * MIB)
    PerPageWalker(slow).unmap_range(GIB + 2 * MIB, 4 * MIB)
    assert np.array_equal(fast.leaves()[0], slow.leaves()[0])
    assert np.array_equal(fast.leaves()[1], slow.leaves()[1])


# ---------------------------------------------------------------------- property test
REGION = 8 * MIB  # GPA window [BASE, BASE + REGION)
BASE = GIB
_ops = st.one_of(
    st.tuples(
        st.just("map"),
        st.integers(0, REGION // 4096 - 1),
        st.integers(1, 600),
        st.sampled_from([0, 1]),
        st.booleans(),
        st.integers(0, 7),
    ),
    st.tuples(st.just("unmap"), st.integers(0, REGION // 4096 - 1), st.integers(1, 1500)),
    st.tuples(st.just("wp"), st.integers(0, REGION // 4096 - 1), st.integers(1, 1500)),
    st.tuples(st.just("split"), st.integers(0, 3)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ops, min_size=1, max_size=25), st.sampled_from(["sv39x4", "sv48x4", "sv32x4"]))
def test_operations_match_a_dict_model(ops: list[tuple], mode: str) -> None:  # type: ignore[type-arg]
    pt = vmm.Stage2PageTable(mode)
    model: dict[int, tuple[int, bool, int]] = {}  # gfn -> (hpa, writable, level)
    block = pt.mode.level_size(1)
    base = BASE if mode != "sv32x4" else 2 * GIB
    span = REGION if mode != "sv32x4" else 4 * block
    for op in ops:
        if op[0] == "map":
            _, page, count, level, w, shift = op
            size = pt.mode.level_size(level)
            gpa = base + (page * 4096) % span
            gpa -= gpa % size
            count_bytes = min(count * 4096 if level == 0 else size, base + span - gpa)
            count_bytes -= count_bytes % size
            if count_bytes == 0:
                continue
            hpa = HPA + shift * block + (gpa - base)
            # A block in the way of a smaller map is split preserving its other pages.
            _map(pt, gpa, count_bytes, hpa, level, w)
            if level == 0:
                for g in range(gpa, gpa + count_bytes, 4096):
                    blk = g - g % block
                    if blk >> 12 in model and model[blk >> 12][2] == 1:
                        bh, bw, _ = model[blk >> 12]
                        for k in range(block // 4096):
                            model[(blk >> 12) + k] = (bh + k * 4096, bw, 0)
                    model[g >> 12] = (hpa + g - gpa, w, 0)
            else:
                for g in range(gpa, gpa + count_bytes, 4096):
                    model[g >> 12] = (hpa + g - gpa, w, 1)
        elif op[0] in ("unmap", "wp"):
            _, page, count = op
            gpa = base + (page * 4096) % span
            size = min(count * 4096, base + span - gpa)
            if op[0] == "unmap":
                pt.unmap_range(gpa, size)
            else:
                pt.wp_range(gpa, size)
            # Blocks that the range touches go (or lose W) whole.
            touched: set[int] = set()
            for g in range(gpa, gpa + size, 4096):
                if g >> 12 in model:
                    _h, _w, lvl = model[g >> 12]
                    if lvl == 1:
                        blk = g - g % block
                        touched.update(range(blk >> 12, (blk + block) >> 12))
                    else:
                        touched.add(g >> 12)
            for gfn in touched:
                if op[0] == "unmap":
                    model.pop(gfn, None)
                elif gfn in model:
                    h, _w, lvl = model[gfn]
                    model[gfn] = (h, False, lvl)
        else:
            chunk = op[1]
            pt.split_range(base + chunk * (span // 4), span // 4)
            lo = (base + chunk * (span // 4)) >> 12
            for gfn in range(lo, lo + ((span // 4) >> 12)):
                if gfn in model:
                    h, w, _ = model[gfn]
                    model[gfn] = (h, w, 0)
        # Every translation the tables give equals the model's, at every step.
        leaf_gpas, leaf_ptes, leaf_levels = pt.leaves(base, span)
        got: dict[int, tuple[int, bool, int]] = {}
        for gpa_, pte, level in zip(
            leaf_gpas.tolist(), leaf_ptes.tolist(), leaf_levels.tolist(), strict=True
        ):
            size = pt.mode.level_size(level)
            for k in range(0, size, 4096):
                hpa = ((pte >> PTE_PPN_SHIFT) << 12) + k
                got[(gpa_ + k) >> 12] = (hpa, bool(pte & PTE_W), level)
        assert got == model


@pytest.mark.parametrize("mode", ["sv32x4", "sv39x4", "sv48x4"])
def test_the_leaf_set_leaf_made_is_the_one_the_walk_finds(mode: str) -> None:
    """What a faulting vCPU's retry reads back (``made``) is the entry a walk ends at, and it
    is forgotten by any walk that may change the table."""
    pt = vmm.Stage2PageTable(mode)
    for gpa, level in [(0x4000, 0), (6 * MIB if mode != "sv32x4" else 8 * MIB, 1)]:
        size = pt.mode.level_size(level)
        pt.cache.topup(pt.mode.levels)
        with pt.mmu_lock():
            pt.set_leaf(gpa, HPA, leaf_perms(True), level)
        assert pt.made is not None
        vpn, shift, index, made_level = pt.made
        assert (shift, made_level) == (pt.mode.shift(level), level) and vpn == gpa >> shift
        assert (int(pt.pool.words[index]), level) == pt.translate(gpa + size - 8)
        assert _decode_walk(pt, gpa + 8) == (HPA + 8, level)
    pt.unmap_range(0x4000, 4096)
    assert pt.made is None and pt.translate(0x4000)[0] == 0
