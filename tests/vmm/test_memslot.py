"""vmm.memslot: a memslot's arithmetic and the table that finds slots by id and GPA."""

from __future__ import annotations

import numpy as np

from vmm.memory import Backing
from vmm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Memslot, MemslotTable

MIB = 1 << 20


def test_memslot_arithmetic() -> None:
    backing = Backing.anonymous(4 * MIB)
    slot = Memslot(7, KVM_MEM_LOG_DIRTY_PAGES, 0x8000_0000, 3 * MIB + 4096, backing, 4096)
    assert slot.end == 0x8000_0000 + 3 * MIB + 4096 and slot.npages == 769
    assert slot.hpa == backing.hpa + 4096 and slot.hpa_of(0x8000_0010) == backing.hpa + 4096 + 16
    assert slot.logging and not slot.readonly and slot.bitmap_words() == 13
    slot.flags = KVM_MEM_READONLY
    assert slot.readonly and not slot.logging
    assert slot.rmap is None and slot.rmap_lists == {} and slot.dirty_bitmap is None


def test_memslot_table_find_by_id_and_gpa() -> None:
    backing = Backing.anonymous(4 * MIB)
    table = MemslotTable()
    assert table.find(0) is None
    assert table.find_many(np.array([1, 2], dtype=np.uint64)).tolist() == [-1, -1]
    high = Memslot(1, 0, 0x4000_0000, MIB, backing)
    low = Memslot(2, 0, 0x1000_0000, 2 * MIB, backing)
    table.insert(high)
    table.insert(low)
    assert table.ordered() == [low, high] and len(table) == 2 and list(table) == [low, high]
    assert table.by_id == {1: high, 2: low}
    assert table.find(0x1000_0000) is low and table.find(0x1020_0000 - 1) is low
    assert table.find(0x1020_0000) is None and table.find(0x4000_0000 + MIB - 1) is high
    gpas = np.array([0x1000_0008, 0x4000_0000, 0x3000_0000, 0x1010_0000], dtype=np.uint64)
    assert table.find_many(gpas).tolist() == [0, 1, -1, 0]
    one_slot = np.array([0x4000_0000, 0x4000_1000], dtype=np.uint64)  # the fast path
    assert table.find_many(one_slot).tolist() == [1, 1]
    assert table.overlapping(0x100F_F000, 0x2000) is low
    assert table.overlapping(0x100F_F000, 0x2000, ignore=low) is None
    assert table.overlapping(0x2000_0000, MIB) is None
    table.remove(low)
    assert table.ordered() == [high] and table.find(0x1000_0000) is None
    assert table.find_many(gpas).tolist() == [-1, 0, -1, -1]
