"""A reference model of the federation's memory guarantee (issue 13), for checking a run.

The model sees what the programs on each host do — writes, rings sent, rings received —
and, when it is told, the stamp each host's diff shipped its writes with. It never looks at
how the daemons replicate; it says what each host's memory may hold.

**Events and causality.** Each host is one sequential program (its local peers share one
memory, so their accesses are ordered as the test makes them). Its events are writes, ring
sends and ring deliveries (a rung peer seeing its interrupt). *Happened-before* (→) is the
smallest transitive relation containing program order on each host and, for every ring, its
send → its delivery. Vector clocks compute it: ``x → y`` iff ``x.clock[x.host] <=
y.clock[x.host]`` (x ≠ y). Two writes neither before the other are *concurrent* (∥).

**Writes are observable.** Each write fills its bytes with its own *tag* (1..255, unique in
a run; 0 is the initial value), so a byte's value names the write it came from, and no write
is invisible for writing what a byte held already.

**Stamps.** A host ships its writes in diffs; each diff has a stamp ``(clock, host
identity)``; every write of a host not yet shipped takes the stamp of its host's next diff
(:meth:`Model.flushed`). The daemons' rule: causally ordered writes have increasing stamps
(checked: if ``x → y`` on different hosts or in different diffs, ``stamp(x) < stamp(y)``),
and of concurrent writes to a byte the greater stamp wins. Where the stamps are not
observable (real daemons), the model accepts any of the concurrent writes.

**At a ring's delivery** on host ``g``, let ``P`` be the causal past of the ring's send and,
for each byte ``b``, ``M(b)`` the maximal writes to ``b`` in ``P``. The byte's value on ``g``
must come from a write ``w`` to ``b`` (0 only if ``M(b)`` is empty) such that, for every
``m`` in ``M(b)``: ``w = m``, or ``m → w`` (overwritten by a causally later write), or
``w ∥ m`` and ``stamp(w) > stamp(m)`` (overwritten by a concurrent write that wins). A ``w``
written on ``g`` and not shipped yet has no stamp: the condition is checked when it gets one
(it must, for the byte to be kept).

**At quiescence** (every frame delivered and every host flushed), every host holds the same
bytes, and each byte holds the write with the greatest stamp among the maximal writes to it
(with stamps unknown: one of the maximal writes), 0 if none wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_WRITES", "Model", "Ring", "Write"]

U8 = npt.NDArray[np.uint8]
Stamp = tuple[int, str]

#: tags are bytes, 0 the initial value
MAX_WRITES = 255


@dataclass(eq=False)
class Write:
    tag: int
    host: int
    start: int
    stop: int
    clock: tuple[int, ...]
    stamp: Stamp | None = None
    #: which of its host's diffs shipped it (writes of one diff share a stamp)
    diff: int | None = None

    def __repr__(self) -> str:
        stamp = "" if self.stamp is None else f" (stamp {self.stamp})"
        return f"write {self.tag} on host {self.host} of [{self.start}, {self.stop}){stamp}"


@dataclass(frozen=True)
class Ring:
    """A ring sent: its sender and the causal past of its send."""

    number: int
    source: int
    target: int
    past: tuple[int, ...]


@dataclass
class Model:
    """The guarantee over ``hosts`` hosts and the bytes ``[0, size)`` (see the module
    docstring). ``stamps``: the stamps are observed (:meth:`flushed` is called)."""

    hosts: int
    size: int
    stamps: bool = True
    writes: list[Write] = field(default_factory=list)
    rings: int = 0
    #: (w, m): stamp(w) must end up greater than stamp(m)
    obligations: list[tuple[Write, Write]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clocks = [[0] * self.hosts for _ in range(self.hosts)]
        self.diffs = [0] * self.hosts

    # -- events ----------------------------------------------------------------------------

    def write(self, host: int, start: int, stop: int) -> int:
        """Host ``host`` writes ``[start, stop)``; the tag to fill it with."""
        if len(self.writes) >= MAX_WRITES:
            raise ValueError("a run of the model holds at most 255 writes")
        if not 0 <= start < stop <= self.size:
            raise ValueError(f"[{start}, {stop}) is not in the model's {self.size} bytes")
        clock = self._tick(host)
        write = Write(len(self.writes) + 1, host, start, stop, clock)
        self.writes.append(write)
        return write.tag

    def send(self, source: int, target: int) -> Ring:
        """Host ``source`` rings a peer on host ``target``."""
        self.rings += 1
        return Ring(self.rings, source, target, self._tick(source))

    def delivered(self, ring: Ring, region: U8) -> list[str]:
        """``ring`` is delivered on its target, whose memory is ``region`` (the model's
        bytes of it) at that moment: the problems found (also kept in :attr:`problems`)."""
        clock = self.clocks[ring.target]
        for host, count in enumerate(ring.past):
            clock[host] = max(clock[host], count)
        self._tick(ring.target)
        found: list[str] = []
        for lo, hi, cover in self._segments():
            past = [w for w in cover if w.clock[w.host] <= ring.past[w.host]]
            latest = _maximal(past)
            for value in np.unique(region[lo:hi]).tolist():
                problem = self._check_value(ring, lo, hi, value, cover, latest)
                if problem:
                    found.append(problem)
        self.problems += found
        return found

    def flushed(self, host: int, stamp: Stamp) -> list[str]:
        """Host ``host`` shipped a diff stamped ``stamp``: its unshipped writes take it."""
        self.diffs[host] += 1
        found: list[str] = []
        fresh = [w for w in self.writes if w.host == host and w.stamp is None]
        for write in fresh:
            write.stamp, write.diff = stamp, self.diffs[host]
        for write in fresh:
            for earlier in self.writes:
                same_diff = (earlier.host, earlier.diff) == (write.host, write.diff)
                if (
                    earlier.stamp is not None
                    and not same_diff
                    and _before(earlier, write)
                    and not earlier.stamp < stamp
                ):
                    found.append(f"{earlier} happened before {write}, yet its stamp is not less")
        for w, m in list(self.obligations):
            if w.stamp is not None:
                self.obligations.remove((w, m))
                assert m.stamp is not None
                if not w.stamp > m.stamp:
                    found.append(f"{w} was kept over the concurrent {m} and lost to it after")
        self.problems += found
        return found

    # -- the end ---------------------------------------------------------------------------

    def quiescent(self, regions: list[U8]) -> list[str]:
        """Every frame is delivered and every host flushed: check their memories."""
        found: list[str] = []
        for host, region in enumerate(regions[1:], 1):
            differ = np.flatnonzero(region != regions[0])
            if differ.shape[0]:
                b = int(differ[0])
                found.append(
                    f"hosts 0 and {host} differ at {differ.shape[0]} bytes, first at {b}: "
                    f"{regions[0][b]} and {region[b]}"
                )
        if self.stamps:
            unshipped = [w for w in self.writes if w.stamp is None]
            if unshipped:
                found.append(f"never shipped: {unshipped}")
            found += [f"{w} kept over {m}, never shipped" for w, m in self.obligations]
        for lo, hi, cover in self._segments():
            latest = _maximal(cover)
            if self.stamps and latest and all(w.stamp for w in latest):
                allowed = {max(latest, key=lambda w: w.stamp or (0, "")).tag}
            else:
                allowed = {w.tag for w in latest} or {0}
            for host, region in enumerate(regions):
                values = set(np.unique(region[lo:hi]).tolist())
                if not values <= allowed:
                    found.append(
                        f"host {host} holds {sorted(values)} in [{lo}, {hi}), written by "
                        f"{cover}: only {sorted(allowed)} may be there"
                    )
        self.problems += found
        return found

    # -- the rules -------------------------------------------------------------------------

    def _check_value(
        self, ring: Ring, lo: int, hi: int, value: int, cover: list[Write], latest: list[Write]
    ) -> str | None:
        where = f"ring {ring.number} from host {ring.source} to host {ring.target}: [{lo}, {hi})"
        if value == 0:
            if latest:
                return f"{where} holds the initial value; it should hold {latest}"
            return None
        w = self.writes[value - 1] if value <= len(self.writes) else None
        if w is None or w not in cover:
            return f"{where} holds {value}, which no write to these bytes wrote ({cover})"
        for m in latest:
            if w is m or _before(m, w):
                continue
            if _before(w, m):
                return f"{where} holds {w}, overwritten before the ring by {m}"
            if not self.stamps:
                continue  # concurrent: whichever wins, all hosts agree at quiescence
            if m.stamp is None:
                return f"{where}: {m} in the ring's past was not shipped before it"
            if w.stamp is None:
                if w.host != ring.target:
                    return f"{where} holds {w}, never shipped, from another host"
                self.obligations.append((w, m))
            elif not w.stamp > m.stamp:
                return f"{where} holds {w}, concurrent with {m} whose stamp is greater"
        return None

    def _segments(self) -> list[tuple[int, int, list[Write]]]:
        """The bytes cut where any write starts or stops: ``(lo, hi, writes covering it)``,
        writes in program order, initial-value stretches included (no write covers them)."""
        cuts = sorted(
            {0, self.size, *(w.start for w in self.writes), *(w.stop for w in self.writes)}
        )
        return [
            (lo, hi, [w for w in self.writes if w.start <= lo and hi <= w.stop])
            for lo, hi in pairwise(cuts)
        ]

    def _tick(self, host: int) -> tuple[int, ...]:
        self.clocks[host][host] += 1
        return tuple(self.clocks[host])


def _before(x: Write, y: Write) -> bool:
    """x happened before y."""
    return x is not y and x.clock[x.host] <= y.clock[x.host]


def _maximal(writes: list[Write]) -> list[Write]:
    return [w for w in writes if not any(_before(w, other) for other in writes)]
