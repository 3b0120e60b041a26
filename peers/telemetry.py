"""A peer's telemetry: what it counts on its hot paths, and how it reports when watched.

Doorbells go from peer to peer through eventfds, so only the peers can count them. Each of
our peers counts, always and cheaply:

* the doorbells it rings, per (destination, vector): one list-slot increment inside the
  route the device binds once per (peer, vector) (``partial(ring_eventfd, fd, counts,
  slot)``, :func:`peers.client.ring_eventfd`: no extra frame), a slot per pair;
* the interrupts it receives, per vector (one increment in the vector's handler);
* its plugin's own counters (``guest.count("messages", n)``);
* the pages it dirtied in the shared memory, per heatmap region, from a dirty tracker of
  the shm memslot (stage-2 write protection), harvested in bulk once per report
  (:class:`DirtyHeat`).

It reports only when someone watches: the control process publishes a *tick* on the
telemetry ticks socket while a watcher's lease is live (:mod:`ivshmemd.telemetryserve`), and
the peer's event loop, which polls that socket's fd with its eventfds, answers each tick
with one report (:class:`TelemetryLink`). Nobody watching: no tick, no report, no harvest,
and nothing on the doorbell path but the increments.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any, Final

import msgpack
import numpy as np
import zmq

from ivshmemd.telemetry import (
    HEATMAP_BUCKETS,
    MAX_COUNTER_NAME,
    MAX_COUNTERS,
    MAX_PAIRS,
    TICK_TOPIC,
    TelemetryEndpoints,
    encode_report,
    heatmap_bucket_bytes,
)

__all__ = ["DirtyHeat", "PeerCounters", "TelemetryLink"]

#: reports queued towards the control process before the newest are dropped
REPORT_HWM: Final = 4
#: how long a final report may take to leave when the peer stops
FINAL_LINGER_MS: Final = 500
PAGE_SIZE: Final = 4096


class PeerCounters:
    """The counters the hot paths increment, preallocated (no allocation per doorbell)."""

    def __init__(self, vectors: int) -> None:
        #: doorbells rung, one slot per (destination, vector) ever rung (a list: its
        #: ``+= 1`` is about half the cost of an ``array('Q')``'s, which converts both ways)
        self.rung: list[int] = []
        self._slots: dict[tuple[int, int], int] = {}
        #: interrupts received, per vector
        self.interrupts: list[int] = [0] * max(1, vectors)
        #: the plugin's own counters (``guest.count``)
        self.plugin: dict[str, int] = {}
        self.dropped_names = 0

    def slot(self, dst: int, vector: int) -> int:
        """The slot counting doorbells to ``(dst, vector)`` (made on first use, kept)."""
        key = (dst, vector)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= MAX_PAIRS:
                return self._overflow()
            slot = self._slots[key] = len(self.rung)
            self.rung.append(0)
        return slot

    def _overflow(self) -> int:
        """Past :data:`MAX_PAIRS` pairs, rings are counted in one slot that is not reported."""
        slot = self._slots.get((-1, -1))
        if slot is None:
            slot = self._slots[(-1, -1)] = len(self.rung)
            self.rung.append(0)
        return slot

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the plugin counter ``name`` (at most :data:`MAX_COUNTERS` names)."""
        plugin = self.plugin
        if name in plugin:
            plugin[name] += n
        elif len(plugin) < MAX_COUNTERS and len(name) <= MAX_COUNTER_NAME:
            plugin[name] = n
        else:
            self.dropped_names += 1

    def rung_list(self) -> list[list[int]]:
        """``[[dst, vector, total], ...]`` for every pair rung at least once."""
        rung = self.rung
        return [
            [dst, vector, rung[slot]]
            for (dst, vector), slot in self._slots.items()
            if dst >= 0 and rung[slot]
        ]


