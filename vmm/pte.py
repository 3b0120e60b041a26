"""RISC-V G-stage page-table entries and the stage-2 modes (Sv32x4, Sv39x4, Sv48x4, Sv57x4).

A PTE is a word (64-bit, or 32-bit for Sv32x4) with the privileged spec's layout::

    bit 0 V  valid          bit 4 U  user (always set for G-stage leaves)
    bit 1 R  readable       bit 5 G  global
    bit 2 W  writable       bit 6 A  accessed
    bit 3 X  executable     bit 7 D  dirty
    bits 8-9 RSW            bits 10.. PPN (host-physical page number)

A valid entry with R=W=X=0 points to the next-level table; any other valid entry is a leaf,
at any level. The "x4" modes widen the root table to four pages (2 extra GPA bits), so the
root is 16 KiB, 16 KiB-aligned. Level 0 is the 4 KiB level; the root is ``levels - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Final

import numpy as np

from .errors import PageTableError

__all__ = [
    "MODES",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PTE_A",
    "PTE_D",
    "PTE_G",
    "PTE_PPN_SHIFT",
    "PTE_R",
    "PTE_RWX",
    "PTE_U",
    "PTE_V",
    "PTE_W",
    "PTE_X",
    "Stage2Mode",
    "get_mode",
    "leaf_perms",
]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

PTE_V: Final = 1 << 0
PTE_R: Final = 1 << 1
PTE_W: Final = 1 << 2
PTE_X: Final = 1 << 3
PTE_U: Final = 1 << 4
PTE_G: Final = 1 << 5
PTE_A: Final = 1 << 6
PTE_D: Final = 1 << 7
PTE_RWX: Final = PTE_R | PTE_W | PTE_X
PTE_PPN_SHIFT: Final = 10


def leaf_perms(writable: bool, executable: bool = True) -> int:
    """Low bits of a G-stage leaf as KVM RISC-V installs it: V R U A D, plus X (memory, not
    device) and W when writable. D is always set: KVM makes every G-stage leaf dirty
    (``pte_mkdirty``) and tracks dirty pages by write-protection, never by the D bit."""
    bits = PTE_V | PTE_R | PTE_U | PTE_A | PTE_D
    if executable:
        bits |= PTE_X
    return bits | PTE_W if writable else bits


@dataclass(frozen=True)
class Stage2Mode:
    """Geometry of one G-stage translation mode."""

    name: str
    levels: int
    index_bits: int
    pte_bytes: int
    ppn_bits: int
    hgatp_mode: int

    @property
    def root_level(self) -> int:
        return self.levels - 1

    @property
    def entries_per_table(self) -> int:
        return 1 << self.index_bits

    @property
    def root_entries(self) -> int:
        """Entries of the x4 root: four pages' worth."""
        return 4 << self.index_bits

    @property
    def gpa_bits(self) -> int:
        return PAGE_SHIFT + self.index_bits * self.levels + 2

    @property
    def gpa_limit(self) -> int:
        return 1 << self.gpa_bits

    @property
    def hpa_limit(self) -> int:
        return 1 << (self.ppn_bits + PAGE_SHIFT)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint64 if self.pte_bytes == 8 else np.uint32

    def shift(self, level: int) -> int:
        """log2 of the bytes one entry at ``level`` maps."""
        return PAGE_SHIFT + self.index_bits * level

    def level_size(self, level: int) -> int:
        return 1 << self.shift(level)

    @cached_property
    def shifts(self) -> tuple[int, ...]:
        """:meth:`shift` of every level, level 0 first (the hot paths index this)."""
        return tuple(self.shift(level) for level in range(self.levels))

    def check_level(self, level: int) -> None:
        if not 0 <= level <= self.root_level:
            raise PageTableError(
                f"level {level} does not exist in {self.name} (levels 0..{self.root_level})"
            )


MODES: Final[dict[str, Stage2Mode]] = {
    "sv32x4": Stage2Mode("sv32x4", levels=2, index_bits=10, pte_bytes=4, ppn_bits=22, hgatp_mode=1),
    "sv39x4": Stage2Mode("sv39x4", levels=3, index_bits=9, pte_bytes=8, ppn_bits=44, hgatp_mode=8),
    "sv48x4": Stage2Mode("sv48x4", levels=4, index_bits=9, pte_bytes=8, ppn_bits=44, hgatp_mode=9),
    "sv57x4": Stage2Mode("sv57x4", levels=5, index_bits=9, pte_bytes=8, ppn_bits=44, hgatp_mode=10),
}


def get_mode(name: str | Stage2Mode) -> Stage2Mode:
    """The mode called ``name`` (case-insensitive), or a clear error listing the known ones."""
    if isinstance(name, Stage2Mode):
        return name
    mode = MODES.get(str(name).lower())
    if mode is None:
        raise PageTableError(f"unknown stage-2 mode {name!r}; known: {', '.join(MODES)}")
    return mode
