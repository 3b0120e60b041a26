"""Where page-table pages come from: a host-physical page pool and KVM's page cache.

:class:`TablePagePool` is the ``mm_ops`` allocator of the page tables. Its pages are rows of
one numpy array (4 KiB each: 512 ``uint64`` PTEs, or 1024 ``uint32`` for Sv32x4) and sit in a
host-physical window reserved from :data:`vmm.memory.HOST_PHYS`, so a table PTE holds a real
PPN: :meth:`TablePagePool.follow` turns it into the row of the table it points to, and
:meth:`TablePagePool.table_pte` makes one. Row ``r``'s entry ``i`` is word ``r * entries + i``
of :attr:`TablePagePool.flat` (a numpy view, for vector work) and of
:attr:`TablePagePool.words` (a ``memoryview`` of the same memory: a scalar read or write
there is a fraction of a numpy element access, which the per-access paths use: the hart's
walk, a one-page fault). The array grows in chunks; rows never move in HPA.

:class:`PageCache` is ``kvm_mmu_memory_cache``: it is topped up *before* the MMU lock is
taken (the seed's ``stage2_cache_topup``), and a map under the lock only takes pages from it.
Taking from an empty cache is a :class:`~vmm.errors.PageCacheEmpty` bug report, never a
silent allocation.
"""

from __future__ import annotations

import weakref
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .errors import ModelBug, PageCacheEmpty, VmmError
from .memory import HOST_PHYS, HostPhysSpace
from .pte import PAGE_SHIFT, PAGE_SIZE, PTE_PPN_SHIFT, PTE_V, Stage2Mode

__all__ = ["PageCache", "TablePagePool"]

DEFAULT_RESERVE_PAGES: Final = 1 << 16  # 256 MiB of HPA: tables for 128 GiB of 4K leaves
SV32_RESERVE_PAGES: Final = 1 << 12  # 16 MiB: every table the 16 GiB Sv32x4 space can need
#: 64-bit modes put their table windows above this, keeping low HPAs for Sv32x4's 34 bits.
HIGH_TABLE_HPA: Final = 1 << 36
_GROW_CHUNK: Final = 128

IndexArray = npt.NDArray[np.int64]


