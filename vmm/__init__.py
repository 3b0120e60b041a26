"""The VMM model: memslots, stage-2 page tables, faults, TLB, dirty logging, nested rmap.

Pure and synchronous; KVM-shaped so that a KVM user feels at home::

    vm = Vm(mode="sv39x4")
    vm.set_user_memory_region(0, 0, 0x8000_0000, 64 << 20, Backing.anonymous(64 << 20))
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x8000_0000, b"hello")
"""

from __future__ import annotations

from .dirty import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, DirtyRing
from .errors import (
    DirtyLogError,
    DirtyRingFull,
    GuestMemoryFault,
    MemslotError,
    MmioError,
    MmioExit,
    ModelBug,
    PageCacheEmpty,
    PageTableError,
    TlbConflictAbort,
    VmExit,
    VmmError,
)
from .memory import HOST_PHYS, Backing, HostPhysSpace
from .memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Memslot
from .mmio import MmioHandler
from .nested import NestedGuest
from .pte import MODES, Stage2Mode, get_mode
from .stage2 import Leaf, Stage2PageTable
from .tablepool import PageCache, TablePagePool
from .tlb import Tlb, TlbEntry
from .vcpu import Vcpu
from .vm import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    Vm,
)

__all__ = [
    "HOST_PHYS",
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_RESET",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "MODES",
    "Backing",
    "DirtyLogError",
    "DirtyRing",
    "DirtyRingFull",
    "GuestMemoryFault",
    "HostPhysSpace",
    "Leaf",
    "Memslot",
    "MemslotError",
    "MmioError",
    "MmioExit",
    "MmioHandler",
    "ModelBug",
    "NestedGuest",
    "PageCache",
    "PageCacheEmpty",
    "PageTableError",
    "Stage2Mode",
    "Stage2PageTable",
    "TablePagePool",
    "Tlb",
    "TlbConflictAbort",
    "TlbEntry",
    "Vcpu",
    "Vm",
    "VmExit",
    "VmmError",
    "get_mode",
]
