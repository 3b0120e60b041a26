"""Host memory: backings with a page size and a host-physical address range.

A :class:`Backing` is real memory (an ``mmap``) seen as a writable ``memoryview`` and numpy
arrays, plus the two facts the stage-2 fault handler needs: its page size (4 KiB anonymous,
2 MiB THP/hugetlb, 1 GiB hugetlb) and the host-physical range it occupies. Host-physical
addresses are handed out by one process-wide :class:`HostPhysSpace`, aligned to the backing's
page size, so the PPNs in the page tables name real, distinct host pages and a huge page is
naturally aligned in HPA as it is on a real host. Ranges are returned when the backing is
closed or garbage-collected.

When the kernel has no huge pages to give (``MAP_HUGETLB`` fails), the hugetlb backings fall
back to ordinary anonymous memory: the page size the model uses stays the requested one,
which is what the fault handler's mapping decisions depend on.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
import weakref
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .errors import VmmError

__all__ = [
    "HOST_PHYS",
    "Backing",
    "HostPhysSpace",
]

SIZE_4K: Final = 4096
SIZE_2M: Final = 2 << 20
SIZE_1G: Final = 1 << 30
_MAP_HUGETLB: Final = getattr(mmap, "MAP_HUGETLB", 0x40000)
_MAP_HUGE_SHIFT: Final = 26
_HPA_BASE: Final = 0x8000_0000  # where RISC-V boards put DRAM
_HPA_LIMIT: Final = 1 << 56


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class HostPhysSpace:
    """First-fit allocator of host-physical ranges (addresses only; no memory behind them).

    It also remembers which :class:`Backing` owns each range, so an HPA read from a PTE can
    be turned back into host memory (what a TLB fill does).
    """

    def __init__(self, base: int = _HPA_BASE, limit: int = _HPA_LIMIT) -> None:
        self._lock = threading.Lock()
        # Ranges of collected owners: a finalizer may run inside a locked section (the
        # garbage collector runs at any allocation), so it only queues; the queue is drained
        # under the lock by the next call.
        self._pending: list[tuple[int, int]] = []
        self._free: list[tuple[int, int]] = [(base, limit)]  # sorted (start, end)
        self._starts: list[int] = []
        self._owners: list[tuple[int, int, weakref.ref[Backing]]] = []

    def allocate(self, size: int, align: int, minimum: int = 0) -> int:
        """Reserve ``size`` bytes at an ``align``-aligned HPA at or above ``minimum``,
        lowest address first."""
        with self._lock:
            self._drain()
            for i, (start, end) in enumerate(self._free):
                hpa = (max(start, minimum) + align - 1) & ~(align - 1)
                if hpa + size <= end:
                    pieces = []
                    if start < hpa:
                        pieces.append((start, hpa))
                    if hpa + size < end:
                        pieces.append((hpa + size, end))
                    self._free[i : i + 1] = pieces
                    return hpa
        raise VmmError(f"host-physical space exhausted: no {size:#x}-byte range free")

    def release_later(self, hpa: int, size: int) -> None:
        """Queue ``[hpa, hpa + size)`` for release (safe from finalizers)."""
        self._pending.append((hpa, size))

    def release(self, hpa: int, size: int) -> None:
        """Give ``[hpa, hpa + size)`` back, merging it with free neighbours."""
        self._pending.append((hpa, size))
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        while self._pending:
            hpa, size = self._pending.pop()
            self._release_locked(hpa, size)

    def _release_locked(self, hpa: int, size: int) -> None:
        free = self._free
        i = bisect.bisect_left(free, (hpa, 0))
        start, end = hpa, hpa + size
        if i < len(free) and free[i][0] == end:
            end = free[i][1]
            del free[i]
        if i > 0 and free[i - 1][1] == start:
            start = free[i - 1][0]
            del free[i - 1]
            i -= 1
        free.insert(i, (start, end))
        j = bisect.bisect_left(self._starts, hpa)
        if j < len(self._starts) and self._starts[j] == hpa:
            del self._starts[j]
            del self._owners[j]

    def register(self, backing: Backing) -> None:
        with self._lock:
            self._drain()
            j = bisect.bisect_left(self._starts, backing.hpa)
            self._starts.insert(j, backing.hpa)
            self._owners.insert(j, (backing.hpa, backing.hpa + backing.size, weakref.ref(backing)))

    def owner(self, hpa: int) -> Backing | None:
        """The live backing whose range holds ``hpa``, if any."""
        j = bisect.bisect_right(self._starts, hpa) - 1
        if j < 0:
            return None
        start, end, ref = self._owners[j]
        if not start <= hpa < end:
            return None
        backing = ref()
        return backing if backing is not None and backing.live else None


HOST_PHYS: Final = HostPhysSpace()


class Backing:
    """Host memory with a page size and a host-physical address range."""

    def __init__(
        self,
        buffer: Any,
        size: int,
        page_size: int,
        kind: str,
        *,
        owner: Any = None,
        space: HostPhysSpace = HOST_PHYS,
    ) -> None:
        if not _is_pow2(page_size) or page_size < SIZE_4K:
            raise VmmError(f"page size must be a power of two >= 4 KiB, got {page_size!r}")
        if size <= 0 or size % page_size:
            raise VmmError(
                f"backing size {size:#x} must be a positive multiple of its page size "
                f"{page_size:#x}"
            )
        mem = memoryview(buffer).cast("B")
        if mem.readonly:
            raise VmmError("backing memory must be writable")
        if len(mem) < size:
            raise VmmError(f"buffer holds {len(mem):#x} bytes, less than the size {size:#x}")
        self.size = size
        self.page_size = page_size
        self.kind = kind
        self.mem: memoryview = mem[:size]
        self.array: npt.NDArray[np.uint8] = np.frombuffer(self.mem, dtype=np.uint8)
        self.u64: npt.NDArray[np.uint64] = self.array.view(np.uint64)
        self._owner = owner  # keeps the mmap alive as long as the backing
        self.hpa = space.allocate(size, max(page_size, SIZE_4K))
        self.hpa_end = self.hpa + size
        #: False once closed: its HPA range may then belong to another backing
        self.live = True
        space.register(self)
        self._finalizer = weakref.finalize(self, space.release_later, self.hpa, size)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def anonymous(cls, size: int, page_size: int = SIZE_4K, *, populate: bool = False) -> Backing:
        """Private anonymous memory (``-s anonymous``); ``populate`` pre-faults it."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mm = _mmap_checked(size, flags)
        return cls(mm, size, page_size, "anonymous", owner=mm)

    @classmethod
    def thp(cls, size: int, *, populate: bool = False) -> Backing:
        """Anonymous memory advised for transparent huge pages: 2 MiB pages."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mm = _mmap_checked(size, flags)
        madv = getattr(mmap, "MADV_HUGEPAGE", None)
        if madv is not None:
            try:
                mm.madvise(madv)
            except OSError:
                pass  # THP disabled on this host: the model's page size still holds
        return cls(mm, size, SIZE_2M, "thp", owner=mm)

    @classmethod
    def hugetlb(cls, size: int, page_size: int = SIZE_2M, *, populate: bool = False) -> Backing:
        """hugetlbfs-style memory with 2 MiB or 1 GiB pages (anonymous if none are free)."""
        if page_size not in (SIZE_2M, SIZE_1G):
            raise VmmError(f"hugetlb page size must be 2 MiB or 1 GiB, got {page_size:#x}")
        if size <= 0 or size % page_size:
            raise VmmError(f"hugetlb size {size:#x} must be a multiple of {page_size:#x}")
        base = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            base |= getattr(mmap, "MAP_POPULATE", 0)
        huge_flags = base | _MAP_HUGETLB | ((page_size.bit_length() - 1) << _MAP_HUGE_SHIFT)
        try:
            mm = mmap.mmap(-1, size, flags=huge_flags)
        except OSError:
            mm = _mmap_checked(size, base)
        return cls(mm, size, page_size, "hugetlb", owner=mm)

    @classmethod
    def from_buffer(cls, buf: Any, page_size: int = SIZE_4K) -> Backing:
        """An existing writable buffer (e.g. the ivshmem shm mmap), used in place."""
        try:
            size = memoryview(buf).nbytes
        except TypeError as exc:
            raise VmmError(f"backing buffer must support the buffer protocol: {exc}") from None
        return cls(buf, size, page_size, "buffer", owner=buf)

    @classmethod
    def from_fd(cls, fd: int, size: int, page_size: int = SIZE_4K, offset: int = 0) -> Backing:
        """``size`` bytes of the file ``fd`` at ``offset``, mapped shared."""
        if size <= 0:
            raise VmmError(f"backing size must be positive, got {size}")
        try:
            file_size = os.fstat(fd).st_size
        except OSError as exc:
            raise VmmError(f"cannot use fd {fd} as backing: {exc.strerror}") from None
        if offset + size > file_size:
            raise VmmError(
                f"fd {fd} holds {file_size:#x} bytes, less than offset {offset:#x} + size {size:#x}"
            )
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
        except OSError as exc:
            raise VmmError(f"cannot mmap fd {fd}: {exc.strerror}") from None
        return cls(mm, size, page_size, "fd", owner=mm)

    # ------------------------------------------------------------------ access

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``offset`` (no copy)."""
        if offset < 0 or offset + length > self.size:
            raise VmmError(f"range [{offset:#x}, {offset + length:#x}) is outside the backing")
        return self.mem[offset : offset + length]

    def close(self) -> None:
        """Release the views and the HPA range (the mmap closes when nothing else uses it)."""
        self.live = False
        self._finalizer()

    def __repr__(self) -> str:
        return (
            f"Backing({self.kind}, size={self.size:#x}, page_size={self.page_size:#x}, "
            f"hpa={self.hpa:#x})"
        )


def _mmap_checked(size: int, flags: int) -> mmap.mmap:
    if size <= 0:
        raise VmmError(f"backing size must be positive, got {size}")
    try:
        return mmap.mmap(-1, size, flags=flags)
    except OSError as exc:
        raise VmmError(f"cannot allocate {size:#x} bytes of host memory: {exc.strerror}") from None