class TablePagePool:
    """Host-physical table pages backed by one numpy array (row = page)."""

    def __init__(
        self,
        mode: Stage2Mode,
        reserve_pages: int | None = None,
        space: HostPhysSpace = HOST_PHYS,
    ) -> None:
        self.mode = mode
        narrow = mode.hpa_limit <= HIGH_TABLE_HPA
        if reserve_pages is None:
            reserve_pages = SV32_RESERVE_PAGES if narrow else DEFAULT_RESERVE_PAGES
        self.reserve_pages = reserve_pages
        self._space = space
        window = reserve_pages * PAGE_SIZE
        self.base_hpa = space.allocate(window, 4 * PAGE_SIZE, 0 if narrow else HIGH_TABLE_HPA)
        self._finalizer = weakref.finalize(self, space.release_later, self.base_hpa, window)
        if self.base_hpa + window > mode.hpa_limit:
            self._finalizer()
            raise VmmError(f"no host-physical window for {mode.name} tables below its PPN limit")
        self.base_ppn = self.base_hpa >> PAGE_SHIFT
        self.entries = mode.entries_per_table
        self.pages: npt.NDArray[np.unsignedinteger] = np.zeros(
            (_GROW_CHUNK, mode.entries_per_table), dtype=mode.dtype
        )
        self.flat: npt.NDArray[np.unsignedinteger] = self.pages.reshape(-1)
        self.words: memoryview = _words(self.pages)
        self._high = 0  # rows [0, _high) have been handed out at least once
        self._free: list[int] = []
        self.in_use = 0

    # ------------------------------------------------------------------ allocation
    def _grow(self, rows: int) -> None:
        if rows > self.reserve_pages:
            raise VmmError(
                f"table page pool exhausted: {rows} pages needed, {self.reserve_pages} reserved"
            )
        cap = self.pages.shape[0]
        if rows <= cap:
            return
        new_cap = min(self.reserve_pages, max(rows, cap + max(_GROW_CHUNK, cap // 8)))
        grown = np.zeros((new_cap, self.mode.entries_per_table), dtype=self.mode.dtype)
        grown[:cap] = self.pages
        self.pages = grown
        self.flat = grown.reshape(-1)
        self.words = _words(grown)

    def alloc(self, n: int) -> IndexArray:
        """``n`` zeroed pages (row indices); fresh rows come out consecutive."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        take = min(n, len(self._free))
        reused = self._free[len(self._free) - take :]
        del self._free[len(self._free) - take :]
        fresh = n - take
        self._grow(self._high + fresh)
        rows = np.empty(n, dtype=np.int64)
        rows[:take] = reused
        rows[take:] = np.arange(self._high, self._high + fresh, dtype=np.int64)
        self._high += fresh
        if take:
            self.pages[rows[:take]] = 0
        self.in_use += n
        return rows

    def alloc_root(self) -> int:
        """Four consecutive zeroed pages, 16 KiB-aligned in HPA: the x4 root table."""
        start = (self._high + 3) & ~3
        for row in range(self._high, start):
            self._free.append(row)
        self._grow(start + 4)
        self._high = start + 4
        self.pages[start : start + 4] = 0
        self.in_use += 4
        return start

    def free(self, rows: IndexArray | list[int]) -> None:
        """Give pages back (they are zeroed when handed out again)."""
        values = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
        self._free.extend(values)
        self.in_use -= len(values)

    def free_root(self, start: int) -> None:
        self.free(list(range(start, start + 4)))

    # ------------------------------------------------------------------ addressing
    def hpa_of(self, row: int) -> int:
        return (self.base_ppn + row) << PAGE_SHIFT

    def follow(self, pte: int) -> int:
        """The row of the table a (valid, non-leaf) table PTE points to."""
        return (pte >> PTE_PPN_SHIFT) - self.base_ppn

    def follow_many(self, ptes: npt.NDArray[Any]) -> IndexArray:
        """:meth:`follow` for an array of table PTEs."""
        return (ptes >> PTE_PPN_SHIFT).astype(np.int64) - self.base_ppn

    def table(self, row: int) -> npt.NDArray[np.unsignedinteger]:
        """Table page ``row`` as a numpy view of its entries."""
        view: npt.NDArray[np.unsignedinteger] = self.pages[row]
        return view

    def table_pte(self, row: int) -> int:
        """The PTE that points to table page ``row`` (V set, R=W=X=0)."""
        return ((self.base_ppn + row) << PTE_PPN_SHIFT) | PTE_V

    def table_ptes(self, rows: IndexArray) -> npt.NDArray[Any]:
        """:meth:`table_pte` for many rows, in the table's word type."""
        return (((rows + self.base_ppn) << PTE_PPN_SHIFT) | PTE_V).astype(self.mode.dtype)

    def close(self) -> None:
        """Give the HPA window back (also done when the pool is garbage-collected)."""
        self._finalizer()


def _words(pages: npt.NDArray[np.unsignedinteger]) -> memoryview:
    """``pages`` as one flat memoryview of its words (Q for 64-bit PTEs, I for Sv32x4)."""
    return pages.data.cast("B").cast("Q" if pages.dtype.itemsize == 8 else "I")


class PageCache:
    """KVM's ``kvm_mmu_memory_cache``: pages set aside before the MMU lock is taken."""

    def __init__(self, pool: TablePagePool, minimum: int) -> None:
        self.pool = pool
        self.minimum = minimum
        self._rows: list[int] = []
        self.locked = False

    def __len__(self) -> int:
        return len(self._rows)

    def topup(self, count: int | None = None) -> None:
        """Make the cache hold at least ``count`` pages (default: its minimum)."""
        if self.locked:
            raise ModelBug("page cache top-up under the MMU lock: top up before taking it")
        want = max(self.minimum, count or 0)
        if len(self._rows) < want:
            self._rows.extend(self.pool.alloc(want - len(self._rows)).tolist())

    def take(self, n: int) -> IndexArray:
        """``n`` pages for a map under the lock; an empty cache is a bug, reported."""
        if n > len(self._rows):
            raise PageCacheEmpty(
                f"page cache holds {len(self._rows)} pages but the map needs {n}: "
                "the caller did not top it up before taking the MMU lock"
            )
        rows = self._rows[len(self._rows) - n :]
        del self._rows[len(self._rows) - n :]
        return np.array(rows, dtype=np.int64)

    def take_one(self) -> int:
        """One page for a map under the lock (:meth:`take` for a scalar fault)."""
        if not self._rows:
            raise PageCacheEmpty(
                "page cache is empty but the map needs a page: the caller did not top it "
                "up before taking the MMU lock"
            )
        return self._rows.pop()

    def give_back(self, rows: IndexArray | list[int]) -> None:
        """Pages freed under the lock go back to the cache, zeroed (KVM frees them after it)."""
        values = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
        if values:
            self.pool.pages[values] = 0
        self._rows.extend(values)

    def trim(self) -> None:
        """Return pages beyond the minimum to the pool (outside the lock)."""
        extra = len(self._rows) - self.minimum
        if extra > 0:
            self.pool.free(self._rows[self.minimum :])
            del self._rows[self.minimum :]

    def drain(self) -> None:
        self.pool.free(self._rows)
        self._rows.clear()
