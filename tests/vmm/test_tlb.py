"""vmm.tlb: per-level FIFO sets tagged by VMID, the three flush shapes, conflict aborts."""

from __future__ import annotations

import numpy as np
import pytest

from vmm.errors import TlbConflictAbort
from vmm.pte import get_mode
from vmm.tlb import Tlb, TlbEntry

MODE = get_mode("sv39x4")
MIB = 1 << 20
PAGE = bytearray(4096)
BLOCK = bytearray(2 * MIB)


def entry(level: int, writable: bool = True) -> TlbEntry:
    return TlbEntry(memoryview(PAGE if level == 0 else BLOCK), writable, level)


def test_fill_lookup_and_the_views_a_vcpu_reads() -> None:
    tlb = Tlb(MODE, 8)
    tlb.fill(1, 0x1000, entry(0, writable=False))
    tlb.fill(1, 4 * MIB, entry(1))
    hit = tlb.lookup(1, 0x1FFF)
    assert hit is not None and hit.level == 0 and not hit.writable
    hit = tlb.lookup(1, 5 * MIB)
    assert hit is not None and hit.level == 1 and hit.writable
    assert tlb.lookup(1, 0x2000) is None and tlb.lookup(2, 0x1000) is None
    read, write = tlb.views(1)
    assert set(read[0]) == {1} and set(write[0]) == set()  # read-only: not in the write set
    assert set(read[1]) == {2} and set(write[1]) == {2}
    tlb.fill(1, 0x1000, entry(0, writable=True))  # a re-walk after a write fault
    assert set(write[0]) == {1} and len(tlb) == 2 and tlb.fills == 3


def test_fifo_eviction_keeps_both_sets_in_step() -> None:
    tlb = Tlb(MODE, 4)
    for page in range(6):
        tlb.fill(1, page << 12, entry(0))
    read, write = tlb.views(1)
    assert list(read[0]) == [2, 3, 4, 5] and list(write[0]) == [2, 3, 4, 5]
    tlb.fill(1, 3 << 12, entry(0))  # already cached: nothing is evicted
    assert list(read[0]) == [2, 3, 4, 5]
    tlb.insert_many(1, 0, [(k, entry(0, k % 2 == 0)) for k in range(10, 20)])
    assert list(read[0]) == [16, 17, 18, 19] and list(write[0]) == [16, 18]


def test_flush_shapes() -> None:
    tlb = Tlb(MODE, 256)
    tlb.fill(1, 0, entry(1))
    tlb.fill(1, 4 * MIB, entry(0))
    tlb.fill(2, 0, entry(1))
    tlb.flush_addr(1, 0, 0)  # a level hint that does not match: the block stays
    assert tlb.lookup(1, 0) is not None
    tlb.flush_addr(1, 0, 1)
    assert tlb.lookup(1, 0) is None and tlb.lookup(2, 0) is not None
    for page in range(200):  # a large range takes the scan path
        tlb.fill(1, 8 * MIB + (page << 12), entry(0))
    tlb.flush_range(1, 8 * MIB + (10 << 12), 100 << 12)
    read, write = tlb.views(1)
    assert len(read[0]) == 101 and set(read[0]) == set(write[0])
    tlb.flush_range(1, 0, 1 << 30)  # covers everything cached: cleared
    assert len(read[0]) == 0 and len(write[0]) == 0
    tlb.flush_vmid(2)
    assert len(tlb) == 0 and tlb.flushes == 5


def test_a_fill_over_an_entry_of_another_size_is_a_conflict_abort() -> None:
    tlb = Tlb(MODE, 16)
    tlb.fill(1, 2 * MIB, entry(1))
    with pytest.raises(TlbConflictAbort, match="level-0 entry while a level-1"):
        tlb.fill(1, 2 * MIB + 0x5000, entry(0))
    tlb.fill(1, 0x3000, entry(0))
    with pytest.raises(TlbConflictAbort, match="level-1 entry while a level-0"):
        tlb.fill(1, 0, entry(1))
    tlb.fill(2, 0, entry(1))  # another VMID: no conflict
    tlb.flush_addr(1, 0x3000, 0)
    tlb.fill(1, 0, entry(1))  # after the invalidation, fine


def test_bulk_conflict_check() -> None:
    tlb = Tlb(MODE, 16)
    tlb.fill(1, 2 * MIB, entry(1))
    with pytest.raises(TlbConflictAbort):
        tlb.check_bulk(1, 0, np.array([(2 * MIB >> 12) + 3, 7], dtype=np.int64))
    tlb.check_bulk(1, 0, np.array([7, 8], dtype=np.int64))
    tlb.fill(1, 8 * MIB, entry(0))
    with pytest.raises(TlbConflictAbort):
        tlb.check_bulk(1, 1, np.array([4], dtype=np.int64))  # 8M's 2M block: holds a page
    tlb.check_bulk(1, 1, np.array([5, 6], dtype=np.int64))