class DirtyHeat:
    """Pages dirtied in the shm memslot, per heatmap region, from a dirty tracker of its own
    (:meth:`vmm.vm.Vm.track_dirty`).

    The tracker starts on the first harvest (when someone first watches): from then on each
    harvest counts the pages written since the previous one. It is independent of the
    plugin's own dirty log (never turned on, read or cleared here), of the dirty rings and
    of the peer's memory reports (:mod:`peers.memreport`), which have trackers of their own."""

    def __init__(self, vm: Any, slot: int, shm_size: int) -> None:
        self.vm = vm
        self.slot = slot
        self.bucket_bytes = heatmap_bucket_bytes(shm_size)
        self.npages = shm_size // PAGE_SIZE
        self.pages_per_bucket = self.bucket_bytes // PAGE_SIZE
        nbuckets = min(HEATMAP_BUCKETS, -(-self.npages // self.pages_per_bucket))
        self.totals = np.zeros(nbuckets, dtype=np.uint64)
        self.tracker: Any = None
        self.usable = True

    def harvest(self) -> None:
        """Add the pages dirtied since the last harvest to :attr:`totals`."""
        if not self.usable:
            return
        from vmm.errors import VmmError  # the VM is loaded already

        if self.tracker is None:
            try:
                self.tracker = self.vm.track_dirty(self.slot)
            except VmmError:
                self.usable = False
            return
        if not self.tracker.pending:
            return
        words = self.tracker.harvest_words()
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.npages]
        per = self.pages_per_bucket
        whole = len(self.totals) * per
        if bits.shape[0] < whole:
            bits = np.concatenate([bits, np.zeros(whole - bits.shape[0], dtype=np.uint8)])
        self.totals += bits[:whole].reshape(-1, per).sum(axis=1, dtype=np.uint64)

    def close(self) -> None:
        """Stop tracking (the VM goes away)."""
        if self.tracker is not None:
            self.tracker.close()

    def report(self) -> dict[str, Any]:
        return {"bucket_bytes": self.bucket_bytes, "buckets": [int(v) for v in self.totals]}


class TelemetryLink:
    """The peer's two zmq sockets to the control process: a SUB for ticks (its fd goes in
    the event loop's poll set) and a DEALER that sends one report per tick (never waits:
    a report the control process cannot take now is dropped, and counted)."""

    def __init__(
        self,
        endpoints: TelemetryEndpoints,
        build_report: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build_report
        self._clock = clock
        #: watched until this monotonic time (the last tick said so)
        self.watched_until = 0.0
        self.sent = 0
        self.dropped = 0
        self._closed = False
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.dealer = self.ctx.socket(zmq.DEALER)
        try:
            self.sub.setsockopt(zmq.LINGER, 0)
            self.sub.setsockopt(zmq.RCVHWM, 4)
            self.sub.setsockopt(zmq.MAXMSGSIZE, 4096)
            self.sub.setsockopt(zmq.SUBSCRIBE, TICK_TOPIC)
            self.dealer.setsockopt(zmq.LINGER, 0)
            self.dealer.setsockopt(zmq.SNDHWM, REPORT_HWM)
            self.dealer.setsockopt(zmq.RCVHWM, 4)
            self.dealer.setsockopt(zmq.MAXMSGSIZE, 4096)
            self.sub.connect(endpoints.ticks)
            self.dealer.connect(endpoints.reports)
        except BaseException:
            self.close(final=False)
            raise
        self.fd = int(self.sub.getsockopt(zmq.FD))

    def on_readable(self) -> bool:
        """The ticks socket's fd is readable: take every tick waiting, answer with one
        report. Returns whether a report went out (an event loop's fd handler)."""
        sub = self.sub
        ticked = False
        while int(sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            interval = _tick_interval(frames)
            if interval is not None:
                ticked = True
                self.watched_until = self._clock() + 3 * interval
        if not ticked:
            return False
        return self.send_report()

    def send_report(self) -> bool:
        try:
            self.dealer.send(encode_report(self._build()), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self, final: bool = True) -> None:
        """Close both sockets; with ``final``, send a last report first, so that the counts
        of a peer that finishes are seen whole (one message in the peer's life, sent even
        if no tick came yet: a peer may finish before its first tick, watched or not)."""
        if self._closed:
            return
        self._closed = True
        linger = 0
        if final:
            with contextlib.suppress(zmq.ZMQError):
                if self.send_report():
                    linger = FINAL_LINGER_MS
        self.sub.close(linger=0)
        self.dealer.close(linger=linger)
        self.ctx.term()


def _tick_interval(frames: list[bytes]) -> float | None:
    if len(frames) != 2 or frames[0] != TICK_TOPIC:
        return None
    try:
        tick = msgpack.unpackb(frames[1], raw=False)
        interval = tick["interval"]
    except Exception:
        return None
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        return None
    return float(min(interval, 60.0))


def telemetry_identity(peer_id: int, plugin: str) -> dict[str, Any]:
    """The fixed part of every report: who we are."""
    return {"peer": peer_id, "pid": os.getpid(), "plugin": plugin[:64], "started": time.time()}
