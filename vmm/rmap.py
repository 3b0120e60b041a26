"""POWER KVM's nested rmap (arch/powerpc/kvm/book3s_hv_nested.c): which shadow PTEs map a page.

Every shadow PTE a nested (L2) guest's table holds records a reverse-map entry on the L1
page it came from, so that whatever happens to that page (its host memory goes away, it is
write-protected for dirty logging) can be applied to the shadow PTEs too. An entry is one
64-bit word::

    0xFFF0000000000000  12-bit lpid (which L2 guest)
    0x000FFFFFFFFFF000  40-bit L2 guest page frame number (as a GPA, 4K-aligned)
    0x0000000000000001  single-entry flag (the word is stored inline)

A memslot's rmap holds, per L1 page, nothing (0), one entry inline (flag set) in
``Memslot.rmap`` (a numpy ``uint64`` array), or a list (``Memslot.rmap_lists``). Two entries
are the same when their lpid and GPA fields are (``kvmhv_n_rmap_is_equal``: other bits do
not count), and an entry is never recorded twice.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import VmmError
from .memslot import Memslot

__all__ = [
    "MAX_LPID",
    "RMAP_NESTED_GPA_MASK",
    "RMAP_NESTED_IS_SINGLE_ENTRY",
    "RMAP_NESTED_LPID_MASK",
    "RMAP_NESTED_LPID_SHIFT",
    "drop_rmaps",
    "insert_nest_rmap",
    "pages_with_rmaps",
    "rmap_decode",
    "rmap_encode",
    "rmap_entries",
    "rmap_is_equal",
]

RMAP_NESTED_LPID_MASK: Final = 0xFFF0_0000_0000_0000
RMAP_NESTED_LPID_SHIFT: Final = 52
RMAP_NESTED_GPA_MASK: Final = 0x000F_FFFF_FFFF_F000
RMAP_NESTED_IS_SINGLE_ENTRY: Final = 0x1
MAX_LPID: Final = (1 << 12) - 1
_IDENTITY: Final = RMAP_NESTED_LPID_MASK | RMAP_NESTED_GPA_MASK


def rmap_encode(lpid: int, l2_gpa: int) -> int:
    """The rmap word for the shadow PTE of L2 page ``l2_gpa`` in guest ``lpid``."""
    if not 0 <= lpid <= MAX_LPID:
        raise VmmError(f"lpid {lpid} does not fit the rmap's 12 bits")
    if l2_gpa & ~RMAP_NESTED_GPA_MASK:
        raise VmmError(f"L2 GPA {l2_gpa:#x} is not a 4K-aligned 52-bit address")
    return (lpid << RMAP_NESTED_LPID_SHIFT) | l2_gpa


def rmap_decode(rmap: int) -> tuple[int, int]:
    """``(lpid, l2_gpa)`` of an rmap word (the other bits are ignored)."""
    return (rmap & RMAP_NESTED_LPID_MASK) >> RMAP_NESTED_LPID_SHIFT, rmap & RMAP_NESTED_GPA_MASK


def rmap_is_equal(a: int, b: int) -> bool:
    """Whether two rmap words name the same shadow PTE: same lpid, same L2 GPA."""
    return not (a ^ b) & _IDENTITY


def _rmap_array(slot: Memslot) -> npt.NDArray[np.uint64]:
    if slot.rmap is None:
        slot.rmap = np.zeros(slot.npages, dtype=np.uint64)
    return slot.rmap


def insert_nest_rmap(slot: Memslot, gfn_offset: int, rmap: int) -> bool:
    """Record ``rmap`` on page ``gfn_offset`` of ``slot``; False if an equal entry
    (:func:`rmap_is_equal`) is there already (kvmhv_insert_nest_rmap)."""
    arr = _rmap_array(slot)
    cur = int(arr[gfn_offset])
    if cur == 0 and gfn_offset not in slot.rmap_lists:
        arr[gfn_offset] = rmap | RMAP_NESTED_IS_SINGLE_ENTRY
        return True
    if cur & RMAP_NESTED_IS_SINGLE_ENTRY:
        old = cur & ~RMAP_NESTED_IS_SINGLE_ENTRY
        if rmap_is_equal(old, rmap):
            return False
        slot.rmap_lists[gfn_offset] = [old, rmap]
        arr[gfn_offset] = 0  # the list head now lives in rmap_lists
        return True
    entries = slot.rmap_lists[gfn_offset]
    if any(rmap_is_equal(e, rmap) for e in entries):
        return False
    entries.append(rmap)
    return True


def rmap_entries(slot: Memslot, gfn_offset: int) -> list[int]:
    """The rmap words recorded on one page (flag stripped)."""
    if slot.rmap is not None:
        cur = int(slot.rmap[gfn_offset])
        if cur & RMAP_NESTED_IS_SINGLE_ENTRY:
            return [cur & ~RMAP_NESTED_IS_SINGLE_ENTRY]
    return list(slot.rmap_lists.get(gfn_offset, ()))


def pages_with_rmaps(slot: Memslot, first: int, last: int) -> list[int]:
    """Page offsets in ``[first, last]`` of ``slot`` that hold rmap entries, ascending
    (cheap when the slot has none: a memslot no L2 guest maps is never scanned)."""
    if slot.rmap is None and not slot.rmap_lists:
        return []
    offsets: set[int] = {o for o in slot.rmap_lists if first <= o <= last}
    if slot.rmap is not None:
        offsets.update((np.flatnonzero(slot.rmap[first : last + 1]) + first).tolist())
    return sorted(offsets)


def drop_rmaps(slot: Memslot, gfn_offset: int | None = None) -> None:
    """Free the rmap entries of one page, or of the whole slot (``gfn_offset`` None)."""
    if gfn_offset is None:
        slot.rmap = None
        slot.rmap_lists.clear()
        return
    if slot.rmap is not None:
        slot.rmap[gfn_offset] = 0
    slot.rmap_lists.pop(gfn_offset, None)
