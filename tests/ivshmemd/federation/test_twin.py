"""The twin and its byte-exact diffs (ivshmemd.federation.twin), pure and fast.

A diff taken on one host and applied on another makes the two regions equal, carries
exactly the bytes that changed (never a byte that did not), and leaves the twin equal to
what was shipped; :meth:`Runs.split` cuts a diff into frames that fit and lose nothing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmemd.federation.twin import PAGE_SIZE, RUN_OVERHEAD, SLICED_RUNS, Runs, Twin, run_index

U8 = npt.NDArray[np.uint8]

#: small pages keep hypothesis fast; the default page size is exercised separately
PAGE = 64
PAGES = 8
SIZE = PAGE * PAGES

writes_strategy = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=3 * PAGE)),
    max_size=12,
)


def region_of(data: bytes | None = None, size: int = SIZE) -> U8:
    region = np.zeros(size, dtype=np.uint8)
    if data is not None:
        region[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return region


def write(region: U8, offset: int, data: bytes) -> None:
    """A guest write, clipped to the region."""
    piece = np.frombuffer(data, dtype=np.uint8)[: region.shape[0] - offset]
    region[offset : offset + piece.shape[0]] = piece


def expanded(runs: Runs) -> dict[int, int]:
    """Byte index -> value, for every byte the runs carry."""
    index = run_index(runs.offsets, runs.lengths)
    return dict(zip(index.tolist(), runs.data.tolist(), strict=True))


@settings(max_examples=200, deadline=None)
@given(initial=st.binary(min_size=SIZE, max_size=SIZE), writes=writes_strategy)
def test_a_diff_applied_elsewhere_makes_the_copies_equal_and_carries_only_changed_bytes(
    initial: bytes, writes: list[tuple[int, bytes]]
) -> None:
    here, there = region_of(initial), region_of(initial)
    twin, remote = Twin(here, PAGE), Twin(there, PAGE)
    for offset, data in writes:
        write(here, offset, data)
    changed = np.flatnonzero(here != there)
    pages = twin.changed_pages()
    assert pages.tolist() == sorted(set((changed // PAGE).tolist()))
    runs = twin.collect(pages)
    # byte-exact: exactly the changed bytes, with their new values, runs ascending and apart
    assert sorted(expanded(runs)) == changed.tolist()
    assert all(here[i] == v for i, v in expanded(runs).items())
    assert (runs.lengths > 0).all()
    # runs ascend and never overlap; two touch only where a page ends (a run is in one page)
    ends = runs.offsets[:-1] + runs.lengths[:-1]
    assert (runs.offsets[1:] >= ends).all()
    assert (ends[runs.offsets[1:] == ends] % PAGE == 0).all()
    assert runs.nbytes == int(runs.lengths.sum())
    written = remote.apply(runs)
    assert written == changed.shape[0]
    assert np.array_equal(here, there)
    # both twins now equal their regions: nothing left to ship, nothing to ship back
    assert np.array_equal(twin.copy, here) and np.array_equal(remote.copy, there)
    assert twin.changed_pages().shape[0] == 0 and len(twin.collect(np.arange(PAGES))) == 0


@settings(max_examples=100, deadline=None)
@given(writes=writes_strategy, extra=st.lists(st.integers(0, PAGES - 1), max_size=PAGES))
def test_a_diff_of_logged_pages_equals_the_scan_and_unlogged_pages_wait(
    writes: list[tuple[int, bytes]], extra: list[int]
) -> None:
    """The dirty-log path: collecting the written pages (plus clean ones) equals the scan;
    a page left out of the log is not lost, it differs from the twin until collected."""
    here, there = region_of(), region_of()
    twin, remote = Twin(here, PAGE), Twin(there, PAGE)
    for offset, data in writes:
        write(here, offset, data)
    written = twin.changed_pages()
    logged = np.array(sorted(set(written.tolist()[::2]) | set(extra)), dtype=np.int64)
    remote.apply(twin.collect(logged))
    left_out = sorted(set(written.tolist()) - set(logged.tolist()))
    assert twin.changed_pages().tolist() == left_out
    assert np.array_equal(here.reshape(PAGES, PAGE)[logged], there.reshape(PAGES, PAGE)[logged])
    remote.apply(twin.collect(twin.changed_pages()))
    assert np.array_equal(here, there)


def test_a_write_after_the_snapshot_is_shipped_next_time() -> None:
    here = region_of()
    twin = Twin(here, PAGE)
    here[10] = 1
    first = twin.collect(twin.changed_pages())
    here[10] = 2  # after the snapshot: the twin holds 1, the region 2
    here[11] = 3
    second = twin.collect(twin.changed_pages())
    assert expanded(first) == {10: 1}
    assert expanded(second) == {10: 2, 11: 3}


def test_default_pages_a_write_across_a_page_boundary_is_one_run() -> None:
    here, there = region_of(size=4 * PAGE_SIZE), region_of(size=4 * PAGE_SIZE)
    twin, remote = Twin(here), Twin(there)
    here[PAGE_SIZE - 3 : PAGE_SIZE + 5] = 7
    runs = twin.collect(twin.changed_pages())
    assert runs.offsets.tolist() == [PAGE_SIZE - 3]  # adjacent pages: one run
    assert runs.lengths.tolist() == [8]
    remote.apply(runs)
    assert np.array_equal(here, there)


def test_a_region_that_is_not_whole_pages_is_refused() -> None:
    with pytest.raises(ValueError, match="not whole 64-byte pages"):
        Twin(region_of(size=PAGE * 2 + 1), PAGE)


def test_changed_pages_looks_only_in_its_range() -> None:
    here = region_of()
    twin = Twin(here, PAGE)
    here[[0, 3 * PAGE, 7 * PAGE + 1]] = 1
    assert twin.changed_pages().tolist() == [0, 3, 7]
    assert twin.changed_pages(1, 7).tolist() == [3]
    assert twin.changed_pages(4).tolist() == [7]


@pytest.mark.parametrize("runs", [3, SLICED_RUNS + 5], ids=["sliced", "one-store"])
def test_apply_keeps_the_bytes_the_mask_marks_and_counts_what_it_wrote(runs: int) -> None:
    here = region_of()
    twin = Twin(here, PAGE)
    offsets = np.arange(runs, dtype=np.int64) * 4
    lengths = np.full(runs, 2, dtype=np.int64)
    data = np.arange(1, 2 * runs + 1, dtype=np.uint8)
    diff = Runs(offsets, lengths, data)
    assert twin.apply(diff) == 2 * runs
    index = run_index(offsets, lengths)
    assert here[index].tolist() == data.tolist()
    keep = np.zeros(index.shape[0], dtype=bool)
    keep[::2] = True
    assert twin.apply(Runs(offsets, lengths, data + 100), keep) == runs
    assert here[index].tolist() == [v + 100 * (i % 2) for i, v in enumerate(data.tolist())]
    assert np.array_equal(twin.copy, here)  # applied bytes are not ours to ship back


def test_unshipped_bytes_are_those_written_here_and_not_diffed() -> None:
    here = region_of()
    twin = Twin(here, PAGE)
    here[5] = 9
    index = np.array([4, 5, 6], dtype=np.int64)
    assert twin.unshipped(index).tolist() == [False, True, False]
    assert twin.unshipped_runs(Runs(np.array([5]), np.array([1]), np.zeros(1, np.uint8)))
    assert not twin.unshipped_runs(Runs(np.array([6]), np.array([2]), np.zeros(2, np.uint8)))
    twin.collect(twin.changed_pages())
    assert not twin.unshipped(index).any()


def test_a_region_transfer_is_every_page_whole_and_leaves_the_twin_alone() -> None:
    source = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8)
    here, there = source.copy(), region_of()
    twin, remote = Twin(here, PAGE), Twin(there, PAGE)
    here[3] ^= 0xFF  # not flushed yet: the transfer carries it, the twin still ships it
    transfer = twin.pages_of(0, PAGES)
    assert transfer.offsets.tolist() == [0] and transfer.lengths.tolist() == [SIZE]
    remote.apply(transfer)
    assert np.array_equal(here, there)
    assert twin.changed_pages().tolist() == [0]
    part = twin.pages_of(2, 4)
    assert part.offsets.tolist() == [2 * PAGE] and part.nbytes == 2 * PAGE
    here[2 * PAGE] ^= 1
    assert part.data[0] != here[2 * PAGE]  # a snapshot, not a view


def test_run_index_lists_the_bytes_in_run_order() -> None:
    offsets = np.array([10, 3, 40], dtype=np.int64)
    lengths = np.array([2, 3, 1], dtype=np.int64)
    assert run_index(offsets, lengths).tolist() == [10, 11, 3, 4, 5, 40]
    assert run_index(offsets[:0], lengths[:0]).shape == (0,)


runs_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 300)), min_size=0, max_size=20
).map(lambda pairs: _runs_from(pairs))


def _runs_from(pairs: list[tuple[int, int]]) -> Runs:
    """Runs separated by the given gaps, with the given lengths, and distinct data."""
    offsets, lengths, at = [], [], 0
    for gap, length in pairs:
        at += gap + 1
        offsets.append(at)
        lengths.append(length)
        at += length
    total = sum(lengths)
    data = (np.arange(total) % 251).astype(np.uint8)
    return Runs(np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64), data)


@settings(max_examples=300, deadline=None)
@given(runs=runs_strategy, max_bytes=st.integers(2 * RUN_OVERHEAD + 2, 2000))
def test_split_pieces_fit_their_frame_and_together_are_the_diff(runs: Runs, max_bytes: int) -> None:
    pieces = runs.split(max_bytes)
    assert pieces
    for piece in pieces:
        assert piece.nbytes + RUN_OVERHEAD * len(piece) <= max_bytes
        assert piece.nbytes == int(piece.lengths.sum())
        assert (piece.lengths > 0).all()
    joined: dict[int, int] = {}
    order: list[int] = []
    for piece in pieces:
        bytes_of = expanded(piece)
        assert not joined.keys() & bytes_of.keys()  # no byte twice
        joined.update(bytes_of)
        order += run_index(piece.offsets, piece.lengths).tolist()
    assert joined == expanded(runs)
    assert order == sorted(order)  # pieces in order: applying them in turn is the diff
    if runs.nbytes + RUN_OVERHEAD * len(runs) <= max_bytes:
        assert pieces == [runs]


def test_split_refuses_a_frame_too_small_for_any_run() -> None:
    runs = _runs_from([(0, 100)])
    with pytest.raises(ValueError, match="cannot hold two runs"):
        runs.split(2 * RUN_OVERHEAD + 1)
    (empty,) = Runs.empty().split(RUN_OVERHEAD + 1)  # nothing to cut: fits any frame
    assert len(empty) == 0 and empty.nbytes == 0
