"""kvm_page_table_test, on the model: vCPUs walk a memslot in three timed stages.

* KVM_CREATE_MAPPINGS: each vCPU touches the first 8 bytes of every backing page (even vCPUs
  write, odd ones read): the faults create 4K pages or blocks.
* KVM_UPDATE_MAPPINGS: dirty logging is on. Anonymous: write every page (RO -> RW).
  THP/hugetlb: write the first 4K page of each block (splitting it) and read the second half
  of its pages (new 4K mappings).
* KVM_ADJUST_MAPPINGS: logging is off; read every 4K page: the faults coalesce the split
  blocks back, which is where a missing TLB invalidation shows as a TLB conflict abort.

The guest's accesses use the vCPU's bulk path (:meth:`vmm.vcpu.Vcpu.access_many`), which keeps
the per-access semantics (TLB, walk, fault, retry) with vector operations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..errors import TlbConflictAbort
from ..memory import Backing
from ..memslot import KVM_MEM_LOG_DIRTY_PAGES
from ..pte import PAGE_SHIFT, Stage2Mode, get_mode
from ..vm import Vm

__all__ = [
    "BACKINGS",
    "STAGES",
    "PageTableTestResult",
    "make_backing",
    "run_page_table_test",
    "selftest_gpa",
]

STAGES = ("KVM_CREATE_MAPPINGS", "KVM_UPDATE_MAPPINGS", "KVM_ADJUST_MAPPINGS")
BACKINGS = ("anonymous", "thp", "hugetlb", "hugetlb1g")
TEST_MEM_SLOT_INDEX = 1
_PAGE = 4096


@dataclass
class PageTableTestResult:
    """Stage times (seconds), mapping levels seen after each stage, and table memory."""

    mode: str
    backing: str
    size: int
    vcpus: int
    gpa: int
    times: dict[str, float] = field(default_factory=dict)
    levels: dict[str, dict[int, int]] = field(default_factory=dict)
    table_pages: int = 0
    tlb_conflict: str | None = None

    @property
    def total(self) -> float:
        return sum(self.times.values())


def make_backing(kind: str, size: int, populate: bool = True) -> Backing:
    if kind == "anonymous":
        return Backing.anonymous(size, populate=populate)
    if kind == "thp":
        return Backing.thp(size, populate=populate)
    if kind == "hugetlb":
        return Backing.hugetlb(size, 2 << 20, populate=populate)
    if kind == "hugetlb1g":
        return Backing.hugetlb(size, 1 << 30, populate=populate)
    raise ValueError(f"unknown backing {kind!r}; known: {', '.join(BACKINGS)}")


def _levels(vm: Vm, gpa: int, size: int) -> dict[int, int]:
    _g, _p, lv = vm.pt.leaves(gpa, size)
    levels, counts = np.unique(lv, return_counts=True)
    return {int(a): int(b) for a, b in zip(levels, counts, strict=True)}


def run_page_table_test(
    size: int = 1 << 30,
    vcpus: int = 1,
    backing: str = "anonymous",
    mode: str = "sv39x4",
    *,
    debug_skip_coalesce_tlbi: bool = False,
    record_levels: bool = True,
    populate: bool = True,
) -> PageTableTestResult:
    """Run the three stages; a TLB conflict ends the run and is recorded, not raised."""
    stage2_mode = get_mode(mode)
    host = make_backing(
        backing, _PAGE if size < _PAGE else _align_up(size, _lpage(backing)), populate
    )
    lpage = host.page_size
    size = host.size
    gpa = selftest_gpa(stage2_mode, size, lpage)
    vm = Vm(stage2_mode)
    vm.debug_skip_coalesce_tlbi = debug_skip_coalesce_tlbi
    vm.set_user_memory_region(TEST_MEM_SLOT_INDEX, 0, gpa, size, host)
    cpus = [vm.create_vcpu(i) for i in range(vcpus)]
    result = PageTableTestResult(stage2_mode.name, backing, size, vcpus, gpa)
    every_page = np.arange(gpa, gpa + size, _PAGE, dtype=np.uint64)
    every_lpage = np.arange(gpa, gpa + size, lpage, dtype=np.uint64)
    halves: npt.NDArray[np.uint64] = np.empty(0, dtype=np.uint64)
    if lpage > _PAGE:
        second_half = np.arange(lpage // 2, lpage, _PAGE, dtype=np.uint64)
        halves = (every_lpage[:, None] + second_half[None, :]).ravel().astype(np.uint64)

    def stage(name: str) -> bool:
        start = time.perf_counter()
        try:
            for cpu in cpus:
                if name == "KVM_CREATE_MAPPINGS":
                    cpu.access_many(every_lpage, write=cpu.id % 2 == 0)
                elif name == "KVM_UPDATE_MAPPINGS":
                    if lpage == _PAGE:
                        cpu.access_many(every_page, write=True)
                    else:
                        cpu.access_many(every_lpage, write=True)
                        cpu.access_many(halves, write=False)
                else:
                    cpu.access_many(every_page, write=False)
        except TlbConflictAbort as abort:
            result.tlb_conflict = str(abort)
            result.times[name] = time.perf_counter() - start
            return False
        result.times[name] = time.perf_counter() - start
        if record_levels:
            result.levels[name] = _levels(vm, gpa, size)
        return True

    try:
        if not stage("KVM_CREATE_MAPPINGS"):
            return result
        vm.set_user_memory_region(TEST_MEM_SLOT_INDEX, KVM_MEM_LOG_DIRTY_PAGES, gpa, size)
        if not stage("KVM_UPDATE_MAPPINGS"):
            return result
        vm.set_user_memory_region(TEST_MEM_SLOT_INDEX, 0, gpa, size)
        stage("KVM_ADJUST_MAPPINGS")
        return result
    finally:
        result.table_pages = vm.pt.pool.in_use
        vm.close()
        host.close()


def selftest_gpa(mode: Stage2Mode, size: int, large_page: int) -> int:
    """Where the selftest puts its memslot: ``(max_gfn - pages) * page``, aligned down to
    the large page, so it ends below the GPA space's last frame (KVM RISC-V refuses a slot
    that reaches it)."""
    max_gfn = (mode.gpa_limit >> PAGE_SHIFT) - 1
    alignment = max(large_page, _PAGE)
    gpa = (max_gfn - size // _PAGE) * _PAGE
    return gpa - gpa % alignment


def _lpage(kind: str) -> int:
    return {"anonymous": _PAGE, "thp": 2 << 20, "hugetlb": 2 << 20, "hugetlb1g": 1 << 30}.get(
        kind, _PAGE
    )


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
