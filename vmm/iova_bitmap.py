"""vfio's IOVA bitmap: the format in which dirty pages leave the VMM.

A bitmap covers the IOVA range ``[iova, iova + length)`` in pages of ``page_size`` bytes.
Page ``k`` is ``[iova + k * page_size, iova + (k + 1) * page_size)`` and its bit lives in the
caller's buffer of 64-bit words, exactly as vfio/iommufd report it to user space::

    data[(addr - iova) // page_size // 64]  bit  ((addr - iova) // page_size) % 64

The buffer is the caller's: a numpy ``uint64`` array handed in (or allocated here when none is
given), never copied, so whatever sets bits through this object or through a window of it
lands in that buffer. Every range operation works on whole 64-bit words with numpy; nothing
walks bit by bit.

Linux walks the bitmap in windows because it can only pin a bounded number of user pages at a
time (``iova_bitmap_for_each``); :meth:`IovaBitmap.for_each` reproduces that iteration: the
callback gets an :class:`IovaBitmapWindow` with the window's IOVA, length and a view on the
data words of that window. A ``set`` through a window may cross the window's end (vfio records
such bits "ahead" and applies them when it maps the next window); here the whole buffer is
addressable, so the bits land at once.

Bad input (a page size that is not a power of two, a buffer too small for the range, an IOVA
outside the range) raises :class:`ValueError` with a message that says what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_WINDOW_BYTES",
    "IovaBitmap",
    "IovaBitmapWindow",
]

BITS_PER_WORD = 64
BYTES_PER_WORD = 8
_ALL_ONES = (1 << BITS_PER_WORD) - 1
_IOVA_LIMIT = 1 << 64

#: Bitmap bytes covered by one window of :meth:`IovaBitmap.for_each`: what vfio maps at once
#: (one page of ``struct page *`` = 512 pinned 4 KiB pages of bitmap), i.e. 2 MiB of bitmap,
#: 16 Mi pages, 64 GiB of IOVA at 4 KiB pages.
DEFAULT_WINDOW_BYTES = 512 * 4096

U64Array = npt.NDArray[np.uint64]


def _words_for(npages: int) -> int:
    return (npages + BITS_PER_WORD - 1) // BITS_PER_WORD


class IovaBitmap:
    """A dirty bitmap over ``[iova, iova + length)`` in vfio's reporting format."""

    __slots__ = (
        "_data",
        "_iova",
        "_last_word_mask",
        "_length",
        "_npages",
        "_nwords",
        "_page_shift",
        "_page_size",
        "_words",
    )

    def __init__(
        self,
        iova: int,
        length: int,
        page_size: int,
        data: U64Array | None = None,
    ) -> None:
        if not isinstance(page_size, int) or page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size!r}")
        if not isinstance(iova, int) or iova < 0:
            raise ValueError(f"iova must be a non-negative integer, got {iova!r}")
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        if iova + length > _IOVA_LIMIT:
            raise ValueError(
                f"range [{iova:#x}, {iova + length:#x}) goes beyond the 64-bit IOVA space"
            )
        self._iova = iova
        self._length = length
        self._page_size = page_size
        self._page_shift = page_size.bit_length() - 1
        self._npages = (length + page_size - 1) >> self._page_shift
        self._nwords = _words_for(self._npages)
        tail_bits = self._npages % BITS_PER_WORD
        self._last_word_mask = (1 << tail_bits) - 1 if tail_bits else _ALL_ONES
        if data is None:
            data = np.zeros(self._nwords, dtype=np.uint64)
        else:
            _check_buffer(data, self._nwords, self._npages, page_size, length)
        self._data = data
        # The words this range owns: a view, so writes land in the caller's buffer.
        self._words = data[: self._nwords]

    # ------------------------------------------------------------------ properties
    @property
    def iova(self) -> int:
        """First IOVA of the range (the bitmap's bit 0 covers the page starting here)."""
        return self._iova

    @property
    def length(self) -> int:
        """Length of the IOVA range in bytes."""
        return self._length

    @property
    def page_size(self) -> int:
        """Bytes per bit."""
        return self._page_size

    @property
    def npages(self) -> int:
        """Number of pages (bits) the range covers."""
        return self._npages

    @property
    def data(self) -> U64Array:
        """The caller's buffer (or the one allocated here), as handed in."""
        return self._data

    # ------------------------------------------------------------------ range checks
    def _page_range(self, iova: int, length: int) -> tuple[int, int]:
        """First and last page index (inclusive) touched by ``[iova, iova + length)``."""
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        end = self._iova + self._length
        if iova < self._iova or iova + length > end:
            raise ValueError(
                f"IOVA range [{iova:#x}, {iova + length:#x}) is outside the bitmap's range "
                f"[{self._iova:#x}, {end:#x})"
            )
        first = (iova - self._iova) >> self._page_shift
        last = (iova + length - 1 - self._iova) >> self._page_shift
        return first, last

    def _page_index(self, iova: int) -> int:
        end = self._iova + self._length
        if not self._iova <= iova < end:
            raise ValueError(
                f"IOVA {iova:#x} is outside the bitmap's range [{self._iova:#x}, {end:#x})"
            )
        return (iova - self._iova) >> self._page_shift

    # ------------------------------------------------------------------ operations
    def set(self, iova: int, length: int) -> None:
        """Mark every page that ``[iova, iova + length)`` touches, in whole-word strokes."""
        first, last = self._page_range(iova, length)
        self._set_page_span(first, last)

    def _set_page_span(self, first: int, last: int) -> None:
        words = self._words
        first_word, last_word = first >> 6, last >> 6
        first_bit, last_bit = first & 63, last & 63
        if first_word == last_word:
            words[first_word] |= np.uint64(((2 << (last_bit - first_bit)) - 1) << first_bit)
            return
        words[first_word] |= np.uint64((_ALL_ONES << first_bit) & _ALL_ONES)
        if last_word > first_word + 1:
            words[first_word + 1 : last_word] = np.uint64(_ALL_ONES)
        words[last_word] |= np.uint64((2 << last_bit) - 1)

    def set_pages(self, pages: npt.ArrayLike) -> None:
        """Mark the pages with the given indices (relative to the range start), in bulk.

        This is how a harvest of dirty page numbers (from a dirty log or a dirty ring) is
        turned into the reporting format without a Python loop.
        """
        idx = np.asarray(pages, dtype=np.int64).ravel()
        if idx.size == 0:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._npages:
            raise ValueError(
                f"page index {lo if lo < 0 else hi} is outside the bitmap's {self._npages} pages"
            )
        idx = np.sort(idx)
        word_of = idx >> 6
        bits = np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64))
        starts = np.flatnonzero(np.r_[True, word_of[1:] != word_of[:-1]])
        self._words[word_of[starts]] |= np.bitwise_or.reduceat(bits, starts)

    def test(self, iova: int) -> bool:
        """Whether the page holding ``iova`` is marked."""
        page = self._page_index(iova)
        return bool((int(self._words[page >> 6]) >> (page & 63)) & 1)

    def clear(self) -> None:
        """Unmark every page of the range (the words the range owns are zeroed)."""
        self._words[:] = 0

    def count(self) -> int:
        """Number of marked pages (bits past the range's last page are not counted)."""
        if self._nwords == 0:
            return 0
        total = int(np.bitwise_count(self._words[:-1]).sum(dtype=np.int64))
        tail = int(self._words[-1]) & self._last_word_mask
        return total + tail.bit_count()

    def dirty_pages(self) -> npt.NDArray[np.int64]:
        """Indices (relative to the range start) of the marked pages, ascending.

        Only the non-zero words are unpacked, so a sparse bitmap costs a scan of the words
        plus work proportional to the dirty pages.
        """
        nonzero = np.flatnonzero(self._words)
        if nonzero.size == 0:
            return np.empty(0, dtype=np.int64)
        dense = nonzero.size == self._nwords
        chosen = np.ascontiguousarray(self._words if dense else self._words[nonzero], dtype="<u8")
        bits = np.unpackbits(chosen.view(np.uint8), bitorder="little")
        set_bits = np.flatnonzero(bits)
        pages = set_bits if dense else nonzero[set_bits >> 6] * BITS_PER_WORD + (set_bits & 63)
        pages = pages.astype(np.int64, copy=False)
        if pages.size and pages[-1] >= self._npages:
            pages = pages[pages < self._npages]
        return pages

    def dirty_iovas(self) -> npt.NDArray[np.uint64]:
        """Start IOVA of every marked page, ascending."""
        pages = self.dirty_pages().astype(np.uint64)
        return np.uint64(self._iova) + (pages << np.uint64(self._page_shift))

    def iter_set_iovas(self) -> Iterator[int]:
        """Yield the start IOVA of every marked page, ascending, as Python ints."""
        base, shift = self._iova, self._page_shift
        for page in self.dirty_pages().tolist():
            yield base + (page << shift)

    def for_each(
        self,
        fn: Callable[[IovaBitmapWindow], int | None],
        window_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> int:
        """Call ``fn`` on successive windows of the range, as ``iova_bitmap_for_each`` does.

        Each window covers ``window_bytes * 8`` pages (the last one what remains). A
        non-zero return from ``fn`` stops the walk and is returned; otherwise 0.
        """
        if not isinstance(window_bytes, int) or window_bytes <= 0 or window_bytes % 8:
            raise ValueError(f"window_bytes must be a positive multiple of 8, got {window_bytes!r}")
        pages_per_window = window_bytes * 8
        end = self._iova + self._length
        for first in range(0, self._npages, pages_per_window):
            stop = min(first + pages_per_window, self._npages)
            start_iova = self._iova + (first << self._page_shift)
            stop_iova = min(self._iova + (stop << self._page_shift), end)
            window = IovaBitmapWindow(
                self,
                start_iova,
                stop_iova - start_iova,
                first,
                self._words[first >> 6 : _words_for(stop)],
            )
            ret = fn(window)
            if ret:
                return ret
        return 0

    def __repr__(self) -> str:
        return (
            f"IovaBitmap(iova={self._iova:#x}, length={self._length:#x}, "
            f"page_size={self._page_size:#x}, set={self.count()})"
        )


class IovaBitmapWindow:
    """One window of an :class:`IovaBitmap` walk: ``[iova, iova + length)`` and its words.

    ``words`` is a view on the caller's buffer (word 0 holds the window's first page), and
    :meth:`set` writes through the parent bitmap, so nothing done here is lost.
    """

    __slots__ = ("bitmap", "first_page", "iova", "length", "words")

    def __init__(
        self,
        bitmap: IovaBitmap,
        iova: int,
        length: int,
        first_page: int,
        words: U64Array,
    ) -> None:
        self.bitmap = bitmap
        self.iova = iova
        self.length = length
        self.first_page = first_page
        self.words = words

    @property
    def npages(self) -> int:
        """Pages this window covers."""
        ps = self.bitmap.page_size
        return (self.length + ps - 1) // ps

    def set(self, iova: int, length: int) -> None:
        """Mark ``[iova, iova + length)``; it may run past this window (vfio's set-ahead)."""
        self.bitmap.set(iova, length)

    def test(self, iova: int) -> bool:
        """Whether the page holding ``iova`` is marked."""
        return self.bitmap.test(iova)

    def __repr__(self) -> str:
        return f"IovaBitmapWindow(iova={self.iova:#x}, length={self.length:#x})"


def _check_buffer(data: Any, nwords: int, npages: int, page_size: int, length: int) -> None:
    if not isinstance(data, np.ndarray):
        raise ValueError(f"data must be a numpy uint64 array, got {type(data).__name__}")
    if data.dtype != np.uint64:
        raise ValueError(f"data must have dtype uint64, got {data.dtype}")
    if data.ndim != 1:
        raise ValueError(f"data must be one-dimensional, got shape {data.shape}")
    if not data.flags.writeable:
        raise ValueError("data must be writable")
    if data.shape[0] < nwords:
        raise ValueError(
            f"data holds {data.shape[0]} words ({data.shape[0] * BYTES_PER_WORD} bytes) but "
            f"{length:#x} bytes at page size {page_size:#x} need {npages} bits = {nwords} words"
        )
