"""The issue-9 semantics, one test (or group) per point, each as KVM documents or does it.

1. nested writes are dirty-logged (kvmhv_update_nest_rmap_rc_list keeps shadow PTEs in step
   with re-protection; an L2 runs on an L1 vCPU, so a ring mode write lands on its ring);
2. a memslot MOVE with logging on keeps its bitmap (kvm_prepare_memory_region);
3. KVM_CAP_DIRTY_LOG_RING's argument is bytes (kvm_vm_ioctl_enable_dirty_log_ring);
4. the ring-full exit comes at the soft limit (kvm_dirty_ring_soft_full);
5. KVM_CLEAR_DIRTY_LOG works without MANUAL_DIRTY_LOG_PROTECT2 (kvm_clear_dirty_log_protect);
6. KVM RISC-V refuses a memslot reaching the top GPA frame (kvm_arch_prepare_memory_region);
7. every G-stage leaf is dirty (gstage_map_page: pte_mkdirty);
8. BAR0 accepts every size as QEMU 7.2 does (tests/vmm/test_ivshmem_device.py, against QEMU);
9. the nested rmap compares only the LPID and GPA fields (kvmhv_n_rmap_is_equal).
"""

from __future__ import annotations

import numpy as np
import pytest

import vmm
from vmm.bench.pagetable import run_page_table_test, selftest_gpa
from vmm.dirty import bitmap_to_bools
from vmm.pte import PTE_D, PTE_W, get_mode
from vmm.rmap import insert_nest_rmap, rmap_encode, rmap_entries

RAM = 0x8000_0000
L2 = 0x1000_0000
PAGES = 64
RING_BYTES = 4096  # the smallest ring KVM accepts: 256 entries, soft limit 192


def _logged(
    *, manual: int = 0, ring: int = 0, with_bitmap: bool = False, pages: int = PAGES
) -> tuple[vmm.Vm, vmm.Backing]:
    vm = vmm.Vm()
    if manual:
        vm.enable_cap(vmm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual)
    if ring:
        vm.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, ring)
    if with_bitmap:
        vm.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    backing = vmm.Backing.anonymous(pages * 4096)
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, pages * 4096, backing)
    return vm, backing


def _dirty_pages(vm: vmm.Vm, slot: int = 0) -> list[int]:
    npages = vm.memslot(slot).npages
    return np.flatnonzero(bitmap_to_bools(vm.get_dirty_log(slot), npages)).tolist()


# ---------------------------------------------------------------------- 1. nested writes
def test_issue_reproduction_nested_write_after_get_dirty_log_is_logged() -> None:
    vm = vmm.Vm()
    b = vmm.Backing.anonymous(64 * 4096)
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, 0x8000_0000, b.size, b)
    g = vm.create_nested(1)
    g.set_l2_mapping(0x1000_0000, 0x8000_0000, 16 * 4096)
    g.write(0x1000_0000 + 3 * 4096, b"a")
    vm.get_dirty_log(0)
    g.write(0x1000_0000 + 3 * 4096, b"b")
    assert vm.get_dirty_log(0)[0] == 0x8


def test_nested_shadow_made_before_logging_is_protected_when_logging_starts() -> None:
    vm = vmm.Vm()
    b = vmm.Backing.anonymous(PAGES * 4096)
    vm.set_user_memory_region(0, 0, RAM, b.size, b)
    g = vm.create_nested(1)
    g.set_l2_mapping(L2, RAM, 16 * 4096)
    g.write(L2 + 5 * 4096, b"before")  # a writable shadow PTE, made while not logging
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, b.size)
    g.write(L2 + 5 * 4096, b"after")
    assert _dirty_pages(vm) == [5]


