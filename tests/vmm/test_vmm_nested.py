"""Nested guests: shadow stage-2 tables and the rmap in the seed's 64-bit encoding."""

from __future__ import annotations

import pytest

import vmm
from vmm.rmap import (
    RMAP_NESTED_IS_SINGLE_ENTRY,
    insert_nest_rmap,
    rmap_decode,
    rmap_encode,
    rmap_entries,
)

RAM = 0x8000_0000
L2 = 0x1000_0000
MIB = 1 << 20


def _setup() -> tuple[vmm.Vm, vmm.Backing]:
    vm = vmm.Vm()
    backing = vmm.Backing.anonymous(4 * MIB)
    vm.set_user_memory_region(0, 0, RAM, 4 * MIB, backing)
    return vm, backing


def test_rmap_encoding() -> None:
    word = rmap_encode(0xABC, 0x12_3456_7000)
    assert word >> 52 == 0xABC
    assert word & 0x000F_FFFF_FFFF_F000 == 0x12_3456_7000
    assert not word & RMAP_NESTED_IS_SINGLE_ENTRY
    assert rmap_decode(word | RMAP_NESTED_IS_SINGLE_ENTRY) == (0xABC, 0x12_3456_7000)
    with pytest.raises(vmm.VmmError, match="12 bits"):
        rmap_encode(4096, 0)
    with pytest.raises(vmm.VmmError, match="4K-aligned"):
        rmap_encode(1, 0x1234)


def test_single_entry_then_list_and_no_duplicates() -> None:
    vm, _backing = _setup()
    slot = vm.memslot(0)
    a, b = rmap_encode(1, 0x1000), rmap_encode(2, 0x5000)
    assert insert_nest_rmap(slot, 3, a)
    assert slot.rmap is not None
    assert int(slot.rmap[3]) == a | RMAP_NESTED_IS_SINGLE_ENTRY  # inline, flagged
    assert not insert_nest_rmap(slot, 3, a)
    assert insert_nest_rmap(slot, 3, b)
    assert not insert_nest_rmap(slot, 3, b)
    assert rmap_entries(slot, 3) == [a, b]
    assert int(slot.rmap[3]) == 0 and 3 in slot.rmap_lists


def test_shadow_faults_record_rmap_and_invalidation_is_exact() -> None:
    vm, backing = _setup()
    g1, g2 = vm.create_nested(1), vm.create_nested(2)
    g1.set_l2_mapping(L2, RAM, 64 * 1024)
    g2.set_l2_mapping(L2 + 0x4000, RAM, 4096)  # another L2 page on the same L1 page
    g1.write(L2 + 8, b"nested!")
    assert bytes(backing.mem[8:15]) == b"nested!"
    assert g2.read(L2 + 0x4000 + 8, 7) == b"nested!"
    g1.read(L2 + 0x1000, 4)
    slot = vm.memslot(0)
    expected = [rmap_encode(1, L2), rmap_encode(2, L2 + 0x4000)]
    assert sorted(rmap_entries(slot, 0)) == sorted(expected)
    g1.read(L2 + 8, 1)  # an existing shadow PTE: no duplicate rmap
    assert len(rmap_entries(slot, 0)) == 2
    # L1 remaps L2 page 1 elsewhere: its rmap on L1 page 1 becomes stale.
    g1.set_l2_mapping(L2 + 0x1000, RAM + 0x8000, 4096)
    g1.read(L2 + 0x1000, 4)
    assert rmap_entries(slot, 1) == [rmap_encode(1, L2 + 0x1000)]
    assert g1.pt.translate(L2 + 0x1000)[0] != 0
    vm.invalidate_range(RAM, 0x2000)  # L1 pages 0 and 1
    assert g1.pt.translate(L2)[0] == 0  # pointed at L1 page 0: cleared
    assert g2.pt.translate(L2 + 0x4000)[0] == 0
    pte, _ = g1.pt.translate(L2 + 0x1000)  # stale rmap: left alone, still maps L1 page 8
    assert pte != 0 and ((pte >> 10) << 12) == slot.hpa_of(RAM + 0x8000)
    assert rmap_entries(slot, 0) == [] and rmap_entries(slot, 1) == []
    assert rmap_entries(slot, 8) == [rmap_encode(1, L2 + 0x1000)]


def test_memslot_delete_and_move_drop_shadows_and_free_rmaps() -> None:
    vm, _backing = _setup()
    guest = vm.create_nested(7)
    guest.set_l2_mapping(L2, RAM, 8 * 4096)
    for page in range(8):
        guest.write(L2 + page * 4096, b"x")
    slot = vm.memslot(0)
    vm.set_user_memory_region(0, 0, RAM + 64 * MIB, 4 * MIB)  # move
    assert all(guest.pt.translate(L2 + p * 4096)[0] == 0 for p in range(8))
    assert slot.rmap is None and not slot.rmap_lists
    guest.set_l2_mapping(L2, RAM + 64 * MIB, 4096)
    guest.write(L2, b"y")
    vm.set_user_memory_region(0, 0, 0, 0)  # delete
    assert guest.pt.translate(L2)[0] == 0
    assert slot.rmap is None and not slot.rmap_lists
    with pytest.raises(vmm.GuestMemoryFault):
        guest.read(L2 + 0x100000, 1)
    with pytest.raises(vmm.VmmError, match="already exists"):
        vm.create_nested(7)
