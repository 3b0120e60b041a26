"""Tests for vmm.iova_bitmap: vfio's reporting format, windows, bulk set, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.iova_bitmap import IovaBitmap, IovaBitmapWindow

PAGE = 4096


def bit(data: np.ndarray, index: int) -> int:
    return (int(data[index // 64]) >> (index % 64)) & 1


def test_format_is_vfio_word_and_bit() -> None:
    base = 0x10_0000
    bm = IovaBitmap(base, 200 * PAGE, PAGE)
    bm.set(base + 130 * PAGE + 17, 1)
    # page 130 -> word 2, bit 2
    assert int(bm.data[2]) == 1 << 2
    assert int(bm.data[0]) == 0 and int(bm.data[1]) == 0 and int(bm.data[3]) == 0
    assert bm.test(base + 130 * PAGE)
    assert bm.test(base + 131 * PAGE - 1)
    assert not bm.test(base + 131 * PAGE)


def test_caller_buffer_is_written_in_place() -> None:
    buf = np.zeros(8, dtype=np.uint64)
    bm = IovaBitmap(0, 300 * PAGE, PAGE, buf)
    bm.set(63 * PAGE, 2 * PAGE)  # pages 63 and 64: across a word edge
    assert bm.data is buf
    assert int(buf[0]) == 1 << 63
    assert int(buf[1]) == 1
    assert bm.count() == 2


def test_set_touching_pages_unaligned() -> None:
    bm = IovaBitmap(0, 10 * PAGE, PAGE)
    bm.set(PAGE - 1, 2)  # last byte of page 0, first byte of page 1
    assert bm.dirty_pages().tolist() == [0, 1]


def test_set_spans_many_words_in_bulk() -> None:
    bm = IovaBitmap(0, 1000 * PAGE, PAGE)
    bm.set(5 * PAGE, 900 * PAGE)
    assert bm.count() == 900
    assert bm.dirty_pages().tolist() == list(range(5, 905))
    assert int(bm.data[1]) == (1 << 64) - 1


def test_huge_page_size_and_nonaligned_tail() -> None:
    gib = 1 << 30
    bm = IovaBitmap(4 * gib, 70 * gib + 5, gib)  # 71 pages (last partial)
    assert bm.npages == 71
    bm.set(4 * gib + 70 * gib, 5)
    assert bm.dirty_pages().tolist() == [70]
    assert list(bm.iter_set_iovas()) == [74 * gib]
    assert bm.dirty_iovas().tolist() == [74 * gib]


def test_count_ignores_foreign_bits_past_range() -> None:
    buf = np.full(2, (1 << 64) - 1, dtype=np.uint64)
    bm = IovaBitmap(0, 70 * PAGE, PAGE, buf)  # 70 pages: word 1 owns 6 bits
    assert bm.count() == 70
    assert bm.dirty_pages().tolist() == list(range(70))
    bm.clear()
    assert bm.count() == 0


def test_set_pages_bulk() -> None:
    bm = IovaBitmap(0, 500 * PAGE, PAGE)
    bm.set_pages(np.array([499, 0, 64, 63, 64, 200]))
    assert bm.dirty_pages().tolist() == [0, 63, 64, 200, 499]
    with pytest.raises(ValueError, match="outside"):
        bm.set_pages([500])
    with pytest.raises(ValueError, match="outside"):
        bm.set_pages([-1])


def test_for_each_windows_cover_range_and_write_through() -> None:
    buf = np.zeros(16, dtype=np.uint64)
    base = 0x4000_0000
    npages = 1000
    bm = IovaBitmap(base, npages * PAGE, PAGE, buf)
    seen: list[tuple[int, int, int]] = []

    def visit(w: IovaBitmapWindow) -> int | None:
        seen.append((w.iova, w.length, w.words.shape[0]))
        # mark the window's last page and one page past its end (set-ahead)
        w.set(w.iova + w.length - 1, 1)
        if w.iova + w.length < base + npages * PAGE:
            w.set(w.iova + w.length, 1)
        # the words view is the caller's buffer
        assert np.shares_memory(w.words, buf)
        return None

    assert bm.for_each(visit, window_bytes=16) == 0  # 128 pages per window
    assert [s[0] for s in seen] == [base + i * 128 * PAGE for i in range(8)]
    assert sum(s[1] for s in seen) == npages * PAGE
    assert seen[-1][1] == (1000 - 7 * 128) * PAGE
    assert seen[-1][2] == 2  # 104 pages -> 2 words
    expected = set()
    for i in range(8):
        last = min((i + 1) * 128, npages) - 1
        expected.add(last)
        if last + 1 < npages:
            expected.add(last + 1)
    assert set(bm.dirty_pages().tolist()) == expected


def test_for_each_words_view_writes_land_in_buffer() -> None:
    buf = np.zeros(4, dtype=np.uint64)
    bm = IovaBitmap(0, 256 * PAGE, PAGE, buf)

    def visit(w: IovaBitmapWindow) -> int | None:
        w.words[0] |= np.uint64(1)
        return None

    bm.for_each(visit, window_bytes=8)  # one word per window
    assert bm.dirty_pages().tolist() == [0, 64, 128, 192]


def test_for_each_stops_on_nonzero() -> None:
    bm = IovaBitmap(0, 1024 * PAGE, PAGE)
    calls: list[int] = []

    def visit(w: IovaBitmapWindow) -> int | None:
        calls.append(w.first_page)
        return -5 if len(calls) == 2 else 0

    assert bm.for_each(visit, window_bytes=8) == -5
    assert calls == [0, 64]


@pytest.mark.parametrize("page_size", [0, 3, 4095, 6000, -4096])
def test_bad_page_size(page_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        IovaBitmap(0, 1 << 20, page_size)


def test_buffer_too_small() -> None:
    with pytest.raises(ValueError, match="need 129 bits = 3 words"):
        IovaBitmap(0, 129 * PAGE, PAGE, np.zeros(2, dtype=np.uint64))


def test_buffer_wrong_type() -> None:
    with pytest.raises(ValueError, match="uint64"):
        IovaBitmap(0, PAGE, PAGE, np.zeros(2, dtype=np.uint32))
    with pytest.raises(ValueError, match="numpy"):
        IovaBitmap(0, PAGE, PAGE, bytearray(16))  # type: ignore[arg-type]


def test_iova_out_of_range() -> None:
    base = 0x100000
    bm = IovaBitmap(base, 16 * PAGE, PAGE)
    with pytest.raises(ValueError, match="outside the bitmap's range"):
        bm.set(base - 1, 2)
    with pytest.raises(ValueError, match="outside the bitmap's range"):
        bm.set(base + 15 * PAGE, PAGE + 1)
    with pytest.raises(ValueError, match="outside the bitmap's range"):
        bm.test(base + 16 * PAGE)
    with pytest.raises(ValueError, match="positive"):
        bm.set(base, 0)
    with pytest.raises(ValueError, match="window_bytes"):
        bm.for_each(lambda w: None, window_bytes=12)
    assert bm.count() == 0


def test_bad_range() -> None:
    with pytest.raises(ValueError, match="length"):
        IovaBitmap(0, 0, PAGE)
    with pytest.raises(ValueError, match="64-bit"):
        IovaBitmap((1 << 64) - PAGE, 2 * PAGE, PAGE)


page_shifts = st.integers(min_value=0, max_value=21)


@st.composite
def bitmap_ops(draw: st.DrawFn) -> tuple[int, int, int, list[tuple[int, int]], int]:
    shift = draw(page_shifts)
    page = 1 << shift
    base = draw(st.integers(0, 1 << 20)) * page
    npages = draw(st.integers(1, 700))
    length = npages * page - draw(st.integers(0, page - 1))
    ops = []
    for _ in range(draw(st.integers(0, 12))):
        start = draw(st.integers(0, length - 1))
        ln = draw(st.integers(1, length - start))
        ops.append((base + start, ln))
    window_words = draw(st.integers(1, 6))
    return page, base, length, ops, window_words


@settings(max_examples=150, deadline=None)
@given(bitmap_ops())
def test_property_matches_reference_set(
    case: tuple[int, int, int, list[tuple[int, int]], int],
) -> None:
    page, base, length, ops, window_words = case
    bm = IovaBitmap(base, length, page)
    ref: set[int] = set()
    for iova, ln in ops:
        bm.set(iova, ln)
        ref.update(range((iova - base) // page, (iova + ln - 1 - base) // page + 1))
    assert bm.count() == len(ref)
    assert bm.dirty_pages().tolist() == sorted(ref)
    for p in range(bm.npages):
        assert bit(bm.data, p) == (p in ref)
    for p in list(ref)[:20]:
        assert bm.test(base + p * page)
    # a window walk sees the same bits through its views, and covers the range exactly once
    seen: set[int] = set()
    covered = 0

    def visit(w: IovaBitmapWindow) -> int | None:
        nonlocal covered
        covered += w.length
        for i in range(w.npages):
            if (int(w.words[i // 64]) >> (i % 64)) & 1:
                seen.add(w.first_page + i)
        return None

    bm.for_each(visit, window_bytes=8 * window_words)
    assert covered == length
    assert seen == ref


def test_strided_caller_buffer() -> None:
    backing = np.zeros(8, dtype=np.uint64)
    strided = backing[::2]  # a non-contiguous view the caller owns
    bm = IovaBitmap(0, 256 * PAGE, PAGE, strided)
    bm.set(64 * PAGE, 65 * PAGE)  # pages 64..128
    assert bm.dirty_pages().tolist() == list(range(64, 129))
    assert int(backing[2]) == (1 << 64) - 1  # word 1 of the view
    assert int(backing[4]) == 1
    assert backing[1::2].sum() == 0
