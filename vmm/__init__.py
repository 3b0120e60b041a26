"""The VMM model: memslots, stage-2 page tables, faults, TLB, dirty logging, nested rmap.

Pure and synchronous; KVM-shaped so that a KVM user feels at home::

    vm = Vm(mode="sv39x4")
    vm.set_user_memory_region(0, 0, 0x8000_0000, 64 << 20, Backing.anonymous(64 << 20))
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x8000_0000, b"hello")

The names below are imported lazily (PEP 562): ``import vmm.sizes`` or ``import vmm.errors``
loads neither numpy nor the model, so light programs (the daemon's size parsing) can use
the package's small modules at no cost.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dirty import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, DirtyRing
    from .dirtylog import DirtyLog
    from .dirtytrack import DirtyTracker
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

#: Public name -> the module (relative to this package) that owns it.
_OWNERS: dict[str, str] = {
    "KVM_DIRTY_GFN_F_DIRTY": "dirty",
    "KVM_DIRTY_GFN_F_RESET": "dirty",
    "DirtyRing": "dirty",
    "DirtyLog": "dirtylog",
    "DirtyTracker": "dirtytrack",
    "DirtyLogError": "errors",
    "DirtyRingFull": "errors",
    "GuestMemoryFault": "errors",
    "MemslotError": "errors",
    "MmioError": "errors",
    "MmioExit": "errors",
    "ModelBug": "errors",
    "PageCacheEmpty": "errors",
    "PageTableError": "errors",
    "TlbConflictAbort": "errors",
    "VmExit": "errors",
    "VmmError": "errors",
    "HOST_PHYS": "memory",
    "Backing": "memory",
    "HostPhysSpace": "memory",
    "KVM_MEM_LOG_DIRTY_PAGES": "memslot",
    "KVM_MEM_READONLY": "memslot",
    "Memslot": "memslot",
    "MmioHandler": "mmio",
    "NestedGuest": "nested",
    "MODES": "pte",
    "Stage2Mode": "pte",
    "get_mode": "pte",
    "Leaf": "stage2",
    "Stage2PageTable": "stage2",
    "PageCache": "tablepool",
    "TablePagePool": "tablepool",
    "Tlb": "tlb",
    "TlbEntry": "tlb",
    "Vcpu": "vcpu",
    "KVM_CAP_DIRTY_LOG_RING": "vm",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": "vm",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": "vm",
    "KVM_DIRTY_LOG_INITIALLY_SET": "dirtylog",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": "dirtylog",
    "Vm": "vm",
}

__all__ = [
    "HOST_PHYS",
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_RESET",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "MODES",
    "Backing",
    "DirtyLog",
    "DirtyLogError",
    "DirtyRing",
    "DirtyRingFull",
    "DirtyTracker",
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


def __getattr__(name: str) -> Any:
    """Import the owning module on first use of a public name (PEP 562)."""
    owner = _OWNERS.get(name)
    if owner is None:
        raise AttributeError(f"module 'vmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{owner}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OWNERS))
