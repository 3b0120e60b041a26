"""The stage-2 (G-stage) page table: real PTE words in real table pages, and its operations.

Every operation is a walk of :class:`~vmm.walker.Walker` with a small visitor, as in arm64's
``pgtable.c``: map (which also installs tables, splits blocks and coalesces tables into
blocks), unmap, write-protect (whole or masked by a dirty bitmap), get-leaf, eager split,
coalesce, ioremap and free. Range operations return whether a TLB flush is needed and the
caller flushes once per range. Break-before-make is explicit: an entry whose output address
or size changes is first invalidated, the TLBs are flushed for it, then the new entry is
written (:meth:`Stage2PageTable.debug_skip_coalesce_tlbi` skips that flush before a coalesce,
to reproduce the TLB conflict arm64's kvm_page_table_test found).

Maps run under :meth:`Stage2PageTable.mmu_lock` and take table pages only from the page
cache, which the caller tops up beforehand (:meth:`Stage2PageTable.topup_for`).

The vCPU's hardware walker, :meth:`Stage2PageTable.translate` and the vectorised
:meth:`Stage2PageTable.translate_bulk`, reads the same words without the visitor machinery.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .errors import ModelBug, PageTableError
from .pte import (
    PAGE_SHIFT,
    PTE_D,
    PTE_PPN_SHIFT,
    PTE_RWX,
    PTE_V,
    PTE_W,
    Stage2Mode,
    get_mode,
)
from .tablepool import PageCache, TablePagePool
from .walker import PteArray, Visitor, Walker

__all__ = ["Leaf", "Stage2PageTable", "TlbFlusher"]

_TABLE_MASK: Final = PTE_V | PTE_RWX
_PERM_MASK: Final = (1 << PTE_PPN_SHIFT) - 1


class TlbFlusher(Protocol):
    """Who invalidates cached translations (the VM broadcasts to its vCPUs' TLBs)."""

    def flush_range(self, vmid: int, gpa: int, size: int) -> None: ...

    def flush_addr(self, vmid: int, gpa: int, level: int) -> None: ...

    def flush_vmid(self, vmid: int) -> None: ...


class _NoFlush:
    def flush_range(self, vmid: int, gpa: int, size: int) -> None:
        pass

    def flush_addr(self, vmid: int, gpa: int, level: int) -> None:
        pass

    def flush_vmid(self, vmid: int) -> None:
        pass


@dataclass(frozen=True)
class Leaf:
    """A leaf PTE found by a walk: its word, its level and the GPA range it maps."""

    pte: int
    level: int
    gpa: int
    size: int

    @property
    def hpa(self) -> int:
        return (self.pte >> PTE_PPN_SHIFT) << PAGE_SHIFT

    @property
    def writable(self) -> bool:
        return bool(self.pte & PTE_W)


def _is_table(pte: int) -> bool:
    return pte & _TABLE_MASK == PTE_V


class Stage2PageTable:
    """One stage-2 address space (a VMID) in one of the RISC-V G-stage modes."""

    def __init__(
        self,
        mode: str | Stage2Mode = "sv39x4",
        vmid: int = 1,
        *,
        pool: TablePagePool | None = None,
        flusher: TlbFlusher | None = None,
    ) -> None:
        self.mode = get_mode(mode)
        self.vmid = vmid
        self.pool = pool if pool is not None else TablePagePool(self.mode)
        self._own_pool = pool is None
        self.flusher: TlbFlusher = flusher if flusher is not None else _NoFlush()
        self.cache = PageCache(self.pool, minimum=self.mode.levels)
        self.root = self.pool.alloc_root()
        self.walker = Walker(self)
        self.debug_skip_coalesce_tlbi = False
        self._freed = False
        self._dtype = self.mode.dtype
        self._ppn_limit = 1 << self.mode.ppn_bits

    # ------------------------------------------------------------------ basics
    @property
    def root_hpa(self) -> int:
        return self.pool.hpa_of(self.root)

    @property
    def hgatp(self) -> int:
        """The hgatp CSR value that would point a hart at this table (MODE, VMID, PPN)."""
        if self.mode.pte_bytes == 4:
            return (self.mode.hgatp_mode << 31) | ((self.vmid & 0x7F) << 22) | (self.root_hpa >> 12)
        return (self.mode.hgatp_mode << 60) | ((self.vmid & 0x3FFF) << 44) | (self.root_hpa >> 12)

    def root_view(self) -> PteArray:
        return self.pool.pages[self.root : self.root + 4].reshape(-1)

    def check_range(self, gpa: int, size: int) -> None:
        limit = self.mode.gpa_limit
        if gpa < 0 or size < 0 or gpa + size > limit:
            raise PageTableError(
                f"GPA range [{gpa:#x}, {gpa + size:#x}) is beyond {self.mode.name}'s "
                f"{self.mode.gpa_bits}-bit guest-physical space"
            )

    def _check_aligned(self, gpa: int, size: int, hpa: int, level: int) -> None:
        self.mode.check_level(level)
        block = self.mode.level_size(level)
        if gpa % block or size % block or hpa % block or size <= 0:
            raise PageTableError(
                f"map of GPA {gpa:#x} size {size:#x} to HPA {hpa:#x} is not aligned to the "
                f"level-{level} size {block:#x}"
            )
        self.check_range(gpa, size)
        if (hpa + size) >> PAGE_SHIFT > self._ppn_limit:
            raise PageTableError(f"HPA {hpa + size - 1:#x} does not fit {self.mode.name}'s PPN")

    @contextmanager
    def mmu_lock(self) -> Iterator[None]:
        """The MMU lock: no cache top-up inside; freed pages return to the pool after it."""
        if self.cache.locked:
            raise ModelBug("MMU lock taken twice")
        self.cache.locked = True
        try:
            yield
        finally:
            self.cache.locked = False
            self.cache.trim()

    def tables_needed(self, gpa: int, size: int, level: int) -> int:
        """Upper bound of the table pages a map of ``[gpa, gpa+size)`` at ``level`` needs."""
        total = 0
        for lvl in range(level, self.mode.root_level):
            span = self.mode.level_size(lvl + 1)
            total += (gpa + size - 1) // span - gpa // span + 1
        return total

    def topup_for(self, gpa: int, size: int, level: int) -> None:
        """Top the cache up for one map (outside the MMU lock)."""
        self.cache.topup(self.tables_needed(gpa, size, level))

    # ------------------------------------------------------------------ hardware walk
    def translate(self, gpa: int) -> tuple[int, int]:
        """The hart's page walk: ``(pte, level)`` of the entry that ends the walk.

        ``pte`` is 0 when the walk met an invalid entry at ``level``.
        """
        mode = self.mode
        level = mode.root_level
        pages = self.pool.pages
        base_ppn = self.pool.base_ppn
        idx = (gpa >> mode.shift(level)) & (mode.root_entries - 1)
        pte = int(pages[self.root + (idx >> mode.index_bits), idx & (mode.entries_per_table - 1)])
        mask = mode.entries_per_table - 1
        while pte & _TABLE_MASK == PTE_V:
            if level == 0:
                raise ModelBug(f"table PTE {pte:#x} at level 0 (GPA {gpa:#x})")
            level -= 1
            pte = int(pages[(pte >> PTE_PPN_SHIFT) - base_ppn, (gpa >> mode.shift(level)) & mask])
        return (pte if pte & PTE_V else 0), level

    def translate_bulk(
        self, gpas: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int8]]:
        """Vectorised :meth:`translate`: PTE words (0 = invalid) and levels per GPA."""
        mode = self.mode
        n = gpas.shape[0]
        out_pte = np.zeros(n, dtype=np.int64)
        out_lvl = np.zeros(n, dtype=np.int8)
        if n == 0:
            return out_pte.view(np.uint64), out_lvl
        per = mode.entries_per_table
        pages = self.pool.pages
        flat = pages.reshape(-1)
        # Sv32x4 words are widened (a copy); 64-bit words are reinterpreted in place.
        flat = flat.view(np.int64) if flat.dtype == np.uint64 else flat.astype(np.int64)
        g = gpas.view(np.int64) if gpas.dtype == np.uint64 else gpas.astype(np.int64)
        level = mode.root_level
        pte = flat[self.root * per + ((g >> mode.shift(level)) & (mode.root_entries - 1))]
        active: npt.NDArray[np.int64] | None = None  # None: every address is still walking
        base_ppn = self.pool.base_ppn
        while True:
            is_tbl = (pte & _TABLE_MASK) == PTE_V
            all_tbl = bool(is_tbl.all())
            if not all_tbl:
                done = ~is_tbl
                p = pte[done]
                p = np.where(p & PTE_V, p, 0)
                if active is None:
                    out_pte[done] = p
                    out_lvl[done] = level
                else:
                    sel = active[done]
                    out_pte[sel] = p
                    out_lvl[sel] = level
                if not is_tbl.any():
                    break
                if level == 0:
                    raise ModelBug("table PTE at level 0")
                keep = np.flatnonzero(is_tbl)
                active = keep if active is None else active[keep]
                pte = pte[keep]
                g = g[keep]
            elif level == 0:
                raise ModelBug("table PTE at level 0")
            level -= 1
            rows = (pte >> PTE_PPN_SHIFT) - base_ppn
            pte = flat[rows * per + ((g >> mode.shift(level)) & (per - 1))]
        return out_pte.view(np.uint64), out_lvl

    # ------------------------------------------------------------------ KVM operations
    def map_range(
        self,
        gpa: int,
        size: int,
        hpa: int,
        perms: int,
        level: int = 0,
        *,
        split: str = "preserve",
    ) -> bool:
        """Map ``[gpa, gpa+size)`` to ``hpa`` with leaves at ``level``; returns flush-needed.

        Blocks in the way are split (``split="preserve"`` keeps their other pages mapped,
        ``"drop"`` leaves them unmapped, as a lazy split on a dirty-logging fault does);
        tables in the way of a block are coalesced (break-before-make). Needs a topped-up
        cache; call under :meth:`mmu_lock` (taken here if the caller did not).
        """
        self._check_aligned(gpa, size, hpa, level)
        if split not in ("preserve", "drop"):
            raise PageTableError(f"split must be 'preserve' or 'drop', got {split!r}")
        visitor = _MapVisitor(self, gpa, gpa + size, hpa, perms & _PERM_MASK | PTE_V, level, split)
        self._locked_walk(gpa, gpa + size, visitor)
        return visitor.flush

    def map_pages(
        self,
        gpas: npt.NDArray[np.uint64],
        delta: int,
        perms: int,
        level: int = 0,
        *,
        split: str = "preserve",
    ) -> bool:
        """Map many scattered level-``level`` blocks in one walk: block ``g`` (aligned GPAs,
        ascending, unique) goes to HPA ``g + delta``. Same semantics as :meth:`map_range`
        per block; tables are installed only where a block lands."""
        if gpas.shape[0] == 0:
            return False
        size = self.mode.level_size(level)
        first, last = int(gpas[0]), int(gpas[-1])
        self._check_aligned(first, size, first + delta, level)
        self._check_aligned(last, size, last + delta, level)
        if (gpas & np.uint64(size - 1)).any():
            raise PageTableError(f"map_pages: GPAs must be aligned to {size:#x}")
        visitor = _SparseMapVisitor(
            self, gpas.astype(np.int64), delta, perms & _PERM_MASK | PTE_V, level, split
        )
        self._locked_walk(first, last + size, visitor)
        return visitor.flush

    def unmap_range(self, gpa: int, size: int) -> bool:
        """Clear every leaf that intersects the range (a block partly inside goes whole:
        stage-2 refaults) and free tables the range covers entirely."""
        visitor = _UnmapVisitor(self, gpa, gpa + size)
        self._locked_walk(gpa, gpa + size, visitor)
        return visitor.flush

    def wp_range(self, gpa: int, size: int) -> bool:
        """Clear W on every leaf that intersects the range (the seed's stage2_wp_range)."""
        visitor = _WpVisitor(self, None)
        self._locked_walk(gpa, gpa + size, visitor)
        return visitor.flush

    def wp_masked(self, gpa: int, pages: npt.NDArray[np.bool_]) -> bool:
        """Write-protect the 4K pages ``gpa + k*4K`` for which ``pages[k]`` is True (dirty-log
        re-protection). A block holding any of them is write-protected whole."""
        visitor = _WpVisitor(self, (gpa, pages))
        self._locked_walk(gpa, gpa + pages.shape[0] * 4096, visitor)
        return visitor.flush

    def get_leaf(self, gpa: int) -> Leaf | None:
        """The leaf mapping ``gpa``, found with a walk (None when unmapped)."""
        visitor = _GetLeafVisitor(self.mode)
        self.walker.walk(gpa, gpa + 1, visitor)
        return visitor.found

    def split_range(self, gpa: int, size: int, chunk: int = 2 << 20) -> bool:
        """Eagerly split every block in the range into 4K leaves, ``chunk`` bytes per MMU lock
        hold (arm64's eager page split), topping the cache up between chunks."""
        flush = False
        end = gpa + size
        chunk = max(chunk, 4096)
        addr = gpa
        while addr < end:
            stop = min(end, (addr // chunk + 1) * chunk)
            need = sum(
                (stop - 1) // self.mode.level_size(lvl) - addr // self.mode.level_size(lvl) + 1
                for lvl in range(1, self.mode.levels)
            )
            self.cache.topup(need)
            visitor = _SplitVisitor(self, addr, stop)
            self._locked_walk(addr, stop, visitor)
            flush |= visitor.flush
            addr = stop
        return flush

    def coalesce_range(self, gpa: int, size: int, level: int) -> bool:
        """Replace each level-``level`` table in the range whose leaves map one contiguous,
        aligned host block with the same permissions by a block leaf (break-before-make)."""
        self.mode.check_level(level)
        if level == 0:
            raise PageTableError("level-0 entries are pages: there is nothing to coalesce")
        visitor = _CoalesceVisitor(self, level)
        self._locked_walk(gpa, gpa + size, visitor)
        return visitor.flush

    def ioremap(self, gpa: int, hpa: int, size: int, writable: bool = True) -> None:
        """Eagerly map device memory with 4K leaves (the seed's stage2_ioremap): no execute,
        no dirty tracking. Tops the cache up itself and flushes the range."""
        from .pte import PTE_A, PTE_R, PTE_U

        perms = PTE_V | PTE_R | PTE_U | PTE_A | ((PTE_W | PTE_D) if writable else 0)
        self.topup_for(gpa, size, 0)
        if self.map_range(gpa, size, hpa, perms, 0):
            self.flusher.flush_range(self.vmid, gpa, size)

    def free(self) -> None:
        """Free every table page and the root (the VM is going away)."""
        if self._freed:
            return
        visitor = _FreeVisitor(self)
        self.walker.walk(0, self.mode.gpa_limit, visitor)
        self.pool.free_root(self.root)
        self.cache.drain()
        self.flusher.flush_vmid(self.vmid)
        self._freed = True
        if self._own_pool:
            self.pool.close()

    def _locked_walk(self, start: int, end: int, visitor: Visitor) -> None:
        if self.cache.locked:
            self.walker.walk(start, end, visitor)
        else:
            with self.mmu_lock():
                self.walker.walk(start, end, visitor)

    # ------------------------------------------------------------------ inspection
    def leaves(
        self, gpa: int = 0, size: int | None = None
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int8]]:
        """All valid leaves intersecting the range: (gpa, pte, level) arrays, by GPA."""
        if size is None:
            size = self.mode.gpa_limit - gpa
        visitor = _CollectVisitor(self.mode)
        visitor.pt = self
        self.walker.walk(gpa, gpa + size, visitor)
        if not visitor.gpas:
            empty = np.empty(0, dtype=np.uint64)
            return empty, empty.copy(), np.empty(0, dtype=np.int8)
        g = np.concatenate(visitor.gpas)
        p = np.concatenate(visitor.ptes)
        lv = np.concatenate(visitor.levels)
        order = np.argsort(g, kind="stable")
        return g[order], p[order], lv[order]

    @property
    def table_pages(self) -> int:
        """Table pages this table holds, root included (not counting the cache)."""
        visitor = _CountVisitor()
        self.walker.walk(0, self.mode.gpa_limit, visitor)
        return visitor.count + 4


# ---------------------------------------------------------------------- visitors
def _new_table_ptes(pt: Stage2PageTable, rows: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    return (((rows + pt.pool.base_ppn) << PTE_PPN_SHIFT) | PTE_V).astype(pt.mode.dtype)


def _block_children(pt: Stage2PageTable, pte: int, level: int) -> npt.NDArray[Any]:
    """The entries of a table that maps exactly what the block ``pte`` at ``level`` maps."""
    step = 1 << (pt.mode.shift(level - 1) - PAGE_SHIFT)
    ppn = pte >> PTE_PPN_SHIFT
    perms = pte & _PERM_MASK
    n = pt.mode.entries_per_table
    children = ((ppn + np.arange(n, dtype=np.int64) * step) << PTE_PPN_SHIFT) | perms
    return children.astype(pt.mode.dtype)


def _free_subtree(pt: Stage2PageTable, row: int, level: int, out: list[int]) -> None:
    """Collect ``row`` and every table below it (``level`` is the table's level)."""
    out.append(row)
    if level == 0:
        return
    tbl = pt.pool.pages[row]
    tmask = (tbl & _TABLE_MASK) == PTE_V
    for pte in tbl[tmask].tolist():
        _free_subtree(pt, (pte >> PTE_PPN_SHIFT) - pt.pool.base_ppn, level - 1, out)


class _MapVisitor(Visitor):
    wants_table_pre = True

    def __init__(
        self,
        pt: Stage2PageTable,
        start: int,
        end: int,
        hpa: int,
        perms: int,
        level: int,
        split: str,
    ) -> None:
        self.pt = pt
        self.start = start
        self.end = end
        self.hpa = hpa
        self.perms = perms
        self.level = level
        self.split = split
        self.flush = False

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        pt = self.pt
        shift = pt.mode.shift(level)
        if level > self.level:
            # Install next-level tables under every entry of the run, splitting blocks.
            ents = tbl[i0:i1]
            rows = pt.cache.take(i1 - i0)
            valid = np.flatnonzero(ents & PTE_V)
            for k in valid.tolist():
                i = i0 + k
                old = int(tbl[i])
                tbl[i] = 0  # break
                pt.flusher.flush_addr(pt.vmid, base + (i << shift), level)
                if self.split == "preserve":
                    pt.pool.pages[rows[k]] = _block_children(pt, old, level)
            tbl[i0:i1] = _new_table_ptes(pt, rows)  # make
            return
        # level == self.level: write the leaves.
        n = i1 - i0
        gpa0 = base + (i0 << shift)
        first_ppn = (self.hpa + gpa0 - self.start) >> PAGE_SHIFT
        if n == 1:  # the fault path: one entry, scalar
            old = int(tbl[i0])
            new_pte = (first_ppn << PTE_PPN_SHIFT) | self.perms
            if old & PTE_V:
                if old >> PTE_PPN_SHIFT != first_ppn:
                    tbl[i0] = 0
                    pt.flusher.flush_addr(pt.vmid, gpa0, level)
                elif old & ~new_pte & PTE_RWX:
                    self.flush = True
            tbl[i0] = new_pte
            return
        step = 1 << (shift - PAGE_SHIFT)
        new = ((first_ppn + np.arange(n, dtype=np.int64) * step) << PTE_PPN_SHIFT) | self.perms
        new = new.astype(pt.mode.dtype)
        ents = tbl[i0:i1]
        valid = (ents & PTE_V) != 0
        if valid.any():
            moved = valid & ((ents >> PTE_PPN_SHIFT) != (new >> PTE_PPN_SHIFT))
            if moved.any():
                for k in np.flatnonzero(moved).tolist():
                    tbl[i0 + k] = 0  # break-before-make for a changed output address
                    pt.flusher.flush_addr(pt.vmid, gpa0 + (k << shift), level)
            lost = valid & ~moved & ((ents & ~new & PTE_RWX) != 0)
            if lost.any():
                self.flush = True
        tbl[i0:i1] = new

    def table_pre(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        if level != self.level:
            return
        # Coalesce: a table sits where the block goes. Break, flush, free, make.
        pt = self.pt
        old = int(tbl[i])
        tbl[i] = 0
        size = pt.mode.level_size(level)
        if not pt.debug_skip_coalesce_tlbi:
            pt.flusher.flush_range(pt.vmid, gpa, size)
        freed: list[int] = []
        _free_subtree(pt, (old >> PTE_PPN_SHIFT) - pt.pool.base_ppn, level - 1, freed)
        pt.cache.give_back(freed)
        ppn = (self.hpa + gpa - self.start) >> PAGE_SHIFT
        tbl[i] = (ppn << PTE_PPN_SHIFT) | self.perms


class _SparseMapVisitor(Visitor):
    """:class:`_MapVisitor` for a sorted set of blocks: acts only on entries holding one."""

    wants_table_pre = True

    def __init__(
        self,
        pt: Stage2PageTable,
        gpas: npt.NDArray[np.int64],
        delta: int,
        perms: int,
        level: int,
        split: str,
    ) -> None:
        self.pt = pt
        self.gpas = gpas
        self.delta = delta
        self.perms = perms
        self.level = level
        self.split = split
        self.flush = False

    def _targets(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        a, b = np.searchsorted(self.gpas, [lo, hi])
        return self.gpas[int(a) : int(b)]

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        pt = self.pt
        shift = pt.mode.shift(level)
        targets = self._targets(base + (i0 << shift), base + (i1 << shift))
        if targets.size == 0:
            return
        idx = (targets - base) >> shift
        if level > self.level:
            idx = unique_sorted(idx)
        if level > self.level:
            rows = pt.cache.take(idx.size)
            for k, i in enumerate(idx.tolist()):
                old = int(tbl[i])
                if old & PTE_V:
                    tbl[i] = 0
                    pt.flusher.flush_addr(pt.vmid, base + (i << shift), level)
                    if self.split == "preserve":
                        pt.pool.pages[rows[k]] = _block_children(pt, old, level)
            tbl[idx] = _new_table_ptes(pt, rows)
            return
        ppns = (targets + self.delta) >> PAGE_SHIFT
        new = ((ppns << PTE_PPN_SHIFT) | self.perms).astype(pt.mode.dtype)
        olds = tbl[idx]
        valid = (olds & PTE_V) != 0
        if valid.any():
            moved = valid & ((olds >> PTE_PPN_SHIFT) != (new >> PTE_PPN_SHIFT))
            for k in np.flatnonzero(moved).tolist():
                tbl[int(idx[k])] = 0
                pt.flusher.flush_addr(pt.vmid, base + (int(idx[k]) << shift), level)
            if (valid & ~moved & ((olds & ~new & PTE_RWX) != 0)).any():
                self.flush = True
        tbl[idx] = new

    def table_pre(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        if level != self.level or self._targets(gpa, gpa + 1).size == 0:
            return
        pt = self.pt
        old = int(tbl[i])
        tbl[i] = 0
        if not pt.debug_skip_coalesce_tlbi:
            pt.flusher.flush_range(pt.vmid, gpa, pt.mode.level_size(level))
        freed: list[int] = []
        _free_subtree(pt, (old >> PTE_PPN_SHIFT) - pt.pool.base_ppn, level - 1, freed)
        pt.cache.give_back(freed)
        tbl[i] = (((gpa + self.delta) >> PAGE_SHIFT) << PTE_PPN_SHIFT) | self.perms


class _UnmapVisitor(Visitor):
    wants_table_post = True
    batch_leaf = True

    def __init__(self, pt: Stage2PageTable, start: int, end: int) -> None:
        self.pt = pt
        self.start = start
        self.end = end
        self.flush = False

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        ents = tbl[i0:i1]
        if not self.flush and (ents & PTE_V).any():
            self.flush = True
        ents[:] = 0

    def leaf_batch(
        self,
        parent: PteArray,
        idx: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.int64],
    ) -> None:
        self.flush = True
        parent[idx] = 0
        self.pt.cache.give_back(rows)

    def table_post(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        size = self.pt.mode.level_size(level)
        if gpa >= self.start and gpa + size <= self.end:
            freed: list[int] = []
            _free_subtree(
                self.pt, (int(tbl[i]) >> PTE_PPN_SHIFT) - self.pt.pool.base_ppn, level - 1, freed
            )
            tbl[i] = 0
            self.pt.cache.give_back(freed)


class _WpVisitor(Visitor):
    batch_leaf = True

    def __init__(
        self, pt: Stage2PageTable, masked: tuple[int, npt.NDArray[np.bool_]] | None
    ) -> None:
        self.pt = pt
        self.flush = False
        self.masked = masked
        self._wbit = pt.mode.dtype(PTE_W)

    def _page_mask(self, gpa: int, npages: int) -> npt.NDArray[np.bool_]:
        assert self.masked is not None
        base, pages = self.masked
        first = (gpa - base) >> PAGE_SHIFT
        lo, hi = max(first, 0), min(first + npages, pages.shape[0])
        if lo == first and hi == first + npages:
            return pages[lo:hi]
        out = np.zeros(npages, dtype=np.bool_)
        if hi > lo:
            out[lo - first : hi - first] = pages[lo:hi]
        return out

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        ents = tbl[i0:i1]
        if self.masked is None:
            hit = ents & self._wbit
            if hit.any():
                self.flush = True
                ents -= hit
            return
        shift = self.pt.mode.shift(level)
        per = 1 << (shift - PAGE_SHIFT)
        gpa0 = base + (i0 << shift)
        mask = self._page_mask(gpa0, (i1 - i0) * per)
        if per > 1:
            mask = np.asarray(mask.reshape(i1 - i0, per).any(axis=1))
        hit = ents & (mask.astype(ents.dtype) * self._wbit)
        if hit.any():
            self.flush = True
            ents -= hit

    def leaf_batch(
        self,
        parent: PteArray,
        idx: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.int64],
    ) -> None:
        pages = self.pt.pool.pages
        n = rows.shape[0]
        per = pages.shape[1]
        contiguous = n > 0 and rows[-1] - rows[0] == n - 1 and bool(np.all(np.diff(rows) == 1))
        block = pages[rows[0] : rows[0] + n] if contiguous else pages[rows]
        if self.masked is None:
            hit = block & self._wbit
        else:
            base, bits = self.masked
            firsts = (gpas - base) >> PAGE_SHIFT
            if (
                firsts[0] >= 0
                and firsts[-1] + per <= bits.shape[0]
                and bool(np.all(np.diff(firsts) == per))
            ):
                m = bits[firsts[0] : firsts[0] + n * per].reshape(n, per)
            else:
                m = np.stack([self._page_mask(int(g), per) for g in gpas.tolist()])
            hit = block & (m.astype(block.dtype) * self._wbit)
        if hit.any():
            self.flush = True
            block -= hit
            if not contiguous:
                pages[rows] = block


class _GetLeafVisitor(Visitor):
    def __init__(self, mode: Stage2Mode) -> None:
        self.mode = mode
        self.found: Leaf | None = None

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        pte = int(tbl[i0])
        if pte & PTE_V:
            shift = self.mode.shift(level)
            self.found = Leaf(pte, level, base + (i0 << shift), 1 << shift)


class _SplitVisitor(Visitor):
    def __init__(self, pt: Stage2PageTable, start: int, end: int) -> None:
        self.pt = pt
        self.flush = False

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        if level == 0:
            return
        pt = self.pt
        shift = pt.mode.shift(level)
        ents = tbl[i0:i1]
        blocks = np.flatnonzero(ents & PTE_V)
        if blocks.size == 0:
            return
        rows = pt.cache.take(blocks.size)
        for k, row in zip(blocks.tolist(), rows.tolist(), strict=True):
            i = i0 + k
            old = int(tbl[i])
            tbl[i] = 0
            pt.flusher.flush_addr(pt.vmid, base + (i << shift), level)
            pt.pool.pages[row] = _block_children(pt, old, level)
            tbl[i] = ((row + pt.pool.base_ppn) << PTE_PPN_SHIFT) | PTE_V
        self.flush = True


class _CoalesceVisitor(Visitor):
    wants_leaf = False
    wants_table_pre = True

    def __init__(self, pt: Stage2PageTable, level: int) -> None:
        self.pt = pt
        self.level = level
        self.flush = False

    def table_pre(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        if level != self.level:
            return
        pt = self.pt
        row = (int(tbl[i]) >> PTE_PPN_SHIFT) - pt.pool.base_ppn
        child = pt.pool.pages[row]
        if ((child & _TABLE_MASK) == PTE_V).any() or not (child & PTE_V).all():
            return
        first = int(child[0])
        expect = _block_children(pt, first, level)
        if (first >> PTE_PPN_SHIFT) % (1 << (pt.mode.shift(level) - PAGE_SHIFT)):
            return
        if not np.array_equal(child, expect):
            return
        tbl[i] = 0
        if not pt.debug_skip_coalesce_tlbi:
            pt.flusher.flush_range(pt.vmid, gpa, pt.mode.level_size(level))
        pt.cache.give_back([row])
        tbl[i] = first
        self.flush = True


class _FreeVisitor(Visitor):
    wants_leaf = False
    wants_table_post = True

    def __init__(self, pt: Stage2PageTable) -> None:
        self.pt = pt

    def table_post(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        self.pt.pool.free([(int(tbl[i]) >> PTE_PPN_SHIFT) - self.pt.pool.base_ppn])
        tbl[i] = 0


class _CollectVisitor(Visitor):
    batch_leaf = True

    def __init__(self, mode: Stage2Mode) -> None:
        self.mode = mode
        self.gpas: list[npt.NDArray[np.uint64]] = []
        self.ptes: list[npt.NDArray[np.uint64]] = []
        self.levels: list[npt.NDArray[np.int8]] = []
        self.pt: Stage2PageTable | None = None

    def leaf(self, tbl: PteArray, level: int, i0: int, i1: int, base: int) -> None:
        ents = tbl[i0:i1]
        k = np.flatnonzero(ents & PTE_V)
        if k.size:
            shift = self.mode.shift(level)
            self.gpas.append((base + ((k + i0) << shift)).astype(np.uint64))
            self.ptes.append(ents[k].astype(np.uint64))
            self.levels.append(np.full(k.size, level, dtype=np.int8))

    def leaf_batch(
        self,
        parent: PteArray,
        idx: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.int64],
    ) -> None:
        assert self.pt is not None
        block = self.pt.pool.pages[rows]
        r, k = np.nonzero(block & PTE_V)
        if r.size:
            self.gpas.append((gpas[r] + (k << PAGE_SHIFT)).astype(np.uint64))
            self.ptes.append(block[r, k].astype(np.uint64))
            self.levels.append(np.zeros(r.size, dtype=np.int8))


class _CountVisitor(Visitor):
    wants_leaf = False
    wants_table_post = True

    def __init__(self) -> None:
        self.count = 0

    def table_post(self, tbl: PteArray, level: int, i: int, gpa: int) -> None:
        self.count += 1
