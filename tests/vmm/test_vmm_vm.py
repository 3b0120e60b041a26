"""Memslots, faults, MMIO dispatch, the TLB and the vCPU access paths."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmm
from vmm.pte import PTE_PPN_SHIFT, PTE_W

MIB = 1 << 20
GIB = 1 << 30
RAM = 0x8000_0000


class Registers:
    """A tiny device: a register file that records every access."""

    def __init__(self) -> None:
        self.regs: dict[int, int] = {}
        self.log: list[tuple[str, int, int, int]] = []

    def mmio_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        return self.regs.get(offset, 0xA5A5A5A5)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.regs[offset] = value


def _vm(size: int = 4 * MIB, flags: int = 0, page_size: int = 4096) -> tuple[vmm.Vm, vmm.Vcpu]:
    vm = vmm.Vm()
    backing = (
        vmm.Backing.anonymous(size, page_size)
        if page_size == 4096
        else (vmm.Backing.hugetlb(size, page_size))
    )
    vm.set_user_memory_region(0, flags, RAM, size, backing)
    return vm, vm.create_vcpu(0)


def test_read_write_reach_host_memory() -> None:
    vm, cpu = _vm()
    cpu.write(RAM + 4090, b"across-a-page")
    assert cpu.read(RAM + 4090, 13) == b"across-a-page"
    backing = vm.memslot(0).backing
    assert bytes(backing.mem[4090:4103]) == b"across-a-page"
    cpu.write32(RAM + 64, 0xDEADBEEF)
    assert cpu.read32(RAM + 64) == 0xDEADBEEF
    cpu.write64(RAM + 128, 0x0102030405060708)
    assert cpu.read64(RAM + 128) == 0x0102030405060708
    # The second access to a page is a TLB hit.
    fills = cpu.tlb.fills
    assert cpu.read(RAM + 70, 2) == bytes(backing.mem[70:72])
    assert cpu.tlb.fills == fills


@pytest.mark.parametrize("page_size", [4096, 2 * MIB])
def test_read_into_fills_a_buffer_as_read_returns(page_size: int) -> None:
    vm, cpu = _vm(4 * MIB, page_size=page_size)
    pattern = np.random.default_rng(7).integers(0, 256, 4 * MIB, dtype=np.uint8)
    vm.memslot(0).backing.mem[:] = pattern.tobytes()
    buf = bytearray(3 * 4096 + 100)
    view = memoryview(buf)
    # inside one page or block (a hit once mapped), across pages, across 2M blocks, empty
    for gpa, n in [(RAM + 5, 64), (RAM + 5, 64), (RAM + 4000, 9000), (RAM + 2 * MIB - 50, 100),
                   (RAM + 123, 0)]:  # fmt: skip
        cpu.read_into(gpa, view[:n])
        assert bytes(view[:n]) == cpu.read(gpa, n) == pattern[gpa - RAM : gpa - RAM + n].tobytes()
    with pytest.raises(vmm.GuestMemoryFault):  # runs off the end of memory
        cpu.read_into(RAM + 4 * MIB - 8, view[:16])
    dev = Registers()
    vm.register_mmio(0x1000_0000, 256, dev)
    dev.regs[8] = 0x01020304
    cpu.read_into(0x1000_0008, view[:4])
    assert bytes(view[:4]) == bytes([4, 3, 2, 1]) and dev.log[-1] == ("r", 8, 4, 0)


def test_fault_maps_the_largest_leaf_alignment_allows() -> None:
    vm = vmm.Vm()
    backing = vmm.Backing.hugetlb(8 * MIB, 2 * MIB)
    vm.set_user_memory_region(0, 0, RAM, 8 * MIB, backing)
    # A slot whose GPA is not 2M-aligned relative to its HPA gets 4K leaves only.
    odd = vmm.Backing.hugetlb(4 * MIB, 2 * MIB)
    vm.set_user_memory_region(1, 0, RAM + 16 * MIB + 4096, 2 * MIB, odd, backing_offset=0)
    cpu = vm.create_vcpu(0)
    cpu.read(RAM + 3 * MIB, 8)
    leaf = vm.pt.get_leaf(RAM + 3 * MIB)
    assert leaf is not None and leaf.level == 1 and leaf.gpa == RAM + 2 * MIB
    assert leaf.writable  # not logged, not read-only: mapped writable even on a read
    cpu.read(RAM + 16 * MIB + 8192, 8)
    leaf = vm.pt.get_leaf(RAM + 16 * MIB + 8192)
    assert leaf is not None and leaf.level == 0


def test_one_gib_hugetlb_maps_a_gib_leaf() -> None:
    vm = vmm.Vm()
    vm.set_user_memory_region(0, 0, GIB, GIB, vmm.Backing.hugetlb(GIB, GIB))
    cpu = vm.create_vcpu(0)
    cpu.write(GIB + 12345, b"x")
    leaf = vm.pt.get_leaf(GIB)
    assert leaf is not None and leaf.level == 2


def test_access_outside_memory_is_a_clear_error() -> None:
    cpu = _vm()[1]
    with pytest.raises(vmm.GuestMemoryFault, match="no memslot or MMIO region"):
        cpu.read(0x1000, 4)
    with pytest.raises(vmm.GuestMemoryFault):
        cpu.touch(RAM + 4 * MIB, 8192)


def test_readonly_slot_write_exits_as_mmio() -> None:
    vm, cpu = _vm(flags=vmm.KVM_MEM_READONLY)
    vm.memslot(0).backing.mem[0:4] = b"rom!"
    assert cpu.read(RAM, 4) == b"rom!"
    with pytest.raises(vmm.MmioExit) as exit_info:
        cpu.write(RAM, b"oops")
    assert exit_info.value.gpa == RAM and exit_info.value.is_write
    assert exit_info.value.data == b"oops"
    assert cpu.read(RAM, 4) == b"rom!"
    leaf = vm.pt.get_leaf(RAM)
    assert leaf is not None and not leaf.writable


def test_mmio_dispatch_and_overlaps() -> None:
    vm, cpu = _vm()
    dev = Registers()
    vm.register_mmio(0x1000_0000, 256, dev)
    cpu.write(0x1000_0008, (0x12345678).to_bytes(4, "little"))
    assert dev.log[-1] == ("w", 8, 4, 0x12345678)
    assert cpu.read32(0x1000_0008) == 0x12345678
    cpu.write32(0x1000_000C, 7)
    assert dev.regs[12] == 7
    assert cpu.read(0x1000_0010, 4) == (0xA5A5A5A5).to_bytes(4, "little")
    with pytest.raises(vmm.MmioError, match="overlaps the MMIO region"):
        vm.register_mmio(0x1000_0080, 0x1000, Registers())
    with pytest.raises(vmm.MmioError, match="overlaps memslot"):
        vm.register_mmio(RAM + 4096, 4096, Registers())
    with pytest.raises(vmm.MemslotError, match="overlaps the MMIO region"):
        vm.set_user_memory_region(5, 0, 0x1000_0000, 4096, vmm.Backing.anonymous(4096))
    with pytest.raises(vmm.MmioError, match="1, 2, 4 or 8"):
        cpu.read(0x1000_0000, 3)
    with pytest.raises(vmm.MmioError, match="must provide"):
        vm.register_mmio(0x2000_0000, 16, object())  # type: ignore[arg-type]
    vm.unregister_mmio(0x1000_0000)
    with pytest.raises(vmm.GuestMemoryFault):
        cpu.read32(0x1000_0008)
    with pytest.raises(vmm.MmioError, match="no MMIO region"):
        vm.unregister_mmio(0x1000_0000)


def test_memslot_rules() -> None:
    vm, cpu = _vm()
    b = vmm.Backing.anonymous(2 * MIB)
    with pytest.raises(vmm.MemslotError, match="overlaps slot 0"):
        vm.set_user_memory_region(1, 0, RAM + MIB, 2 * MIB, b)
    with pytest.raises(vmm.MemslotError, match="41-bit"):
        vm.set_user_memory_region(1, 0, (1 << 41) - MIB, 2 * MIB, b)
    with pytest.raises(vmm.MemslotError, match="multiples of 4 KiB"):
        vm.set_user_memory_region(1, 0, RAM + 8 * MIB + 1, 2 * MIB, b)
    with pytest.raises(vmm.MemslotError, match="unknown memslot flags"):
        vm.set_user_memory_region(1, 0x80, RAM + 8 * MIB, 2 * MIB, b)
    with pytest.raises(vmm.MemslotError, match="exceeds the backing"):
        vm.set_user_memory_region(1, 0, RAM + 8 * MIB, 4 * MIB, b)
    with pytest.raises(vmm.MemslotError, match="does not exist"):
        vm.set_user_memory_region(9, 0, 0, 0, None)
    with pytest.raises(vmm.MemslotError, match="READONLY cannot change"):
        vm.set_user_memory_region(0, vmm.KVM_MEM_READONLY, RAM, 4 * MIB)
    with pytest.raises(vmm.MemslotError, match="size of an existing slot"):
        vm.set_user_memory_region(0, 0, RAM, 2 * MIB)
    # Move: the old GPA stops working, the new one shows the same host memory.
    cpu.write(RAM + 100, b"moved")
    vm.set_user_memory_region(0, 0, RAM + 64 * MIB, 4 * MIB)
    assert cpu.read(RAM + 64 * MIB + 100, 5) == b"moved"
    with pytest.raises(vmm.GuestMemoryFault):
        cpu.read(RAM + 100, 5)
    # Delete.
    vm.set_user_memory_region(0, 0, 0, 0)
    with pytest.raises(vmm.GuestMemoryFault):
        cpu.read(RAM + 64 * MIB + 100, 5)
    assert vm.pt.leaves()[0].size == 0


def test_sv32x4_space_bounds() -> None:
    vm = vmm.Vm(mode="sv32x4")
    with pytest.raises(vmm.MemslotError, match="34-bit"):
        vm.set_user_memory_region(0, 0, 1 << 34, 4096, vmm.Backing.anonymous(4096))
    top = (1 << 34) - 4096  # a slot must end below the last frame (KVM RISC-V's -EFAULT)
    vm.set_user_memory_region(0, 0, top - 8 * MIB, 8 * MIB, vmm.Backing.anonymous(8 * MIB))
    cpu = vm.create_vcpu(0)
    cpu.write(top - 8, b"top!")
    assert cpu.read(top - 8, 4) == b"top!"


def test_backings_from_buffer_and_fd(tmp_path: object) -> None:
    shm = mmap.mmap(-1, 2 * MIB)
    vm = vmm.Vm()
    vm.set_user_memory_region(0, 0, RAM, 2 * MIB, vmm.Backing.from_buffer(shm))
    cpu = vm.create_vcpu(0)
    cpu.write(RAM + 10, b"shared")
    assert shm[10:16] == b"shared"
    fd = os.memfd_create("vmm-test")
    try:
        os.ftruncate(fd, MIB)
        backing = vmm.Backing.from_fd(fd, MIB)
        vm.set_user_memory_region(1, 0, RAM + 4 * MIB, MIB, backing)
        cpu.write(RAM + 4 * MIB + 7, b"fd!")
        assert os.pread(fd, 3, 7) == b"fd!"
        with pytest.raises(vmm.VmmError, match="holds"):
            vmm.Backing.from_fd(fd, 2 * MIB)
    finally:
        os.close(fd)
    with pytest.raises(vmm.VmmError, match="writable"):
        vmm.Backing.from_buffer(bytes(8192))
    with pytest.raises(vmm.VmmError, match="multiple of its page size"):
        vmm.Backing.from_buffer(bytearray(5000))
    with pytest.raises(vmm.VmmError, match="2 MiB or 1 GiB"):
        vmm.Backing.hugetlb(4 * MIB, 4096)
    a, b = vmm.Backing.thp(4 * MIB), vmm.Backing.hugetlb(4 * MIB)
    assert a.page_size == b.page_size == 2 * MIB
    assert a.hpa % (2 * MIB) == 0
    assert a.hpa_end <= b.hpa or b.hpa_end <= a.hpa


def test_tlb_conflict_needs_break_before_make() -> None:
    vm, cpu = _vm(4 * MIB, page_size=2 * MIB)
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, 4 * MIB)
    cpu.write(RAM, b"a")  # 4K leaf under logging, cached in the TLB
    vm.set_user_memory_region(0, 0, RAM, 4 * MIB)
    vm.debug_skip_coalesce_tlbi = True
    with pytest.raises(vmm.TlbConflictAbort, match="level-1 entry while a level-0"):
        cpu.read(RAM + 8192, 8)  # faults, coalesces to a 2M block without invalidating
    # With break-before-make the same sequence is fine.
    vm2, cpu2 = _vm(4 * MIB, page_size=2 * MIB)
    vm2.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, 4 * MIB)
    cpu2.write(RAM, b"a")
    vm2.set_user_memory_region(0, 0, RAM, 4 * MIB)
    assert cpu2.read(RAM, 1) == b"a"
    cpu2.read(RAM + 8192, 8)
    leaf = vm2.pt.get_leaf(RAM)
    assert leaf is not None and leaf.level == 1
    assert cpu2.read(RAM, 1) == b"a"


def test_tlb_flush_shapes() -> None:
    vm, cpu = _vm(4 * MIB, page_size=2 * MIB)
    cpu.read(RAM, 1)
    cpu.read(RAM + 2 * MIB, 1)
    tlb = cpu.tlb
    assert tlb.lookup(vm.vmid, RAM + 5) is not None
    tlb.flush_addr(vm.vmid, RAM, 0)  # wrong level hint: the 2M entry stays
    assert tlb.lookup(vm.vmid, RAM + 5) is not None
    tlb.flush_addr(vm.vmid, RAM, 1)
    assert tlb.lookup(vm.vmid, RAM + 5) is None
    tlb.flush_range(vm.vmid, RAM + 3 * MIB, 4096)
    assert tlb.lookup(vm.vmid, RAM + 2 * MIB) is None
    cpu.read(RAM, 1)
    other = vmm.Vm()  # entries are tagged by VMID
    tlb.flush_vmid(other.vmid)
    assert tlb.lookup(vm.vmid, RAM) is not None
    tlb.flush_vmid(vm.vmid)
    assert len(tlb) == 0


def test_bulk_touch_goes_through_faults_and_writes_memory() -> None:
    vm, cpu = _vm(8 * MIB)
    cpu.touch(RAM, 8 * MIB, write=True)
    backing = vm.memslot(0).backing
    words = backing.u64.reshape(-1, 512)[:, 0]
    assert (words == np.uint64(0x0123456789ABCDEF)).all()
    assert vm.faults == 2048
    values = cpu.touch(RAM, 8 * MIB, write=False)
    assert values is not None and (values == np.uint64(0x0123456789ABCDEF)).all()
    assert vm.faults == 2048  # the retry hits
    assert len(cpu.tlb) == vm.tlb_entries  # the newest translations stay cached


# ---------------------------------------------------------------------- property test
SLOT_PAGES = 1024
_vm_ops = st.one_of(
    st.tuples(st.just("access"), st.integers(0, 3), st.integers(0, SLOT_PAGES - 1), st.booleans()),
    st.tuples(
        st.just("bulk"),
        st.integers(0, 3),
        st.integers(0, SLOT_PAGES - 1),
        st.integers(1, 300),
        st.booleans(),
    ),
    st.tuples(
        st.just("scatter"),
        st.integers(0, 3),
        st.integers(0, 2**32 - 1),
        st.integers(1, 400),
        st.booleans(),
    ),
    st.tuples(st.just("log"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("move"), st.integers(0, 3), st.integers(0, 7)),
    st.tuples(st.just("delete"), st.integers(0, 3)),
    st.tuples(st.just("get"), st.integers(0, 3)),
    st.tuples(st.just("invalidate"), st.integers(0, 4 * SLOT_PAGES - 1), st.integers(1, 2000)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_vm_ops, min_size=1, max_size=30))
def test_faults_and_memslot_changes_match_a_reference(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    vm = vmm.Vm()
    cpu = vm.create_vcpu(0)
    size = SLOT_PAGES * 4096
    backings = [
        vmm.Backing.anonymous(size) if i % 2 else vmm.Backing.hugetlb(size, 2 * MIB)
        for i in range(4)
    ]
    where = {i: RAM + i * 16 * MIB for i in range(4)}
    for i in range(4):
        vm.set_user_memory_region(i, 0, where[i], size, backings[i])
    for op in ops:
        kind = op[0]
        if kind == "access":
            _, slot, page, write = op
            if slot not in where:
                continue
            gpa = where[slot] + page * 4096 + 8
            if write:
                cpu.write(gpa, page.to_bytes(4, "little"))
            assert cpu.read(gpa, 4) == bytes(backings[slot].mem[page * 4096 + 8 : page * 4096 + 12])
        elif kind == "bulk":
            _, slot, page, count, write = op
            if slot not in where:
                continue
            count = min(count, SLOT_PAGES - page)
            cpu.touch(where[slot] + page * 4096, count * 4096, write=write)
        elif kind == "scatter":
            _, slot, seed, count, write = op
            if slot not in where:
                continue
            rng = np.random.default_rng(seed)
            offsets = rng.integers(0, SLOT_PAGES, count).astype(np.uint64) * np.uint64(4096)
            gpas = np.uint64(where[slot]) + offsets + np.uint64(16)
            got = cpu.access_many(gpas, write=write, value=seed)
            words = backings[slot].u64[(offsets + np.uint64(16)).astype(np.int64) // 8]
            if write:
                assert (words == np.uint64(seed)).all()
            else:
                assert got is not None and np.array_equal(got, words)
        elif kind == "log":
            _, slot, on = op
            if slot in where:
                vm.set_user_memory_region(
                    slot, vmm.KVM_MEM_LOG_DIRTY_PAGES if on else 0, where[slot], size
                )
        elif kind == "move":
            _, slot, dest = op
            if slot in where and RAM + dest * 16 * MIB not in where.values():
                where[slot] = RAM + dest * 16 * MIB
                vm.set_user_memory_region(slot, vm.memslot(slot).flags, where[slot], size)
        elif kind == "delete":
            _, slot = op
            if slot in where:
                vm.set_user_memory_region(slot, 0, where.pop(slot), 0)
        elif kind == "get":
            _, slot = op
            if slot in where and vm.memslot(slot).logging:
                vm.get_dirty_log(slot)
        else:
            _, page, count = op
            vm.invalidate_range(RAM + page * 4096, count * 4096)
        # Reference: every mapped GPA translates to its slot's HPA, W only when allowed.
        g, p, lv = vm.pt.leaves()
        for gpa, pte, level in zip(g.tolist(), p.tolist(), lv.tolist(), strict=True):
            span = vm.mode.level_size(level)
            slot_id = next((s for s, base in where.items() if base <= gpa < base + size), None)
            assert slot_id is not None, f"stale mapping at {gpa:#x}"
            assert gpa + span <= where[slot_id] + size
            memslot = vm.memslot(slot_id)
            assert (pte >> PTE_PPN_SHIFT) << 12 == memslot.hpa_of(gpa)
            if memslot.logging:
                assert level == 0 or not pte & PTE_W
                if pte & PTE_W:
                    # Writable under logging only once marked dirty (GET re-protects).
                    assert memslot.dirty_bitmap is not None
                    off = (gpa - memslot.gpa) >> 12
                    assert int(memslot.dirty_bitmap[off >> 6]) >> (off & 63) & 1


def test_eager_split_on_enabling_logging() -> None:
    vm = vmm.Vm(eager_split=True, eager_split_chunk=2 * MIB)
    vm.set_user_memory_region(0, 0, RAM, 8 * MIB, vmm.Backing.hugetlb(8 * MIB, 2 * MIB))
    cpu = vm.create_vcpu(0)
    cpu.touch(RAM, 8 * MIB, stride=2 * MIB)
    assert set(vm.pt.leaves()[2].tolist()) == {1}
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, 8 * MIB)
    _g, ptes, levels = vm.pt.leaves()
    assert levels.size == 2048 and set(levels.tolist()) == {0}  # split up front, all kept
    assert not (ptes & np.uint64(PTE_W)).any()  # and write-protected
    cpu.write(RAM + 4096, b"w")
    words = vm.get_dirty_log(0)
    assert int(words[0]) == 1 << 1


def test_64_bit_accesses_on_every_path() -> None:
    vm, cpu = _vm()
    backing = vm.memslot(0).backing
    cpu.write64(RAM + 0x2000, 1)  # a miss: fault, map, fill
    cpu.write64(RAM + 0x2008, -1)  # wrapped modulo 2**64
    cpu.write64(RAM + 0x2010, 1 << 64 | 5)
    assert cpu.read64(RAM + 0x2008) == (1 << 64) - 1 and cpu.read64(RAM + 0x2010) == 5
    cpu.write64(RAM + 0x2FFC, 0x1122334455667788)  # misaligned, across two pages
    assert bytes(backing.mem[0x2FFC:0x3004]) == (0x1122334455667788).to_bytes(8, "little")
    assert cpu.read64(RAM + 0x2FFC) == 0x1122334455667788
    cpu.write64(RAM + 0x2003, 7)  # misaligned inside the page
    assert cpu.read64(RAM + 0x2003) == 7 and backing.mem[0x2003] == 7
    with pytest.raises(vmm.GuestMemoryFault):
        cpu.write64(RAM + 64 * MIB, 1)
    with pytest.raises(vmm.VmmError):
        cpu.read64(-8)


def test_64_bit_writes_through_a_word_view_are_logged_after_every_harvest() -> None:
    """A cached word view must go with the write permission: a write after GET_DIRTY_LOG
    re-protected the page is a fault, and the page is reported again."""
    vm, cpu = _vm(flags=vmm.KVM_MEM_LOG_DIRTY_PAGES)
    for round_ in range(3):
        for _ in range(3):  # the second and third write hit the word view
            cpu.write64(RAM + 3 * 4096 + 8, round_)
        assert int(vm.get_dirty_log(0)[0]) == 1 << 3
    assert int(vm.get_dirty_log(0)[0]) == 0


def test_64_bit_accesses_to_a_block_and_to_mmio() -> None:
    vm, cpu = _vm(size=4 * MIB, page_size=2 * MIB)
    cpu.write64(RAM + 2 * MIB + 16, 42)
    assert cpu.tlb.lookup(vm.vmid, RAM + 2 * MIB).level == 1  # type: ignore[union-attr]
    cpu.write64(RAM + 2 * MIB + 24, 43)  # through the block's word view
    assert cpu.read64(RAM + 2 * MIB + 16) == 42 and cpu.read64(RAM + 2 * MIB + 24) == 43
    regs = Registers()
    vm.register_mmio(0x4000_0000, 0x1000, regs)
    cpu.write64(0x4000_0008, 0xAB)
    assert regs.log[-1] == ("w", 8, 8, 0xAB)
    assert cpu.read64(0x4000_0008) == 0xAB
