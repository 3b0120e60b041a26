"""vmm.tlb: per-level FIFO sets tagged by VMID, the three flush shapes, conflict aborts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_fifo_skips_the_stale_slot_of_an_entry_flushed_and_filled_again() -> None:
    tlb = Tlb(MODE, 3)
    for page in (1, 2, 3):
        tlb.fill(1, page << 12, entry(0))
    tlb.flush_addr(1, 1 << 12, 0)
    tlb.fill(1, 1 << 12, entry(0))  # filled again: now the newest
    tlb.fill(1, 4 << 12, entry(0))  # evicts 2, not the refilled 1
    read, _write = tlb.views(1)
    assert list(read[0]) == [3, 1, 4]
    tlb.fill(1, 5 << 12, entry(0))
    tlb.fill(1, 6 << 12, entry(0))
    assert list(read[0]) == [4, 5, 6]


def test_flush_and_refill_cycles_keep_the_fifo_queue_bounded() -> None:
    tlb = Tlb(MODE, 4)
    for round_ in range(1000):
        page = round_ % 3
        tlb.fill(1, page << 12, entry(0))
        tlb.flush_addr(1, page << 12, 0)
    levels = tlb._sets(1).levels
    assert len(levels[0].order) <= 2 * 4 + 64 and not levels[0].read


def test_word_views_exist_only_while_their_entry_does() -> None:
    tlb = Tlb(MODE, 2)
    page = bytearray(4096)
    tlb.fill_leaf(1, 0x1000, memoryview(page), True, 0)
    read_words, write_words = tlb.word_views(1)
    assert not read_words[0]  # made on the first 64-bit access only
    words = tlb.words(1, 0x1008, 0, True)
    assert words is not None and words.format == "Q"
    words[1] = 0x0102030405060708
    assert page[8:16] == bytes.fromhex("0807060504030201")
    assert set(read_words[0]) == set(write_words[0]) == {0x1000}
    tlb.fill_leaf(1, 0x1000, memoryview(page), False, 0)  # now read-only: no word view
    assert not write_words[0] and not read_words[0]
    assert tlb.words(1, 0x1000, 0, True) is None  # not writable
    assert tlb.words(1, 0x1000, 0, False) is not None and not write_words[0]
    tlb.flush_addr(1, 0x1000, 0)
    assert not read_words[0] and tlb.words(1, 0x1000, 0, False) is None
    for gpa in (0x1000, 0x2000, 0x3000):  # the third fill evicts the first
        tlb.fill_leaf(1, gpa, memoryview(page), True, 0)
        tlb.words(1, gpa, 0, True)
    assert set(read_words[0]) == set(write_words[0]) == {0x2000, 0x3000}
    tlb.flush_range(1, 0, 1 << 30)
    assert not read_words[0] and not write_words[0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["fill", "fill", "fill", "flush", "range", "many", "words", "vmid"]),
            st.integers(0, 11),
            st.booleans(),
        ),
        max_size=80,
    )
)
def test_the_fifo_sets_behave_as_an_ordered_dict(
    ops: list[tuple[str, int, bool]],
) -> None:
    """Every fill, re-fill, flush and bulk insert against an exact FIFO model (an ordered
    dict): same entries, same order, same write set; word views only for live entries."""
    capacity = 4
    tlb = Tlb(MODE, capacity)
    model: dict[int, bool] = {}  # vpn -> writable, oldest first
    page = memoryview(bytearray(4096))
    for op, vpn, writable in ops:
        if op == "fill":
            if vpn not in model and len(model) >= capacity:
                del model[next(iter(model))]
            model[vpn] = writable
            tlb.fill_leaf(1, vpn << 12, page, writable, 0)
        elif op == "flush":
            model.pop(vpn, None)
            tlb.flush_addr(1, vpn << 12, 0)
        elif op == "range":
            for k in [k for k in model if vpn <= k < vpn + 3]:
                del model[k]
            tlb.flush_range(1, vpn << 12, 3 << 12)
        elif op == "many":
            items = [(vpn + i, TlbEntry(page, writable, 0)) for i in range(3)]
            for k, e in items[-capacity:]:
                if k in model:
                    del model[k]
                elif len(model) >= capacity:
                    del model[next(iter(model))]
                model[k] = e.writable
            tlb.insert_many(1, 0, items)
        elif op == "words":
            assert (tlb.words(1, vpn << 12, 0, writable) is not None) == (
                vpn in model and (model[vpn] or not writable)
            )
        else:
            model.clear()
            tlb.flush_vmid(1)
        read, write = tlb.views(1)
        read_words, write_words = tlb.word_views(1)
        assert list(read[0]) == list(model)
        assert set(write[0]) == {k for k, w in model.items() if w}
        assert set(read_words[0]) <= {k << 12 for k in model}
        assert set(write_words[0]) <= {k << 12 for k, w in model.items() if w}
