"""``doorbell-probe``: a test-only plugin that rings every (peer, vector) pair, one at a time.

Registered through ``ivshmem_test_plugins-0.1.dist-info/entry_points.txt`` next to this file,
so a peer whose PYTHONPATH holds this directory finds it (nothing in the project knows it).

A *round* is an Eulerian circuit of the complete directed multigraph on the round's peer
ids with one edge per (source, target, vector): every peer rings every other peer on every
vector exactly once, and the target of each ring is the source of the next, so exactly one
ring is in flight at a time. Before ringing, the source writes a mailbox in the shared
memory (through its vCPU): round, step, source, target, vector. An interrupt does not say
who rang, so the receiver reads the mailbox and reports
``{"event": "irq", "vector": <where it arrived>, "expected_vector": ..., "target": ...,
"source": ..., "round": ..., "step": ...}``; a test checks that each arrived exactly at its
target and vector, once. Then the receiver rings the next step.

* Round 0 starts once the lowest id sees ``--expect`` peers (itself included); it writes the
  round's sorted ids into a header in the shared memory, which everyone reads.
* With ``--rerun-on-leave``, when a peer leaves, every survivor reports its device peer
  table (``{"event": "peer-table", "left": id, "peers": [...]}``); the lowest survivor rings
  the departed peer on every vector (the device must ignore it; reported as
  ``rang-departed``) and starts the next round over the survivors.
* The receiver of a round's last step reports ``round-done``.
* ``--fail-id ID`` makes the peer with that id fail at start (to test failure reporting).

A ring whose target is not in the device's peer table yet (its join notice not processed)
is held until the join arrives, since the device drops doorbells to unknown peers.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Sequence

from peers.plugin import Guest, Plugin

HEADER_OFFSET = 0  # u32 round, u32 count, u32 ids[count]
MAILBOX_OFFSET = 4096  # u32 round, step, source, target, vector
MAX_IDS = 512
_MAILBOX = struct.Struct("<5I")
_HEADER = struct.Struct("<2I")

Edge = tuple[int, int, int]  # source, target, vector


def circuit(ids: Sequence[int], vectors: int) -> list[Edge]:
    """An Eulerian circuit over every (source, target, vector), source != target, starting
    and ending at ``ids[0]`` (Hierholzer's algorithm; deterministic for given inputs)."""
    ordered = list(ids)
    if len(ordered) < 2 or vectors < 1:
        return []
    pending = {s: [(t, v) for v in range(vectors) for t in ordered if t != s] for s in ordered}
    stack: list[tuple[int, Edge | None]] = [(ordered[0], None)]
    edges: list[Edge] = []
    while stack:
        vertex, via = stack[-1]
        if pending[vertex]:
            target, vector = pending[vertex].pop()
            stack.append((target, (vertex, target, vector)))
        else:
            stack.pop()
            if via is not None:
                edges.append(via)
    edges.reverse()
    return edges


class DoorbellProbe(Plugin):
    """Rings every (peer, vector) pair in a circuit and reports each interrupt's origin."""

    name = "doorbell-probe"
    description = "test-only: ring every peer on every vector, report where each irq arrived"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--expect",
            type=int,
            required=True,
            metavar="N",
            help="start round 0 once N peers (this one included) are present",
        )
        group.add_argument(
            "--rerun-on-leave",
            action="store_true",
            help="when a peer leaves, ring it, then run a round over the rest",
        )
        group.add_argument("--fail-id", type=int, default=None, metavar="ID",
                           help="the peer with this id fails at start")  # fmt: skip

    @classmethod
    def check_options(cls, options: argparse.Namespace) -> str | None:
        if not 1 <= options.expect <= MAX_IDS:
            return f"--expect must be 1..{MAX_IDS}, got {options.expect}"
        return None

    def start(self, guest: Guest) -> None:
        super().start(guest)
        self.me = guest.peer_id
        # set before anything can fail: the runtime may deliver a join while it exits
        self.handled: set[tuple[int, int]] = set()
        self.schedules: dict[int, list[Edge]] = {}
        self.owed: tuple[int, int] | None = None  # (round, step) waiting for its target
        self.started_round0 = False
        self.failed = self.options.fail_id == self.me  # then it does nothing more
        if self.failed:
            guest.fail(f"probe: peer {self.me} fails on purpose")
            return
        guest.enable_msix()
        guest.report(event="probe-ready", peer_id=self.me, vectors=guest.vectors)
        self._maybe_start_round0()

    # -- shared memory, through the vCPU ---------------------------------------------------

    def _read_header(self) -> tuple[int, list[int]]:
        assert self.guest is not None
        round_, count = _HEADER.unpack(self.guest.read_shm(HEADER_OFFSET, _HEADER.size))
        raw = self.guest.read_shm(HEADER_OFFSET + _HEADER.size, 4 * count)
        return round_, list(struct.unpack(f"<{count}I", raw))

    def _schedule(self, round_: int) -> list[Edge]:
        if round_ not in self.schedules:
            header_round, ids = self._read_header()
            if header_round != round_:
                return []
            self.schedules[round_] = circuit(ids, self._vectors())
        return self.schedules[round_]

    def _vectors(self) -> int:
        assert self.guest is not None
        return int(self.guest.vectors)

    # -- rounds ------------------------------------------------------------------------------

    def _maybe_start_round0(self) -> None:
        assert self.guest is not None
        present = sorted(self.guest.peers())
        if self.started_round0 or len(present) < self.options.expect:
            return
        if self.me != present[0]:
            return
        self.started_round0 = True
        self._start_round(0, present)

    def _start_round(self, round_: int, ids: list[int]) -> None:
        assert self.guest is not None
        header = _HEADER.pack(round_, len(ids)) + struct.pack(f"<{len(ids)}I", *ids)
        self.guest.write_shm(HEADER_OFFSET, header)
        schedule = circuit(ids, self._vectors())
        self.schedules[round_] = schedule
        self.guest.report(event="round-start", round=round_, peers=ids, steps=len(schedule))
        if schedule:
            self._send(round_, 0)
        else:
            self.guest.report(event="round-done", round=round_)

    def _send(self, round_: int, step: int) -> None:
        guest = self.guest
        assert guest is not None
        source, target, vector = self.schedules[round_][step]
        assert source == self.me, (round_, step, source, self.me)
        if vector >= guest.peers().get(target, 0):
            self.owed = (round_, step)  # its join notice has not been processed yet
            return
        guest.write_shm(MAILBOX_OFFSET, _MAILBOX.pack(round_, step, source, target, vector))
        guest.ring(target, vector)

    # -- hooks -------------------------------------------------------------------------------

    def interrupt(self, vector: int) -> None:
        guest = self.guest
        assert guest is not None
        round_, step, source, target, expected = _MAILBOX.unpack(
            guest.read_shm(MAILBOX_OFFSET, _MAILBOX.size)
        )
        repeat = (round_, step) in self.handled
        guest.report(event="irq", vector=vector, expected_vector=expected, target=target,
                     source=source, round=round_, step=step, me=self.me,
                     repeat=repeat)  # fmt: skip
        if repeat or target != self.me or expected != vector:
            return
        self.handled.add((round_, step))
        schedule = self._schedule(round_)
        if step + 1 < len(schedule):
            self._send(round_, step + 1)
        else:
            guest.report(event="round-done", round=round_)

    def peer_joined(self, peer_id: int) -> None:
        if self.failed:
            return
        if self.owed is not None:
            owed, self.owed = self.owed, None
            self._send(*owed)
        self._maybe_start_round0()

    def peer_left(self, peer_id: int) -> None:
        guest = self.guest
        assert guest is not None
        if self.failed:
            return
        present = sorted(guest.peers())
        guest.report(event="peer-table", left=peer_id, peers=present)
        if not self.options.rerun_on_leave or self.me != present[0]:
            return
        for vector in range(self._vectors()):
            guest.ring(peer_id, vector)  # gone from the table: the device ignores it
        guest.report(event="rang-departed", peer_id=peer_id, vectors=self._vectors())
        last_round, _ids = self._read_header()
        self._start_round(last_round + 1, present)
