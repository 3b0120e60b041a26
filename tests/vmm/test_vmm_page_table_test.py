"""kvm_page_table_test on the model: mapping levels after each stage, and the TLB conflict."""

from __future__ import annotations

import pytest

from vmm.bench.pagetable import run_page_table_test

MIB = 1 << 20


@pytest.mark.parametrize("vcpus", [1, 4])
@pytest.mark.parametrize(("backing", "block_level"), [("anonymous", 0), ("thp", 1), ("hugetlb", 1)])
def test_stages_map_at_the_expected_levels(backing: str, block_level: int, vcpus: int) -> None:
    size = 64 * MIB
    result = run_page_table_test(size, vcpus, backing)
    assert result.tlb_conflict is None
    pages, blocks = size // 4096, size // (2 * MIB)
    create = result.levels["KVM_CREATE_MAPPINGS"]
    update = result.levels["KVM_UPDATE_MAPPINGS"]
    adjust = result.levels["KVM_ADJUST_MAPPINGS"]
    if block_level == 0:
        assert create == update == adjust == {0: pages}
    else:
        assert create == {1: blocks}  # blocks after CREATE
        # 4K pages during logging: the written first page plus the read second half.
        assert update == {0: blocks * (1 + 256)}
        assert adjust == {1: blocks}  # blocks again after ADJUST


def test_gib_blocks_split_and_coalesce() -> None:
    result = run_page_table_test(1 << 30, 1, "hugetlb1g", populate=False)
    assert result.levels["KVM_CREATE_MAPPINGS"] == {2: 1}
    assert result.levels["KVM_UPDATE_MAPPINGS"] == {0: 1 + (1 << 30) // 4096 // 2}
    assert result.levels["KVM_ADJUST_MAPPINGS"] == {2: 1}


@pytest.mark.parametrize("vcpus", [1, 4])
@pytest.mark.parametrize("backing", ["thp", "hugetlb"])
def test_skipping_the_coalesce_invalidation_is_a_tlb_conflict(backing: str, vcpus: int) -> None:
    result = run_page_table_test(32 * MIB, vcpus, backing, debug_skip_coalesce_tlbi=True)
    assert result.tlb_conflict is not None
    assert "level-1 entry while a level-0 entry" in result.tlb_conflict
    assert "KVM_ADJUST_MAPPINGS" in result.times
    assert "KVM_ADJUST_MAPPINGS" not in result.levels


@pytest.mark.parametrize("mode", ["sv32x4", "sv48x4"])
def test_other_modes(mode: str) -> None:
    result = run_page_table_test(16 * MIB, 1, "thp", mode)
    assert result.tlb_conflict is None
    block = 1 if mode == "sv48x4" else None
    if block is not None:
        assert result.levels["KVM_ADJUST_MAPPINGS"] == {1: 8}
    else:
        # Sv32x4's level-1 leaf is 4 MiB: 2 MiB backing pages only allow 4K leaves.
        assert set(result.levels["KVM_ADJUST_MAPPINGS"]) == {0}
