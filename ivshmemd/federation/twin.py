"""A host's twin of the shared memory, and the diffs taken against it (TreadMarks, 1994).

Each host keeps its own copy of the region (its daemon's shm). The federation keeps a second,
private copy, the *twin*: what every other host is known to hold (or is being sent). A *diff*
is the set of byte runs where the region differs from the twin, taken from a snapshot of the
pages looked at; taking it updates the twin from the same snapshot, so a write that lands
after the snapshot differs again next time and nothing is lost.

Diffs are exact to the byte: two hosts writing different bytes of one page both ship only
their own bytes, and both survive on every host (the multiple-writer protocol). Applying a
received diff writes the region and the twin together (the bytes it brings are not ours to
ship back), except where the caller's mask says this host keeps its own bytes (see
:mod:`ivshmemd.federation.replica` for who wins).

Everything is bulk numpy: the page-level search compares 64-bit words, byte runs are found
with one ``diff`` over the changed pages only, and a diff is applied with one fancy-indexed
store. Nothing here does I/O; the region is any writable buffer (the shm mapping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PAGE_SIZE",
    "RUN_OVERHEAD",
    "SLICED_RUNS",
    "SLICED_RUN_BYTES",
    "Runs",
    "Twin",
    "run_index",
]

PAGE_SIZE: Final = 4096
#: what a run costs in a frame besides its data (its offset and length, and msgpack's share)
RUN_OVERHEAD: Final = 16
#: diffs of at most this many runs are applied run by run (slices), larger ones in one store
SLICED_RUNS: Final = 64
#: ... and so are diffs whose runs are this long on average: a slice costs about a
#: microsecond per run, the one store an 8-byte index per byte (a whole region's transfer
#: by index took seconds, and a member that long unresponsive is declared dead)
SLICED_RUN_BYTES: Final = 256

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class Runs:
    """Byte runs of the region: run ``i`` is ``lengths[i]`` bytes at ``offsets[i]``;
    ``data`` is every run's bytes, in run order. Offsets ascend and runs do not overlap."""

    offsets: I64
    lengths: I64
    data: U8

    @staticmethod
    def empty() -> Runs:
        """No run at all."""
        none = np.zeros(0, dtype=np.int64)
        return Runs(none, none, np.zeros(0, dtype=np.uint8))

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the runs carry."""
        return int(self.data.shape[0])

    def split(self, max_bytes: int) -> list[Runs]:
        """The runs cut into pieces whose data plus :data:`RUN_OVERHEAD` bytes per run stay
        within ``max_bytes`` (a frame's room), in order (a long run is cut too)."""
        if self.nbytes + RUN_OVERHEAD * len(self) <= max_bytes:
            return [self]
        half = (max_bytes - 2 * RUN_OVERHEAD) // 2  # a chunk's data; two chunks' costs fit
        if half < 1:
            raise ValueError(f"{max_bytes} bytes cannot hold two runs")
        offsets, lengths = self.offsets, self.lengths
        pieces = -(-lengths // half)
        rep = np.repeat(np.arange(len(self)), pieces)
        first = np.cumsum(pieces) - pieces
        within = np.arange(rep.shape[0]) - first[rep]
        chunk_offsets = offsets[rep] + within * half
        chunk_lengths = np.minimum(lengths[rep] - within * half, half)
        # each chunk costs at most step = half + overhead; grouping by cumulative cost in
        # steps of that keeps every group under twice it (its first chunk ends in its step,
        # so starts at most one step before), and twice a step fits ``max_bytes``
        step = half + RUN_OVERHEAD
        cost_ends = np.cumsum(chunk_lengths + RUN_OVERHEAD)
        group = (cost_ends - 1) // step
        bounds = np.flatnonzero(np.diff(group)) + 1
        starts = np.concatenate(([0], bounds)).tolist()
        stops = np.concatenate((bounds, [rep.shape[0]])).tolist()
        data_ends = np.concatenate(([0], np.cumsum(chunk_lengths))).tolist()
        return [
            Runs(
                chunk_offsets[lo:hi].copy(),
                chunk_lengths[lo:hi].copy(),
                self.data[data_ends[lo] : data_ends[hi]],
            )
            for lo, hi in zip(starts, stops, strict=True)
        ]


def run_index(offsets: I64, lengths: I64) -> I64:
    """The flat byte indices the runs cover, in run order (one array, no Python loop)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.repeat(offsets - starts, lengths) + np.arange(total, dtype=np.int64)


class Twin:
    """The twin of ``region`` (a writable buffer of whole pages), initially equal to it."""

    def __init__(self, region: U8, page_size: int = PAGE_SIZE) -> None:
        if region.shape[0] % page_size:
            raise ValueError(
                f"a region of {region.shape[0]} bytes is not whole {page_size}-byte pages"
            )
        self.page_size = page_size
        self.region = region
        self.copy: U8 = region.copy()
        self.npages = region.shape[0] // page_size
        words = page_size // 8
        self._region_words = region.view(np.uint64).reshape(self.npages, words)
        self._copy_words = self.copy.view(np.uint64).reshape(self.npages, words)
        self._region_pages = region.reshape(self.npages, page_size)
        self._copy_pages = self.copy.reshape(self.npages, page_size)

    def changed_pages(self, first: int = 0, stop: int | None = None) -> I64:
        """Pages in ``[first, stop)`` where the region differs from the twin (compared as
        64-bit words, the scan path for writers nobody logs)."""
        stop = self.npages if stop is None else stop
        differs = (self._region_words[first:stop] != self._copy_words[first:stop]).any(axis=1)
        return np.flatnonzero(differs).astype(np.int64) + first

    def collect(self, pages: I64) -> Runs:
        """The diff of ``pages`` (ascending page numbers) against the twin, taken from one
        snapshot of those pages; the twin takes the snapshot. Runs are maximal: a write
        across adjacent pages is one run."""
        if pages.shape[0] == 0:
            return Runs.empty()
        page_size = self.page_size
        snapshot = self._region_pages[pages]  # a copy: later writes show next time
        neq = (snapshot != self._copy_pages[pages]).ravel()
        if not neq.any():
            return Runs.empty()
        self._copy_pages[pages] = snapshot  # (a page that did not change: the same bytes)
        # runs of the pages laid end to end (flat: a 2-D nonzero is ten times slower), ...
        size = neq.shape[0]
        if neq.all():  # every byte rewritten (a bulk write): no boundary to look for
            starts, ends = np.zeros(1, dtype=np.int64), np.full(1, size, dtype=np.int64)
        else:
            bounds = np.concatenate(([0], np.flatnonzero(neq[1:] != neq[:-1]) + 1, [size]))
            changed = neq[bounds[:-1]]
            starts, ends = bounds[:-1][changed], bounds[1:][changed]
        # ... cut where two pages laid end to end are not adjacent in the region
        gaps = (np.flatnonzero(pages[1:] != pages[:-1] + 1) + 1) * page_size
        cuts = gaps[neq[gaps - 1] & neq[gaps]]
        if cuts.shape[0]:
            starts = np.sort(np.concatenate((starts, cuts)))
            ends = np.sort(np.concatenate((ends, cuts)))
        rows = starts // page_size
        offsets = pages[rows] * page_size + (starts - rows * page_size)
        flat = snapshot.reshape(-1)
        if starts.shape[0] == 1 and ends[0] - starts[0] == size:
            data = flat  # every byte changed
        elif starts.shape[0] <= SLICED_RUNS:  # a few runs: slices copy faster than a mask
            data = np.concatenate(
                [flat[lo:hi] for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True)]
            )
        else:
            data = flat[neq]
        return Runs(offsets.astype(np.int64), (ends - starts).astype(np.int64), data)

    def unshipped(self, index: I64) -> npt.NDArray[np.bool_]:
        """Which bytes at ``index`` this host changed and has not diffed yet."""
        return self.region[index] != self.copy[index]  # type: ignore[no-any-return]

    def apply(self, runs: Runs, keep: npt.NDArray[np.bool_] | None = None) -> int:
        """Write the runs into the region and the twin, except the bytes ``keep`` marks (in
        :func:`run_index` order): this host's bytes win there. Returns the bytes written."""
        if keep is None and len(runs) <= SLICED_RUNS:
            return self._apply_sliced(runs)
        return self.apply_at(run_index(runs.offsets, runs.lengths), runs.data, keep)

    def apply_at(self, index: I64, data: U8, keep: npt.NDArray[np.bool_] | None = None) -> int:
        """:meth:`apply` at the byte indices ``index`` (those of :func:`run_index`)."""
        if keep is not None:
            take = ~keep
            index, data = index[take], data[take]
        self.region[index] = data
        self.copy[index] = data
        return int(index.shape[0])

    def _apply_sliced(self, runs: Runs) -> int:
        region, copy, data = self.region, self.copy, runs.data
        at = 0
        for offset, length in zip(runs.offsets.tolist(), runs.lengths.tolist(), strict=True):
            piece = data[at : at + length]
            region[offset : offset + length] = piece
            copy[offset : offset + length] = piece
            at += length
        return at

    def merge(self, runs: Runs, protected: Sequence[tuple[I64, I64]] = ()) -> tuple[int, int]:
        """Write a received diff's runs into the region and the twin, except the bytes this
        host changed and has not diffed yet and those inside the ``protected`` byte ranges
        (``(starts, ends)``, ascending: where a diff with a greater stamp wrote). Returns
        ``(bytes written, bytes kept)``. Long runs are merged slice by slice, many short
        ones with one byte index (each costs what it must: per run, or per byte)."""
        if len(runs) <= SLICED_RUNS or runs.nbytes >= SLICED_RUN_BYTES * len(runs):
            return self._merge_sliced(runs, protected)
        index = run_index(runs.offsets, runs.lengths)
        keep = self.unshipped(index)
        for starts, ends in protected:
            at = np.searchsorted(starts, index, side="right") - 1
            keep |= (at >= 0) & (index < ends[np.maximum(at, 0)])
        kept = int(np.count_nonzero(keep))
        return self.apply_at(index, runs.data, keep if kept else None), kept

    def _merge_sliced(self, runs: Runs, protected: Sequence[tuple[I64, I64]]) -> tuple[int, int]:
        region, copy, data = self.region, self.copy, runs.data
        at = written = kept = 0
        for offset, length in zip(runs.offsets.tolist(), runs.lengths.tolist(), strict=True):
            stop = offset + length
            piece = data[at : at + length]
            at += length
            here, twin = region[offset:stop], copy[offset:stop]
            keep = here != twin  # unshipped here
            for starts, ends in protected:
                first = int(np.searchsorted(ends, offset, side="right"))
                last = int(np.searchsorted(starts, stop, side="left"))
                for lo, hi in zip(
                    starts[first:last].tolist(), ends[first:last].tolist(), strict=True
                ):
                    keep[max(lo, offset) - offset : min(hi, stop) - offset] = True
            held = int(np.count_nonzero(keep))
            if held:
                take = ~keep
                np.copyto(here, piece, where=take)
                np.copyto(twin, piece, where=take)
                kept += held
                written += length - held
            else:
                here[:] = piece
                twin[:] = piece
                written += length
        return written, kept

    def unshipped_runs(self, runs: Runs) -> bool:
        """Whether this host changed any byte of ``runs`` and has not diffed it yet (a quick
        check, run by run, for diffs of few runs)."""
        region, copy = self.region, self.copy
        for offset, length in zip(runs.offsets.tolist(), runs.lengths.tolist(), strict=True):
            if not np.array_equal(region[offset : offset + length], copy[offset : offset + length]):
                return True
        return False

    def pages_of(self, first: int, stop: int) -> Runs:
        """Pages ``[first, stop)`` whole, as one run (a region transfer), from a snapshot.
        The twin is not touched: flush this host's changes first (as a diff to everyone),
        or a change in the snapshot would reach only its one receiver."""
        lo, hi = first * self.page_size, stop * self.page_size
        return Runs(
            np.array([lo], dtype=np.int64),
            np.array([hi - lo], dtype=np.int64),
            self.region[lo:hi].copy(),
        )
