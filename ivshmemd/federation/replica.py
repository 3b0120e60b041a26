"""One shared memory across hosts: release-consistent replication, sans-I/O (issue 13).

Each daemon keeps its own copy of the region (its shm) and a :class:`~.twin.Twin` of it.
:class:`Replica` decides what to send and what to apply; its driver
(:class:`ivshmemd.federation.node.Federation`) carries frames and eventfds. No socket, no
clock: the driver passes ``now``.

**Diffs, broadcast, in stream order.** Before a ring leaves for another host, and in the
background flush, the driver *flushes*: the pages this host's writers changed (the pages our
peers logged, or a scan of the whole region when a writer nobody logs is connected) are
diffed against the twin (:meth:`Replica.flush`), and the diff goes to *every* member, ahead of
the ring on the same ordered stream. A diff is numbered (the origin's count of diffs) and
stamped with a Lamport clock.

**Transitively (causal delivery).** A ring also depends on what its sender's host had applied
from third hosts: the sender puts an :class:`~.schema.After` frame (each member's diff count
it had applied) ahead of the ring when that changed. The receiver delivers a ring only once
it has applied as many of each member's diffs (:meth:`Replica.admit`), holding it until
then. So if A writes X and rings B on another host, and B then rings C on a third, C's
interrupt waits until A's diff (sent by A to C directly, maybe on a slower link) is applied.
A member that is gone no longer holds anything up (its diffs will not come).

**Multiple writers, and who wins.** Diffs are exact byte runs, so writes from different hosts
to different bytes of one page all survive. For the same bytes written on two hosts without
a doorbell ordering them, the outcome is defined and the same on every host: *the write with
the greater stamp wins*, a stamp being ``(Lamport clock, host identity)``. A diff stamped
below one already applied here that wrote the same bytes leaves those bytes alone (this is
what :attr:`Replica.recent` remembers, for :data:`RECENT_WINDOW` seconds: longer than any
diff can be in flight to a live member), and a byte this host changed and has not shipped yet
is kept: it will be shipped with a greater stamp than anything applied before it, so it wins
everywhere. Causally ordered writes always have increasing stamps, so the later one wins.

**Whole-region transfers.** A daemon that joins (or rejoins after frames were lost) sends a
:class:`~.schema.RegionRequest`; the answer is the whole region in parts, with the diff
counts it includes. Only a daemon that *holds* the region answers with it (one that started
the federation, or received a region); others answer "not a holder". A receiver applies a
diff or a transfer only when its last part is in: a sender that dies midway leaves nothing
half-applied.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from .schema import DIFF_PART_BYTES, After, Diff
from .twin import Runs, Twin

__all__ = ["RECENT_WINDOW", "Replica", "ReplicaError", "Stamp"]

log = logging.getLogger(__name__)

#: Seconds a diff's runs are remembered to resolve a late, concurrent diff to the same bytes.
RECENT_WINDOW: Final = 30.0
#: Diffs remembered at most (the oldest are forgotten first).
RECENT_MAX: Final = 4096

Stamp = tuple[int, str]
I64 = npt.NDArray[np.int64]
T = TypeVar("T")

_LE_U64: Final = np.dtype("<u8")
_LE_U32: Final = np.dtype("<u4")


class ReplicaError(ValueError):
    """A member sent a diff that cannot be applied here (the message says why): the driver
    drops that member, as for any protocol error."""


@dataclass(frozen=True, slots=True, eq=False)
class _Recent:
    stamp: Stamp
    starts: I64
    ends: I64
    at: float


@dataclass(slots=True)
class _Staging:
    diff_seq: int
    clock: int
    flags: int
    next_part: int = 0
    parts: list[Runs] = field(default_factory=list)
    bytes: int = 0


@dataclass(slots=True)
class _Held(Generic[T]):
    #: origin -> (diff count, the origin's epoch when the requirement was received)
    requirement: dict[str, tuple[int, int]]
    item: T
    since: float


def encode_runs(runs: Runs) -> tuple[bytes, bytes, bytes]:
    """``(offsets, lengths, data)`` as a :class:`~.schema.Diff` carries them."""
    return (
        runs.offsets.astype(_LE_U64).tobytes(),
        runs.lengths.astype(_LE_U32).tobytes(),
        runs.data.tobytes(),
    )


def decode_runs(frame: Diff, size: int) -> Runs:
    """The runs of ``frame``, checked against a region of ``size`` bytes."""
    offsets = np.frombuffer(frame.offsets, dtype=_LE_U64).astype(np.int64)
    lengths = np.frombuffer(frame.lengths, dtype=_LE_U32).astype(np.int64)
    if offsets.shape[0]:
        ends = offsets + lengths
        if int(offsets.min()) < 0 or int(ends.max()) > size:
            raise ReplicaError(f"a diff writes past the region's {size} bytes")
        if (lengths == 0).any() or (offsets[1:] < ends[:-1]).any():
            raise ReplicaError("a diff's runs are empty, unordered or overlapping")
    return Runs(offsets, lengths, np.frombuffer(frame.data, dtype=np.uint8))


class Replica(Generic[T]):
    """This host's replication state (see the module docstring). ``T`` is what the driver
    holds behind a ring's dependencies (its deliveries)."""

    def __init__(self, identity: str, twin: Twin, *, holder: bool) -> None:
        self.identity = identity
        self.twin = twin
        self.size = int(twin.region.shape[0])
        #: this host holds the region (started the federation, or received a transfer)
        self.holder = holder
        #: the member whose transfer made this host a holder (see :meth:`region`)
        self.received_from: str | None = None
        #: the Lamport clock
        self.clock = 0
        #: diffs this host originated
        self.seq = 0
        #: member -> the count of its diffs applied here
        self.applied: dict[str, int] = {}
        #: members whose streams to us are up (a gone one holds nothing up)
        self.live: set[str] = set()
        #: diffs applied or sent lately, to resolve concurrent writes to the same bytes
        self.recent: deque[_Recent] = deque()
        #: the greatest stamp ever remembered (a diff stamped above it has nothing later)
        self._newest: Stamp = (0, "")
        self._staging: dict[str, _Staging] = {}
        self._required: dict[str, dict[str, tuple[int, int]]] = {}
        #: member -> how many times its stream stopped (a requirement from an older epoch
        #: names diffs that will never come: a restarted member counts from 1 again)
        self._epoch: dict[str, int] = {}
        self._held: dict[str, deque[_Held[T]]] = {}
        self._sent_after: dict[str, dict[str, int]] = {}
        #: host-local byte ranges ``(start, end)``: never sent, never overwritten
        self.local: list[tuple[int, int]] = []
        #: counters for the control plane
        self.stats = {
            "diffs_sent": 0, "bytes_sent": 0, "diffs_applied": 0, "bytes_applied": 0,
            "bytes_kept": 0, "regions_sent": 0, "regions_applied": 0, "rings_held": 0,
            "rings_expired": 0,
        }  # fmt: skip

    def add_local(self, offset: int, length: int) -> None:
        """Keep ``[offset, offset + length)`` host-local from now on (a peer's software,
        such as our peers' directory, relies on this host's kernel for it)."""
        if not 0 <= offset < offset + length <= self.size:
            raise ValueError(f"local range {offset}+{length} is outside the region")
        self.local.append((offset, offset + length))
        self.local.sort()

    # -- the origin's side -------------------------------------------------------------------

    def flush(self, pages: I64 | None, now: float) -> list[Diff]:
        """This host's changes since the last flush, as the parts of one diff to send to
        every member (none if nothing changed). ``pages``: the pages to look at (logged by
        their writers), or None to scan the whole region."""
        twin = self.twin
        for start, end in self.local:  # never a diff: the twin follows the region there
            twin.copy[start:end] = twin.region[start:end]
        if pages is None:
            pages = twin.changed_pages()
        runs = twin.collect(pages)
        if not len(runs):
            return []
        self.clock += 1
        self.seq += 1
        self._remember((self.clock, self.identity), runs, now)
        self.stats["diffs_sent"] += 1
        self.stats["bytes_sent"] += runs.nbytes
        return self._frames(runs, self.seq, 0, ())

    def region(self, requester: str) -> list[Diff]:
        """The whole region as a transfer for ``requester`` (flush first, so that this
        host's changes reach everyone as a diff, not only the one member that asked)."""
        vector = ((self.identity, self.seq), *sorted(self.applied.items()))
        if not self.holder or (self.received_from == requester and self.seq == 0):
            # nothing to give: no region yet, or only the one ``requester`` gave us (a
            # joiner asked back by the member it joined)
            empty = encode_runs(Runs.empty())
            return [Diff(self.seq, self.clock, Diff.REGION | Diff.NOT_HOLDER, 0, True, *empty, ())]
        self.stats["regions_sent"] += 1
        runs = self.twin.pages_of(0, self.twin.npages)
        if self.local:
            runs = _without(runs, self.local)
        return self._frames(runs, self.seq, Diff.REGION, vector)

    def _frames(
        self, runs: Runs, diff_seq: int, flags: int, vector: tuple[tuple[str, int], ...]
    ) -> list[Diff]:
        pieces = runs.split(DIFF_PART_BYTES)
        last = len(pieces) - 1
        return [
            Diff(
                diff_seq,
                self.clock,
                flags,
                index,
                index == last,
                *encode_runs(piece),
                vector if index == last else (),
            )
            for index, piece in enumerate(pieces)
        ]

    def after_for(self, target: str) -> After | None:
        """What a ring to ``target``'s host must wait for, if that changed since the last
        :class:`~.schema.After` sent to it (None: nothing new)."""
        deps = {m: s for m, s in self.applied.items() if m != target and s > 0}
        sent = self._sent_after.get(target)
        if sent is not None and all(sent.get(m, 0) >= s for m, s in deps.items()):
            return None
        self._sent_after[target] = deps
        return After(tuple(sorted(deps.items())))

    # -- the receiver's side -----------------------------------------------------------------

    def receive(self, member: str, frame: Diff, now: float) -> list[T]:
        """A diff part from ``member``; once its last part is in, the diff is applied.
        Returns the held items it releases. :class:`ReplicaError` if it cannot be applied."""
        staging = self._staging.get(member)
        if frame.part == 0:
            if staging is not None:
                raise ReplicaError(
                    f"diff {frame.diff_seq} began before diff {staging.diff_seq} ended"
                )
            staging = _Staging(frame.diff_seq, frame.clock, frame.flags)
            self._staging[member] = staging
        elif staging is None or (frame.part, frame.diff_seq, frame.flags) != (
            staging.next_part,
            staging.diff_seq,
            staging.flags,
        ):
            self._staging.pop(member, None)
            raise ReplicaError(f"diff {frame.diff_seq} part {frame.part} out of order")
        runs = decode_runs(frame, self.size)
        staging.bytes += runs.nbytes + len(runs)
        if staging.bytes > 2 * self.size + (1 << 20):
            self._staging.pop(member, None)
            raise ReplicaError(f"diff {frame.diff_seq} carries more than twice the region")
        staging.parts.append(runs)
        staging.next_part += 1
        if not frame.last:
            return []
        del self._staging[member]
        ours: Stamp = (self.clock, self.identity)
        self.clock = max(self.clock, frame.clock)
        if frame.flags & Diff.REGION:
            self._apply_region(member, staging, frame.vector, ours)
        else:
            self._apply_diff(member, staging, now)
        return self._release()

    def _apply_diff(self, member: str, staging: _Staging, now: float) -> None:
        if staging.diff_seq <= self.applied.get(member, 0):
            return  # a region transfer brought it already
        runs = _join(staging.parts)
        stamp = (staging.clock, member)
        self._write(runs, stamp)
        self._remember(stamp, runs, now)
        self.applied[member] = staging.diff_seq
        self.stats["diffs_applied"] += 1

    def _apply_region(
        self,
        member: str,
        staging: _Staging,
        vector: tuple[tuple[str, int], ...],
        ours: Stamp,
    ) -> None:
        """A whole region: written here if its stamp is greater than this host's own (the
        region a joiner needs; after a partition, the side whose clock is ahead wins every
        byte the sides hold differently, so both converge), else only counted."""
        if staging.flags & Diff.NOT_HOLDER:
            return
        if not self.holder or (staging.clock, member) > ours:
            self._write(_join(staging.parts), (staging.clock, member))
        else:
            log.info(
                "federation: the region from %s is older than this host's (clock %d < %d): "
                "kept ours; it takes ours",
                member, staging.clock, ours[0],
            )  # fmt: skip
        for origin, count in vector:
            if origin != self.identity and count > self.applied.get(origin, 0):
                self.applied[origin] = count
        self.stats["regions_applied"] += 1
        if not self.holder:
            log.info("federation: the region from %s is in; this daemon holds it now", member)
            self.received_from = member
        self.holder = True

    def _write(self, runs: Runs, stamp: Stamp) -> None:
        """Write ``runs`` here, but not over a byte this host has not shipped yet, nor over
        one a diff with a greater stamp wrote."""
        if stamp > self._newest:  # the usual case: nothing remembered is later
            later = []
        else:
            later = [(e.starts, e.ends) for e in self.recent if e.stamp > stamp]
        if self.local:  # host-local ranges are never written by others
            starts, ends = zip(*self.local, strict=True)
            later.append((np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)))
        written, kept = self.twin.merge(runs, later)
        self.stats["bytes_kept"] += kept
        self.stats["bytes_applied"] += written

    def _remember(self, stamp: Stamp, runs: Runs, now: float) -> None:
        recent = self.recent
        while recent and (now - recent[0].at > RECENT_WINDOW or len(recent) >= RECENT_MAX):
            recent.popleft()
        recent.append(_Recent(stamp, runs.offsets, runs.offsets + runs.lengths, now))
        self._newest = max(self._newest, stamp)

    # -- rings and what they wait for --------------------------------------------------------

    def after(self, member: str, frame: After) -> None:
        """``member``'s next rings wait for these diff counts."""
        required = self._required.setdefault(member, {})
        epoch = self._epoch
        for origin, count in frame.deps:
            if origin == self.identity:
                continue
            now_epoch = epoch.get(origin, 0)
            had = required.get(origin)
            if had is None or had[1] != now_epoch or count > had[0]:
                required[origin] = (count, now_epoch)

    def admit(self, member: str, item: T, now: float = 0.0) -> bool:
        """True if a ring from ``member`` may be delivered now; else it is held (in order,
        behind any other held ring of ``member``) and comes back from a later call."""
        held = self._held.get(member)
        required = self._required.get(member)
        if not held and (not required or self._satisfied(required)):
            return True
        self._held.setdefault(member, deque()).append(_Held(dict(required or {}), item, now))
        self.stats["rings_held"] += 1
        return False

    def _satisfied(self, required: dict[str, tuple[int, int]]) -> bool:
        applied, live, epoch = self.applied, self.live, self._epoch
        return all(
            applied.get(m, 0) >= count or m not in live or epoch.get(m, 0) != seen
            for m, (count, seen) in required.items()
        )

    def _release(self) -> list[T]:
        out: list[T] = []
        for held in self._held.values():
            while held and self._satisfied(held[0].requirement):
                out.append(held.popleft().item)
        return out

    def expire(self, now: float, max_wait: float) -> list[T]:
        """Rings held longer than ``max_wait`` seconds, delivered anyway (a diff they wait
        for is not coming: its member restarted or was cut off); logged."""
        out: list[T] = []
        for member, held in self._held.items():
            late = 0
            while held and now - held[0].since > max_wait:
                out.append(held.popleft().item)
                late += 1
                while held and self._satisfied(held[0].requirement):
                    out.append(held.popleft().item)
            if late:
                log.warning(
                    "federation: %d rings from %s waited %.1f s for other hosts' diffs that "
                    "did not come; delivered without them", late, member, max_wait,
                )  # fmt: skip
        self.stats["rings_expired"] += len(out)
        return out

    def member_up(self, member: str) -> None:
        """``member``'s stream to us runs (a new session: what we told it before is gone)."""
        self.live.add(member)
        self._sent_after.pop(member, None)

    def member_gone(self, member: str) -> list[T]:
        """``member``'s stream stopped (dead, left, restarted, broken): its half-received
        diff is dropped (never applied), nothing waits for its diffs any more, and its diff
        count starts again (a restarted member counts from 1; a returning one sends its
        region, which sets the count). Returns the held rings that releases."""
        self.live.discard(member)
        self._epoch[member] = self._epoch.get(member, 0) + 1
        self.applied.pop(member, None)
        self._staging.pop(member, None)
        self._required.pop(member, None)
        self._sent_after.pop(member, None)
        return self._release()

    def held(self) -> int:
        """Rings held now."""
        return sum(len(queue) for queue in self._held.values())


def _without(runs: Runs, ranges: list[tuple[int, int]]) -> Runs:
    """One run (a region transfer) minus the sorted ``ranges`` ``(start, end)``: a few
    runs, cut by arithmetic (never an index per byte: a region may be gigabytes)."""
    if len(runs) != 1:
        raise ValueError("_without cuts a single run")
    lo = int(runs.offsets[0])
    hi = lo + int(runs.lengths[0])
    kept: list[tuple[int, int]] = []
    cursor = lo
    for start, end in ranges:
        if end <= cursor or start >= hi:
            continue
        if start > cursor:
            kept.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < hi:
        kept.append((cursor, hi))
    if not kept:
        return Runs.empty()
    data = runs.data
    return Runs(
        np.array([a for a, _ in kept], dtype=np.int64),
        np.array([b - a for a, b in kept], dtype=np.int64),
        np.concatenate([data[a - lo : b - lo] for a, b in kept]),
    )


def _join(parts: Iterable[Runs]) -> Runs:
    pieces = list(parts)
    if len(pieces) == 1:
        return pieces[0]
    return Runs(
        np.concatenate([p.offsets for p in pieces]),
        np.concatenate([p.lengths for p in pieces]),
        np.concatenate([p.data for p in pieces]),
    )