def test_nested_writes_are_logged_under_manual_protect_clear() -> None:
    vm, _b = _logged(manual=vmm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    g = vm.create_nested(2)
    g.set_l2_mapping(L2, RAM, 16 * 4096)
    g.write(L2 + 7 * 4096, b"x")
    words = vm.get_dirty_log(0)
    assert np.flatnonzero(bitmap_to_bools(words, PAGES)).tolist() == [7]
    vm.clear_dirty_log(0, 0, PAGES, words)
    assert _dirty_pages(vm) == []
    g.write(L2 + 7 * 4096, b"y")  # the CLEAR write-protected the shadow PTE too
    assert _dirty_pages(vm) == [7]


def test_nested_write_in_ring_mode_lands_on_the_running_vcpus_ring() -> None:
    vm, _b = _logged(ring=RING_BYTES)
    vcpu = vm.create_vcpu(0)
    other = vm.create_vcpu(1)
    g = vm.create_nested(3)
    g.set_l2_mapping(L2, RAM, 16 * 4096)
    g.write(L2 + 2 * 4096, b"on vcpu 1", vcpu=other)
    g.write(L2 + 4 * 4096, b"on the default vcpu")
    assert vcpu.dirty_ring is not None and other.dirty_ring is not None
    assert other.dirty_ring.harvest()[1].tolist() == [2]
    assert vcpu.dirty_ring.harvest()[1].tolist() == [4]
    vm.reset_dirty_rings()  # re-protects the collected pages, shadows included
    g.write(L2 + 2 * 4096, b"again", vcpu=other)
    assert other.dirty_ring.harvest()[1].tolist() == [2]


def test_write_without_a_vcpu_in_ring_mode_needs_the_bitmap() -> None:
    vm, _b = _logged(ring=RING_BYTES)
    g = vm.create_nested(4)
    g.set_l2_mapping(L2, RAM, 4096)
    with pytest.raises(vmm.DirtyLogError, match="RING_WITH_BITMAP"):
        g.write(L2, b"lost?")  # no vCPU to run it, no bitmap: refused, never dropped
    with pytest.raises(vmm.DirtyLogError, match="RING_WITH_BITMAP"):
        vm.write_guest(RAM + 3 * 4096, b"device")
    assert vm.read_guest(RAM + 3 * 4096, 6) == bytes(6)
    both, _b2 = _logged(ring=RING_BYTES, with_bitmap=True)
    both.write_guest(both.memslot(0).gpa + 3 * 4096, b"device")
    assert _dirty_pages(both) == [3]


def test_device_writes_are_logged_through_the_same_sink() -> None:
    vm, backing = _logged()
    vm.write_guest(RAM + 4090, b"spans two pages")
    assert bytes(backing.mem[4090:4105]) == b"spans two pages"
    assert _dirty_pages(vm) == [0, 1]
    ring_vm, _b = _logged(ring=RING_BYTES)
    cpu = ring_vm.create_vcpu(0)
    ring_vm.write_guest(RAM + 9 * 4096, b"dma", vcpu=cpu)
    assert cpu.dirty_ring is not None and cpu.dirty_ring.harvest()[1].tolist() == [9]


# ---------------------------------------------------------------------- 2. move keeps bitmap
def test_memslot_move_with_logging_keeps_the_dirty_bitmap() -> None:
    vm, _b = _logged(manual=vmm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    cpu = vm.create_vcpu(0)
    cpu.write(RAM + 3 * 4096, b"before the move")
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM + (1 << 30), PAGES * 4096)
    cpu.write(RAM + (1 << 30) + 9 * 4096, b"after the move")
    assert _dirty_pages(vm) == [3, 9]


# ---------------------------------------------------------------------- 3. ring size in bytes
def test_dirty_ring_capability_takes_bytes() -> None:
    with pytest.raises(vmm.DirtyLogError, match="below a page"):
        vmm.Vm().enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 2048)
    with pytest.raises(vmm.DirtyLogError, match="power of two"):
        vmm.Vm().enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 6144)
    with pytest.raises(vmm.DirtyLogError, match="E2BIG"):
        vmm.Vm().enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 65536 * 16 * 2)
    vm = vmm.Vm()
    vm.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 8192)
    ring = vm.create_vcpu(0).dirty_ring
    assert ring is not None and ring.entries == 8192 // 16
    with pytest.raises(vmm.DirtyLogError, match="flags must be 0"):
        vmm.Vm().enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 4096, flags=1)
    again = vmm.Vm()
    again.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 4096)
    with pytest.raises(vmm.DirtyLogError, match="once"):
        again.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 4096)


# ---------------------------------------------------------------------- 4. soft limit
def test_ring_full_exit_comes_at_the_soft_limit() -> None:
    vm, _b = _logged(ring=RING_BYTES, pages=512)
    cpu = vm.create_vcpu(0)
    ring = cpu.dirty_ring
    assert ring is not None and ring.entries == 256 and ring.soft_limit == 256 - 64
    for page in range(192):
        cpu.write64(RAM + page * 4096, page)
    with pytest.raises(vmm.DirtyRingFull):
        cpu.write64(RAM + 192 * 4096, 192)
    assert ring.used == 192 and ring.full
    ring.harvest()
    vm.reset_dirty_rings()
    with pytest.raises(vmm.DirtyRingFull) as info:  # the bulk path stops at the same limit
        cpu.touch(RAM + 200 * 4096, 300 * 4096)
    assert info.value.completed == 192


