"""The stage-2 (G-stage) page table: real PTE words in real table pages, and its operations.

Every operation is a walk of :class:`~vmm.walker.Walker` with a small visitor, as in arm64's
``pgtable.c``: map (which also installs tables, splits blocks and coalesces tables into
blocks), unmap, write-protect (whole or masked by a dirty bitmap), get-leaf, eager split,
coalesce, ioremap and free. Range operations return whether a TLB flush is needed and the
caller flushes once per range.

Break-before-make has two helpers, as in pgtable.c: :meth:`Stage2PageTable.break_pte`
invalidates an entry and flushes the TLBs for what it mapped (a table entry: its whole
range, since entries of every level below may be cached; a leaf: by address with the level
hint), and :meth:`Stage2PageTable.make_pte` writes the new entry. Every entry whose output
address or size changes goes through both. :attr:`Stage2PageTable.debug_skip_coalesce_tlbi`
skips the flush when a table is broken to make a block, to reproduce the TLB conflict
arm64's kvm_page_table_test found.

Maps run under :meth:`Stage2PageTable.mmu_lock` and take table pages only from the page
cache, which the caller tops up beforehand (:meth:`Stage2PageTable.topup_for`).

The vCPU's hardware walker, :meth:`Stage2PageTable.translate` and the vectorised
:meth:`Stage2PageTable.translate_bulk`, reads the same words without the visitor machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from ._arrays import unique_sorted
from .errors import ModelBug, PageTableError
from .pte import (
    PAGE_SHIFT,
    PTE_PPN_SHIFT,
    PTE_RWX,
    PTE_V,
    PTE_W,
    Stage2Mode,
    get_mode,
    leaf_perms,
)
from .tablepool import PageCache, TablePagePool
from .walker import TABLE_MASK, VisitCtx, Visitor, Walker, is_table

__all__ = ["Leaf", "Stage2PageTable", "TlbFlusher"]

_PERM_MASK: Final = (1 << PTE_PPN_SHIFT) - 1
_SPLITS: Final = ("preserve", "drop")
IndexArray = npt.NDArray[np.int64]


class TlbFlusher(Protocol):
    """Who invalidates cached translations (the VM broadcasts to its vCPUs' TLBs)."""

    def flush_range(self, vmid: int, gpa: int, size: int) -> None: ...

    def flush_addr(self, vmid: int, gpa: int, level: int) -> None: ...

    def flush_vmid(self, vmid: int) -> None: ...


class _MmuLock:
    """The MMU lock of one table: marks its page cache locked (no top-up) while held."""

    __slots__ = ("cache",)

    def __init__(self, cache: PageCache) -> None:
        self.cache = cache

    def __enter__(self) -> None:
        if self.cache.locked:
            raise ModelBug("MMU lock taken twice")
        self.cache.locked = True

    def __exit__(self, *exc: object) -> None:
        self.cache.locked = False
        self.cache.trim()


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
        self.walker = Walker(self.pool, self.mode, self.root)
        self.debug_skip_coalesce_tlbi = False
        self._lock = _MmuLock(self.cache)
        self._freed = False
        self._ppn_limit = 1 << self.mode.ppn_bits
        # the hardware walk's constants
        self._shifts = self.mode.shifts
        self._per = self.mode.entries_per_table
        self._root_flat = self.root * self._per
        self._root_mask = self.mode.root_entries - 1
        self._root_level = self.mode.root_level
        self._root_shift = self._shifts[self._root_level]
        #: ``(gpa >> shift, shift, word index, level)`` of the leaf the last :meth:`set_leaf`
        #: wrote in place; None once any walk that may change the table (a map through the
        #: visitors, an unmap, a write-protect, a free) ran since: a faulting vCPU's retry
        #: reads it back
        self.made: tuple[int, int, int, int] | None = None
        #: the hardware walk's descent below the root: (level, shift) per level
        self._descent = tuple((lv, self._shifts[lv]) for lv in range(self._root_level - 1, -1, -1))

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

    def _check_aligned(self, gpa: int, size: int, hpa: int, level: int) -> None:
        self.mode.check_level(level)
        block = self.mode.level_size(level)
        if gpa % block or size % block or hpa % block or size <= 0:
            raise PageTableError(
                f"map of GPA {gpa:#x} size {size:#x} to HPA {hpa:#x} is not aligned to the "
                f"level-{level} size {block:#x}"
            )
        self.walker.check_range(gpa, size)
        if (hpa + size) >> PAGE_SHIFT > self._ppn_limit:
            raise PageTableError(f"HPA {hpa + size - 1:#x} does not fit {self.mode.name}'s PPN")

    def mmu_lock(self) -> _MmuLock:
        """The MMU lock (a context manager): no cache top-up inside; freed pages return to
        the pool after it."""
        return self._lock

    def tables_needed(self, gpa: int, size: int, level: int) -> int:
        """Upper bound of the table pages a map of ``[gpa, gpa+size)`` at ``level`` needs."""
        total = 0
        last = gpa + size - 1
        for shift in self._shifts[level + 1 :]:
            total += (last >> shift) - (gpa >> shift) + 1
        return total

    def topup_for(self, gpa: int, size: int, level: int) -> None:
        """Top the cache up for one map (outside the MMU lock)."""
        self.cache.topup(self.tables_needed(gpa, size, level))

    # ------------------------------------------------------------------ break-before-make
    def break_pte(self, ctx: VisitCtx, i: int) -> int:
        """Break: invalidate entry ``i`` of ``ctx``'s table and flush the TLBs for what it
        mapped (a table's whole range, a leaf by address and level). Returns the old entry."""
        old = ctx.word(i)
        ctx.set_word(i, 0)
        if old & PTE_V:
            gpa = ctx.gpa(i)
            if is_table(old):
                if not self.debug_skip_coalesce_tlbi:
                    self.flusher.flush_range(self.vmid, gpa, ctx.size)
            else:
                self.flusher.flush_addr(self.vmid, gpa, ctx.level)
        return old

    def make_pte(self, ctx: VisitCtx, i: int, new: int) -> None:
        """Make: write the new entry ``i`` (after :meth:`break_pte`, or over an invalid one)."""
        ctx.set_word(i, new)

    # ------------------------------------------------------------------ hardware walk
    def translate(self, gpa: int) -> tuple[int, int]:
        """The hart's page walk: ``(pte, level)`` of the entry that ends the walk.

        ``pte`` is 0 when the walk met an invalid entry at ``level``. This is the per-access
        path of every TLB miss, so the pool's :meth:`~vmm.tablepool.TablePagePool.follow`
        is applied in place (``(pte >> PTE_PPN_SHIFT) - base_ppn`` is the row): a method
        call per level costs a fifth of the walk.
        """
        pool = self.pool
        words = pool.words
        level = self._root_level
        pte = words[self._root_flat + ((gpa >> self._root_shift) & self._root_mask)]
        if pte & TABLE_MASK == PTE_V:
            base, per = pool.base_ppn, self._per
            mask = per - 1
            for level, shift in self._descent:  # noqa: B007 (level: where the walk ends)
                pte = words[((pte >> PTE_PPN_SHIFT) - base) * per + ((gpa >> shift) & mask)]
                if pte & TABLE_MASK != PTE_V:
                    break
            else:
                raise ModelBug(f"table PTE {pte:#x} at level 0 (GPA {gpa:#x})")
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
        per = self._per
        flat = self.pool.pages.reshape(-1)
        # Sv32x4 words are widened (a copy); 64-bit words are reinterpreted in place.
        flat = flat.view(np.int64) if flat.dtype == np.uint64 else flat.astype(np.int64)
        g = gpas.view(np.int64) if gpas.dtype == np.uint64 else gpas.astype(np.int64)
        level = mode.root_level
        pte = flat[self._root_flat + ((g >> self._shifts[level]) & self._root_mask)]
        active: IndexArray | None = None  # None: every address is still walking
        while True:
            is_tbl = (pte & TABLE_MASK) == PTE_V
            if not bool(is_tbl.all()):
                done = ~is_tbl
                p = pte[done]
                p = np.where(p & PTE_V, p, 0)
                sel = done if active is None else active[done]
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
            rows = self.pool.follow_many(pte)
            pte = flat[rows * per + ((g >> self._shifts[level]) & (per - 1))]
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
        visitor = _MapVisitor(self, level, perms, split, hpa - gpa, None)
        self._locked_walk(gpa, gpa + size, visitor)
        return visitor.flush

    def set_leaf(
        self, gpa: int, hpa: int, perms: int, level: int = 0, *, split: str = "preserve"
    ) -> bool:
        """:meth:`map_range` for one leaf, the fault path: a scalar descent that installs
        missing tables from the cache on the way (the seed's ``gstage_set_pte``). When a
        block lies on the way (a split) or a table sits where the leaf goes (a coalesce),
        it takes the visitor walk instead, which does those with break-before-make.
        ``gpa`` and ``hpa`` must be aligned to the leaf; call under :meth:`mmu_lock`."""
        pool = self.pool
        words = pool.words
        base = pool.base_ppn
        shifts = self._shifts
        per = self._per
        lvl = self._root_level
        flat = self._root_flat
        i = (gpa >> shifts[lvl]) & self._root_mask
        while lvl > level:
            pte = words[flat + i]
            if pte & TABLE_MASK == PTE_V:
                flat = ((pte >> PTE_PPN_SHIFT) - base) * per  # the pool's follow(), in place
            elif pte & PTE_V:  # a block on the way: split it with break-before-make
                return self.map_range(gpa, 1 << shifts[level], hpa, perms, level, split=split)
            else:  # nothing there: a new table (make; there is nothing to break)
                row = self.cache.take_one()
                words[flat + i] = pool.table_pte(row)
                flat = row * per
            lvl -= 1
            i = (gpa >> shifts[lvl]) & (per - 1)
        old = words[flat + i]
        if old & TABLE_MASK == PTE_V:  # a table where the block goes: coalesce
            return self.map_range(gpa, 1 << shifts[level], hpa, perms, level, split=split)
        new = ((hpa >> PAGE_SHIFT) << PTE_PPN_SHIFT) | (perms & _PERM_MASK) | PTE_V
        flush = False
        if old & PTE_V:
            if (old ^ new) >> PTE_PPN_SHIFT:  # another output address: break first
                words[flat + i] = 0
                self.flusher.flush_addr(self.vmid, gpa, level)
            elif old & ~new & PTE_RWX:
                flush = True
        words[flat + i] = new
        self.made = (gpa >> shifts[level], shifts[level], flat + i, level)
        return flush

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
        visitor = _MapVisitor(self, level, perms, split, delta, gpas.astype(np.int64))
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
        self._locked_walk(gpa, gpa + (pages.shape[0] << PAGE_SHIFT), visitor)
        return visitor.flush

    def wp_pages(self, gpas: list[int]) -> list[bool]:
        """Write-protect the leaf mapping each of ``gpas`` (a block leaf whole, as
        :meth:`wp_masked` does); for each, whether that leaf was writable. The caller
        flushes. The scalar form of :meth:`wp_masked` for a handful of pages (a dirty
        tracker's harvest after a few writes): one hardware-style walk per page, as
        :meth:`translate` walks, clearing W in place, instead of a visitor walk of the span
        (a permission downgrade needs no break-before-make)."""
        self.made = None
        words = self.pool.words
        base, per = self.pool.base_ppn, self._per
        mask = per - 1
        root_flat, root_shift, root_mask = self._root_flat, self._root_shift, self._root_mask
        out = []
        for gpa in gpas:
            i = root_flat + ((gpa >> root_shift) & root_mask)
            pte = words[i]
            if pte & TABLE_MASK == PTE_V:
                for _level, shift in self._descent:
                    i = ((pte >> PTE_PPN_SHIFT) - base) * per + ((gpa >> shift) & mask)
                    pte = words[i]
                    if pte & TABLE_MASK != PTE_V:
                        break
                else:
                    raise ModelBug(f"table PTE {pte:#x} at level 0 (GPA {gpa:#x})")
            writable = bool(pte & PTE_V) and bool(pte & PTE_W)
            if writable:
                words[i] = pte & ~PTE_W
            out.append(writable)
        return out

    def get_leaf(self, gpa: int) -> Leaf | None:
        """The leaf mapping ``gpa``, found with a walk (None when unmapped)."""
        visitor = _GetLeafVisitor()
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
            need = sum(((stop - 1) >> shift) - (addr >> shift) + 1 for shift in self._shifts[1:])
            self.cache.topup(need)
            visitor = _SplitVisitor(self)
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
        perms = leaf_perms(writable, executable=False)
        self.topup_for(gpa, size, 0)
        if self.map_range(gpa, size, hpa, perms, 0):
            self.flusher.flush_range(self.vmid, gpa, size)

    def free(self) -> None:
        """Free every table page and the root (the VM is going away)."""
        if self._freed:
            return
        self.made = None
        visitor = _FreeVisitor(self.pool)
        self.walker.walk(0, self.mode.gpa_limit, visitor)
        self.pool.free_root(self.root)
        self.cache.drain()
        self.flusher.flush_vmid(self.vmid)
        self._freed = True
        if self._own_pool:
            self.pool.close()

    def _locked_walk(self, start: int, end: int, visitor: Visitor) -> None:
        self.made = None  # the table may change under it: the last set_leaf is history
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
        visitor = _CollectVisitor()
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


# ---------------------------------------------------------------------- helpers
def _block_children(mode: Stage2Mode, pte: int, level: int) -> npt.NDArray[Any]:
    """The entries of a table that maps exactly what the block ``pte`` at ``level`` maps."""
    step = 1 << (mode.shift(level - 1) - PAGE_SHIFT)
    ppn = pte >> PTE_PPN_SHIFT
    children = (
        (ppn + np.arange(mode.entries_per_table, dtype=np.int64) * step) << PTE_PPN_SHIFT
    ) | (pte & _PERM_MASK)
    return children.astype(mode.dtype)


def _free_subtree(pool: TablePagePool, row: int, level: int, out: list[int]) -> None:
    """Collect ``row`` and every table below it (``level`` is the table's level)."""
    out.append(row)
    if level == 0:
        return
    tbl = pool.table(row)
    for pte in tbl[(tbl & TABLE_MASK) == PTE_V].tolist():
        _free_subtree(pool, pool.follow(pte), level - 1, out)


# ---------------------------------------------------------------------- visitors
class _MapVisitor(Visitor):
    """Map leaves at ``level``: block ``g`` goes to HPA ``g + delta``, for every block of
    the walk's range (``targets`` None) or for the sorted block GPAs in ``targets``."""

    wants_table_pre = True

    def __init__(
        self,
        pt: Stage2PageTable,
        level: int,
        perms: int,
        split: str,
        delta: int,
        targets: IndexArray | None,
    ) -> None:
        if split not in _SPLITS:
            raise PageTableError(f"split must be 'preserve' or 'drop', got {split!r}")
        self.pt = pt
        self.level = level
        self.perms = perms & _PERM_MASK | PTE_V
        self.preserve = split == "preserve"
        self.delta = delta
        self.targets = targets
        self.flush = False

    def _indices(self, ctx: VisitCtx) -> IndexArray | None:
        """The entries of the run that hold a target (None: all of them)."""
        if self.targets is None:
            return None
        a, b = np.searchsorted(self.targets, [ctx.addr, ctx.gpa(ctx.i1)])
        idx = (self.targets[int(a) : int(b)] - ctx.base) >> ctx.shift
        return unique_sorted(idx) if ctx.level > self.level else idx

    def leaf(self, ctx: VisitCtx) -> None:
        idx = self._indices(ctx)
        if idx is not None and idx.size == 0:
            return
        if ctx.level > self.level:
            self._install_tables(ctx, np.arange(ctx.i0, ctx.i1) if idx is None else idx)
        elif idx is None and ctx.i1 - ctx.i0 == 1:
            self._write_leaf(ctx, ctx.i0)
        else:
            self._write_leaves(ctx, idx)

    def _install_tables(self, ctx: VisitCtx, idx: IndexArray) -> None:
        """Next-level tables under every entry in ``idx``, splitting the blocks there."""
        pt = self.pt
        rows = pt.cache.take(idx.size)
        tbl = ctx.tbl
        for k in np.flatnonzero(tbl[idx] & PTE_V).tolist():
            old = pt.break_pte(ctx, int(idx[k]))
            if self.preserve:
                pt.pool.pages[rows[k]] = _block_children(pt.mode, old, ctx.level)
        tbl[idx] = pt.pool.table_ptes(rows)  # make

    def _write_leaf(self, ctx: VisitCtx, i: int) -> None:
        """One leaf, scalar (the fault path)."""
        new = (((ctx.gpa(i) + self.delta) >> PAGE_SHIFT) << PTE_PPN_SHIFT) | self.perms
        old = ctx.word(i)
        if old & PTE_V:
            if (old ^ new) >> PTE_PPN_SHIFT:
                self.pt.break_pte(ctx, i)
            elif old & ~new & PTE_RWX:
                self.flush = True
        self.pt.make_pte(ctx, i, new)

    def _write_leaves(self, ctx: VisitCtx, idx: IndexArray | None) -> None:
        sel: slice | IndexArray = slice(ctx.i0, ctx.i1) if idx is None else idx
        index = np.arange(ctx.i0, ctx.i1) if idx is None else idx
        gpas = ctx.base + (index << ctx.shift)
        new = (((gpas + self.delta) >> PAGE_SHIFT) << PTE_PPN_SHIFT) | self.perms
        tbl = ctx.tbl
        new = new.astype(tbl.dtype)
        olds = tbl[sel]
        valid = (olds & PTE_V) != 0
        if valid.any():
            moved = valid & ((olds >> PTE_PPN_SHIFT) != (new >> PTE_PPN_SHIFT))
            for k in np.flatnonzero(moved).tolist():
                self.pt.break_pte(ctx, int(index[k]))
            if (valid & ~moved & ((olds & ~new & PTE_RWX) != 0)).any():
                self.flush = True
        tbl[sel] = new  # make

    def table_pre(self, ctx: VisitCtx) -> None:
        if ctx.level != self.level:
            return
        gpa = ctx.addr
        if self.targets is not None:
            a, b = np.searchsorted(self.targets, [gpa, gpa + ctx.size])
            if a == b:
                return
        # Coalesce: a table sits where the block goes. Break, free the tables, make.
        pt = self.pt
        old = pt.break_pte(ctx, ctx.i0)
        freed: list[int] = []
        _free_subtree(pt.pool, pt.pool.follow(old), ctx.level - 1, freed)
        pt.cache.give_back(freed)
        pt.make_pte(ctx, ctx.i0, (((gpa + self.delta) >> PAGE_SHIFT) << PTE_PPN_SHIFT) | self.perms)


class _UnmapVisitor(Visitor):
    wants_table_post = True
    batch_leaf = True

    def __init__(self, pt: Stage2PageTable, start: int, end: int) -> None:
        self.pt = pt
        self.start = start
        self.end = end
        self.flush = False

    def leaf(self, ctx: VisitCtx) -> None:
        ents = ctx.tbl[ctx.i0 : ctx.i1]
        if not self.flush and (ents & PTE_V).any():
            self.flush = True
        ents[:] = 0

    def leaf_batch(
        self, ctx: VisitCtx, idx: IndexArray, rows: IndexArray, gpas: IndexArray
    ) -> None:
        self.flush = True
        ctx.tbl[idx] = 0
        self.pt.cache.give_back(rows)

    def table_post(self, ctx: VisitCtx) -> None:
        gpa = ctx.addr
        if gpa >= self.start and gpa + ctx.size <= self.end:
            pool = self.pt.pool
            freed: list[int] = []
            _free_subtree(pool, pool.follow(ctx.word(ctx.i0)), ctx.level - 1, freed)
            ctx.set_word(ctx.i0, 0)
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

    def leaf(self, ctx: VisitCtx) -> None:
        ents = ctx.tbl[ctx.i0 : ctx.i1]
        if self.masked is None:
            hit = ents & self._wbit
        else:
            per = 1 << (ctx.shift - PAGE_SHIFT)
            mask = self._page_mask(ctx.addr, (ctx.i1 - ctx.i0) * per)
            if per > 1:
                mask = np.asarray(mask.reshape(ctx.i1 - ctx.i0, per).any(axis=1))
            hit = ents & (mask.astype(ents.dtype) * self._wbit)
        if hit.any():
            self.flush = True
            ents -= hit

    def leaf_batch(
        self, ctx: VisitCtx, idx: IndexArray, rows: IndexArray, gpas: IndexArray
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
    def __init__(self) -> None:
        self.found: Leaf | None = None

    def leaf(self, ctx: VisitCtx) -> None:
        pte = ctx.word(ctx.i0)
        if pte & PTE_V:
            self.found = Leaf(pte, ctx.level, ctx.addr, ctx.size)


class _SplitVisitor(Visitor):
    def __init__(self, pt: Stage2PageTable) -> None:
        self.pt = pt
        self.flush = False

    def leaf(self, ctx: VisitCtx) -> None:
        if ctx.level == 0:
            return
        pt = self.pt
        blocks = np.flatnonzero(ctx.tbl[ctx.i0 : ctx.i1] & PTE_V)
        if blocks.size == 0:
            return
        rows = pt.cache.take(blocks.size)
        for k, row in zip(blocks.tolist(), rows.tolist(), strict=True):
            i = ctx.i0 + k
            old = pt.break_pte(ctx, i)
            pt.pool.pages[row] = _block_children(pt.mode, old, ctx.level)
            pt.make_pte(ctx, i, pt.pool.table_pte(row))
        self.flush = True


class _CoalesceVisitor(Visitor):
    wants_leaf = False
    wants_table_pre = True

    def __init__(self, pt: Stage2PageTable, level: int) -> None:
        self.pt = pt
        self.level = level
        self.flush = False

    def table_pre(self, ctx: VisitCtx) -> None:
        if ctx.level != self.level:
            return
        pt = self.pt
        row = pt.pool.follow(ctx.word(ctx.i0))
        child = pt.pool.table(row)
        if ((child & TABLE_MASK) == PTE_V).any() or not (child & PTE_V).all():
            return
        first = int(child[0])
        if (first >> PTE_PPN_SHIFT) % (1 << (ctx.shift - PAGE_SHIFT)):
            return
        if not np.array_equal(child, _block_children(pt.mode, first, ctx.level)):
            return
        pt.break_pte(ctx, ctx.i0)
        pt.cache.give_back([row])
        pt.make_pte(ctx, ctx.i0, first)
        self.flush = True


class _FreeVisitor(Visitor):
    wants_leaf = False
    wants_table_post = True

    def __init__(self, pool: TablePagePool) -> None:
        self.pool = pool

    def table_post(self, ctx: VisitCtx) -> None:
        self.pool.free([self.pool.follow(ctx.word(ctx.i0))])
        ctx.set_word(ctx.i0, 0)


class _CollectVisitor(Visitor):
    batch_leaf = True

    def __init__(self) -> None:
        self.gpas: list[npt.NDArray[np.uint64]] = []
        self.ptes: list[npt.NDArray[np.uint64]] = []
        self.levels: list[npt.NDArray[np.int8]] = []

    def leaf(self, ctx: VisitCtx) -> None:
        ents = ctx.tbl[ctx.i0 : ctx.i1]
        k = np.flatnonzero(ents & PTE_V)
        if k.size:
            self.gpas.append((ctx.base + ((k + ctx.i0) << ctx.shift)).astype(np.uint64))
            self.ptes.append(ents[k].astype(np.uint64))
            self.levels.append(np.full(k.size, ctx.level, dtype=np.int8))

    def leaf_batch(
        self, ctx: VisitCtx, idx: IndexArray, rows: IndexArray, gpas: IndexArray
    ) -> None:
        block = ctx.pool.pages[rows]
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

    def table_post(self, ctx: VisitCtx) -> None:
        self.count += 1
