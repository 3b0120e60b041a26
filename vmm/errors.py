"""Errors and VM exits of the VMM model.

Bad input from a user of the model (a misaligned memslot, a CLEAR that breaks KVM's rules, a
GPA beyond the stage-2 mode's space) raises a subclass of :class:`VmmError`, which is also a
``ValueError`` so that callers that only know "bad argument" still catch it. Guest-visible
events that KVM reports as a VM exit (an MMIO write to a read-only slot, a full dirty ring)
are :class:`VmExit` exceptions carrying the exit's data. A broken model invariant (an empty
page cache under the MMU lock, a TLB conflict) is a :class:`ModelBug`: never a silent fix.
"""

from __future__ import annotations

__all__ = [
    "DirtyLogError",
    "DirtyRingFull",
    "GuestMemoryFault",
    "MemslotError",
    "MmioError",
    "MmioExit",
    "ModelBug",
    "PageCacheEmpty",
    "PageTableError",
    "TlbConflictAbort",
    "VmExit",
    "VmmError",
]


class VmmError(ValueError):
    """Bad input to the VMM model: the message says what was wrong."""


class MemslotError(VmmError):
    """A memslot request KVM would refuse (overlap, bounds, alignment, bad flags)."""


class PageTableError(VmmError):
    """A page-table request that cannot be honoured (bad level, address beyond the mode)."""


class DirtyLogError(VmmError):
    """A dirty-log request that breaks KVM's documented rules."""


class MmioError(VmmError):
    """An MMIO registration that overlaps memory or another device, or a bad access size."""


class GuestMemoryFault(VmmError):
    """A guest access outside every memslot and MMIO region (KVM returns -EFAULT)."""

    def __init__(self, gpa: int, message: str | None = None) -> None:
        self.gpa = gpa
        super().__init__(message or f"guest access at GPA {gpa:#x} hits no memslot or MMIO region")


class ModelBug(RuntimeError):
    """An invariant of the model was broken: a bug in the caller or in the model."""


class PageCacheEmpty(ModelBug):
    """A map under the MMU lock needed a table page the cache did not hold (no top-up)."""


class TlbConflictAbort(ModelBug):
    """A TLB fill overlapped a cached entry of another size: break-before-make was skipped."""

    def __init__(self, vmid: int, gpa: int, level: int, other_level: int) -> None:
        self.vmid = vmid
        self.gpa = gpa
        self.level = level
        self.other_level = other_level
        super().__init__(
            f"TLB conflict abort: VMID {vmid}, GPA {gpa:#x}: filling a level-{level} entry "
            f"while a level-{other_level} entry covering it is still cached"
        )


class VmExit(Exception):
    """A guest event that leaves the vCPU run loop, as KVM_RUN returns with an exit reason."""


class MmioExit(VmExit):
    """KVM_EXIT_MMIO: an access userspace must emulate (e.g. a write to a READONLY slot)."""

    def __init__(self, gpa: int, data: bytes, is_write: bool) -> None:
        self.gpa = gpa
        self.data = data
        self.is_write = is_write
        kind = "write" if is_write else "read"
        super().__init__(f"MMIO exit: {kind} of {len(data)} bytes at GPA {gpa:#x}")


class DirtyRingFull(VmExit):
    """KVM_EXIT_DIRTY_RING_FULL: harvest and reset the rings, then run the vCPU again.

    ``completed`` is how many accesses of a bulk access finished before the exit (0 for a
    single access), so the caller can resume where the guest stopped.
    """

    def __init__(self, vcpu_id: int, completed: int = 0) -> None:
        self.vcpu_id = vcpu_id
        self.completed = completed
        super().__init__(f"dirty ring of vCPU {vcpu_id} is full: harvest and reset it")