# ---------------------------------------------------------------------- 5. clear w/o manual
def test_clear_dirty_log_works_without_manual_protect() -> None:
    vm, _b = _logged()
    cpu = vm.create_vcpu(0)
    cpu.write(RAM, b"a")
    cpu.write(RAM + 10 * 4096, b"b")
    ones = np.full(1, np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    vm.clear_dirty_log(0, 0, PAGES, ones)  # clears the bits and write-protects the pages
    leaf = vm.pt.get_leaf(RAM)
    assert leaf is not None and not leaf.writable
    assert _dirty_pages(vm) == []
    cpu.write(RAM + 10 * 4096, b"c")
    assert _dirty_pages(vm) == [10]
    ring_vm, _b2 = _logged(ring=RING_BYTES)
    with pytest.raises(vmm.DirtyLogError, match="ENXIO"):
        ring_vm.clear_dirty_log(0, 0, PAGES, ones)


# ---------------------------------------------------------------------- 6. GPA space top
def test_memslot_reaching_the_top_gpa_frame_is_refused() -> None:
    mode = get_mode("sv39x4")
    vm = vmm.Vm(mode)
    backing = vmm.Backing.anonymous(2 << 20)
    with pytest.raises(vmm.MemslotError, match="must end below the top"):
        vm.set_user_memory_region(0, 0, mode.gpa_limit - (2 << 20), 2 << 20, backing)
    vm.set_user_memory_region(0, 0, mode.gpa_limit - (2 << 20) - 4096, 2 << 20, backing)
    with pytest.raises(vmm.MemslotError, match="must end below the top"):  # a move, too
        vm.set_user_memory_region(0, 0, mode.gpa_limit - (2 << 20), 2 << 20)


@pytest.mark.parametrize(("mode", "backing"), [("sv39x4", "anonymous"), ("sv32x4", "thp")])
def test_page_table_test_places_its_slot_as_the_selftest_does(mode: str, backing: str) -> None:
    m = get_mode(mode)
    lpage = 4096 if backing == "anonymous" else 2 << 20
    gpa = selftest_gpa(m, 8 << 20, lpage)
    assert gpa % lpage == 0 and gpa + (8 << 20) < m.gpa_limit
    assert gpa == ((m.gpa_limit >> 12) - 1 - (8 << 20) // 4096) * 4096 // lpage * lpage
    result = run_page_table_test(8 << 20, 1, backing, mode)
    assert result.gpa == gpa and result.tlb_conflict is None


# ---------------------------------------------------------------------- 7. dirty leaves
def test_every_leaf_is_installed_dirty() -> None:
    vm, _b = _logged()
    cpu = vm.create_vcpu(0)
    cpu.read(RAM, 8)  # a read fault under logging: a read-only leaf
    leaf = vm.pt.get_leaf(RAM)
    assert leaf is not None and not leaf.pte & PTE_W and leaf.pte & PTE_D
    pt = vmm.Stage2PageTable()
    pt.ioremap(0x1000_0000, 0x2000_0000, 4096, writable=False)
    pte, _level = pt.translate(0x1000_0000)
    assert pte & PTE_D and not pte & PTE_W


# ---------------------------------------------------------------------- 9. rmap identity
def test_rmap_dedup_compares_only_lpid_and_gpa() -> None:
    vm = vmm.Vm()
    vm.set_user_memory_region(0, 0, RAM, 4 * 4096, vmm.Backing.anonymous(4 * 4096))
    slot = vm.memslot(0)
    a, b = rmap_encode(1, 0x1000), rmap_encode(2, 0x5000)
    assert insert_nest_rmap(slot, 0, a)
    assert not insert_nest_rmap(slot, 0, a | 0x0E)  # other bits differ: the same entry
    assert insert_nest_rmap(slot, 0, b)
    assert not insert_nest_rmap(slot, 0, b | 0x800)  # in list form, too
    assert rmap_entries(slot, 0) == [a, b]
