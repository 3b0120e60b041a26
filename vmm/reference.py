"""The straightforward per-page walker: the seed's loops, ported as they are.

This is what the RISC-V stage-2 code did before walkers and bulk operations: for every page
of a range, walk from the root to the leaf (``stage2_get_leaf_entry``), then apply the
operation to that one PTE (``stage2_op_pte``) with a remote TLB flush per PTE, stepping by
the leaf's size; the dirty-log harvest goes word by word over the bitmap and write-protects
from the first to the last set bit of each word (``kvm_arch_mmu_enable_log_dirty_pt_masked``).

It runs on the same :class:`~vmm.stage2.Stage2PageTable` words as the fast path, so the
benchmark compares like with like and the tests use it as a cross-check.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from .pte import PAGE_SHIFT, PTE_RWX, PTE_V, PTE_W
from .stage2 import Stage2PageTable

__all__ = ["OP_CLEAR", "OP_WP", "PerPageWalker"]

OP_CLEAR: Final = 0
OP_WP: Final = 1


class PerPageWalker:
    """The seed's per-page stage-2 loops over one page table."""

    def __init__(self, pt: Stage2PageTable) -> None:
        self.pt = pt
        self.mode = pt.mode

    def get_leaf_entry(self, addr: int) -> tuple[bool, int, int, int]:
        """``(found, level, row, index)``: the leaf's location, or where the walk stopped.

        ``row`` is the table page (-1 for the root, where ``index`` spans the 4 pages)."""
        mode = self.mode
        pages = self.pt.pool.pages
        level = mode.root_level
        idx = (addr >> mode.shift(level)) & (mode.root_entries - 1)
        row = self.pt.root + (idx >> mode.index_bits)
        idx &= mode.entries_per_table - 1
        while True:
            pte = int(pages[row, idx])
            if not pte & PTE_V:
                return False, level, row, idx
            if pte & PTE_RWX:
                return True, level, row, idx
            if level == 0:
                return False, level, row, idx
            level -= 1
            row = self.pt.pool.follow(pte)
            idx = (addr >> mode.shift(level)) & (mode.entries_per_table - 1)

    def op_pte(self, addr: int, row: int, idx: int, level: int, op: int) -> None:
        pages = self.pt.pool.pages
        pte = int(pages[row, idx])
        if not pte & PTE_V:
            return
        if level and not pte & PTE_RWX:
            child = self.pt.pool.follow(pte)
            next_size = self.mode.level_size(level - 1)
            if op == OP_CLEAR:
                pages[row, idx] = 0
            for i in range(self.mode.entries_per_table):
                self.op_pte(addr + i * next_size, child, i, level - 1, op)
            if op == OP_CLEAR:
                self.pt.pool.free([child])
        else:
            if op == OP_CLEAR:
                pages[row, idx] = 0
            elif op == OP_WP:
                pages[row, idx] = pte & ~PTE_W
            self.pt.flusher.flush_addr(self.pt.vmid, addr, level)

    def _range_op(self, start: int, size: int, op: int) -> None:
        addr, end = start, start + size
        while addr < end:
            found, level, row, idx = self.get_leaf_entry(addr)
            page_size = self.mode.level_size(level)
            if found and not addr & (page_size - 1) and end - addr >= page_size:
                self.op_pte(addr, row, idx, level, op)
            addr += page_size

    def unmap_range(self, start: int, size: int) -> None:
        """stage2_unmap_range."""
        self._range_op(start, size, OP_CLEAR)

    def wp_range(self, start: int, size: int) -> None:
        """stage2_wp_range."""
        self._range_op(start, size, OP_WP)

    def enable_log_dirty_pt_masked(self, slot_gpa: int, gfn_offset: int, mask: int) -> None:
        """Write-protect from the first to the last set bit of one bitmap word."""
        low = (mask & -mask).bit_length() - 1
        high = mask.bit_length()
        start = slot_gpa + ((gfn_offset + low) << PAGE_SHIFT)
        end = slot_gpa + ((gfn_offset + high) << PAGE_SHIFT)
        self.wp_range(start, end - start)

    def get_and_clear_dirty_log(
        self, slot_gpa: int, bitmap: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.uint64]:
        """kvm_get_dirty_log_protect without manual protect: word by word, xchg the word
        with 0, copy it out and re-protect its pages."""
        out = np.zeros_like(bitmap)
        for i in range(bitmap.shape[0]):
            mask = int(bitmap[i])
            if not mask:
                continue
            bitmap[i] = 0
            out[i] = mask
            self.enable_log_dirty_pt_masked(slot_gpa, i * 64, mask)
        return out
