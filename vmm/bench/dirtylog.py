"""dirty_log_perf_test on the model, plus the bulk-vs-per-page walker comparison.

Each vCPU owns ``size`` bytes of one memslot. Populate (every vCPU writes its pages), enable
dirty logging, then per iteration: the vCPUs dirty their memory, the host gets the dirty log
and (with manual protect, the default) clears it. ``-g`` turns manual protect off, as the
selftest's option does: GET then clears and re-protects on its own.

:func:`compare_with_per_page` maps ``size`` bytes with 4K pages and times write-protect,
unmap and a full get+clear dirty-log harvest with the walker-based bulk operations and with
the seed's per-page loops (:class:`vmm.reference.PerPageWalker`) on the same tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..memory import Backing
from ..memslot import KVM_MEM_LOG_DIRTY_PAGES
from ..pte import PAGE_SIZE, get_mode, leaf_perms
from ..reference import PerPageWalker
from ..stage2 import Stage2PageTable
from ..vm import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    Vm,
)

__all__ = ["DirtyLogResult", "WalkerComparison", "compare_with_per_page", "run_dirty_log_perf"]

SLOT = 1
BASE_GPA = 1 << 32


@dataclass
class DirtyLogResult:
    size: int
    vcpus: int
    iterations: int
    manual_protect: bool
    populate: float = 0.0
    enable: float = 0.0
    disable: float = 0.0
    dirty: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    clear: list[float] = field(default_factory=list)
    dirty_pages: list[int] = field(default_factory=list)


def run_dirty_log_perf(
    size: int = 1 << 30,
    vcpus: int = 1,
    iterations: int = 2,
    manual_protect: bool = True,
    mode: str = "sv39x4",
) -> DirtyLogResult:
    total = size * vcpus
    backing = Backing.anonymous(total, populate=True)
    vm = Vm(get_mode(mode))
    result = DirtyLogResult(size, vcpus, iterations, manual_protect)
    if manual_protect:
        vm.enable_cap(
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
        )
    vm.set_user_memory_region(SLOT, 0, BASE_GPA, total, backing)
    cpus = [vm.create_vcpu(i) for i in range(vcpus)]
    npages = total // PAGE_SIZE
    try:
        start = time.perf_counter()
        for cpu in cpus:
            cpu.touch(BASE_GPA + cpu.id * size, size)
        result.populate = time.perf_counter() - start

        start = time.perf_counter()
        vm.set_user_memory_region(SLOT, KVM_MEM_LOG_DIRTY_PAGES, BASE_GPA, total)
        result.enable = time.perf_counter() - start

        for iteration in range(1, iterations + 1):
            start = time.perf_counter()
            for cpu in cpus:
                cpu.touch(BASE_GPA + cpu.id * size, size, value=iteration)
            result.dirty.append(time.perf_counter() - start)

            start = time.perf_counter()
            words = vm.get_dirty_log(SLOT)
            result.get.append(time.perf_counter() - start)
            result.dirty_pages.append(int(np.bitwise_count(words).sum()))

            if manual_protect:
                start = time.perf_counter()
                vm.clear_dirty_log(SLOT, 0, npages, words)
                result.clear.append(time.perf_counter() - start)

        start = time.perf_counter()
        vm.set_user_memory_region(SLOT, 0, BASE_GPA, total)
        result.disable = time.perf_counter() - start
        return result
    finally:
        vm.close()
        backing.close()


@dataclass
class WalkerComparison:
    size: int
    bulk: dict[str, float] = field(default_factory=dict)
    per_page: dict[str, float] = field(default_factory=dict)
    table_bytes: int = 0
    hardware_bytes: int = 0

    def ratio(self, op: str) -> float:
        return self.per_page[op] / self.bulk[op] if self.bulk[op] else float("inf")

    @property
    def memory_ratio(self) -> float:
        return self.table_bytes / self.hardware_bytes


def _hardware_table_bytes(mode_name: str, size: int) -> int:
    """What the hardware needs for ``size`` bytes of 4K leaves: leaf tables, the upper
    levels, the x4 root."""
    mode = get_mode(mode_name)
    pages = 4  # the x4 root
    for level in range(mode.root_level):  # tables of level L each cover level_size(L + 1)
        pages += -(-size // mode.level_size(level + 1))
    return pages * PAGE_SIZE


def compare_with_per_page(size: int = 1 << 30, mode: str = "sv39x4") -> WalkerComparison:
    """Time wp, unmap and get+clear of ``size`` bytes of 4K pages, bulk vs per page."""
    out = WalkerComparison(size)
    gpa, hpa = BASE_GPA, 1 << 40
    perms = leaf_perms(True)

    def fresh_table() -> Stage2PageTable:
        pt = Stage2PageTable(mode)
        pt.topup_for(gpa, size, 0)
        pt.map_range(gpa, size, hpa, perms, 0)
        return pt

    pt = fresh_table()
    out.table_bytes = pt.pool.in_use * PAGE_SIZE
    out.hardware_bytes = _hardware_table_bytes(mode, size)

    pt.free()
    # each operation on a fresh fully mapped table, once in bulk and once page by page
    for op in ("wp", "unmap"):
        for times, walker in ((out.bulk, lambda t: t), (out.per_page, PerPageWalker)):
            pt = fresh_table()
            run = getattr(walker(pt), f"{op}_range")
            start = time.perf_counter()
            run(gpa, size)
            times[op] = time.perf_counter() - start
            pt.free()

    # Dirty harvest: every page dirty and writable, as after a guest wrote them all.
    backing = Backing.anonymous(size)
    vm = Vm(mode)
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vm.set_user_memory_region(SLOT, KVM_MEM_LOG_DIRTY_PAGES, gpa, size, backing)
    cpu = vm.create_vcpu(0)
    npages = size // PAGE_SIZE
    try:
        cpu.touch(gpa, size)
        start = time.perf_counter()
        words = vm.get_dirty_log(SLOT)
        vm.clear_dirty_log(SLOT, 0, npages, words)
        out.bulk["get+clear"] = time.perf_counter() - start
        if int(np.bitwise_count(words).sum()) != npages:
            raise RuntimeError("the harvest did not see every page dirty")
        cpu.touch(gpa, size)  # dirty again
        slot = vm.memslot(SLOT)
        assert slot.dirty_bitmap is not None
        start = time.perf_counter()
        PerPageWalker(vm.pt).get_and_clear_dirty_log(gpa, slot.dirty_bitmap)
        out.per_page["get+clear"] = time.perf_counter() - start
    finally:
        vm.close()
        backing.close()
    return out
