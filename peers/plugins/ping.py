"""``ping``: two peers play doorbell ping-pong through the device registers.

Peers pair up through the shared-memory directory (``guest.find_partner``): any two ``ping``
peers of a daemon, whatever their ids, and each peer in one pair only; an odd one says it
waits for a partner. The peer that waited serves: it rings its partner's vector 0 through
the Doorbell register and waits for the partner to ring back, ``--count`` times after
``--warmup`` unmeasured rounds, then prints ``ping: N round trips, p50 X us, p99 Y us``. The
other side rings back on every interrupt, finishes after the same number of rounds and
prints ``ping: answered N rings from peer P``. ``--partner ID`` plays with that peer
instead (no directory; the lower id serves), e.g. a peer that is not a ``ping`` peer.
``--write BYTES`` writes that many bytes into the pair's own region (through the vCPU)
before every ring: the data a doorbell publishes, for measuring what that costs (a memory
log's report, :mod:`peers.bench_memlog`).
"""

from __future__ import annotations

import argparse
import time

from ivshmemd.protocol import MAX_PEER_ID

from ..plugin import Guest, Pair, Plugin

#: The serving side reports its progress every this many round trips (a power of two).
PROGRESS_EVERY = 1024


def percentile(sorted_values: list[int], fraction: float) -> int:
    """The value at ``fraction`` of a sorted list (nearest rank, as the C reference does)."""
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


class PingPlugin(Plugin):
    """Doorbell ping-pong between two peers; reports round-trip latency."""

    name = "ping"
    description = "doorbell ping-pong between pairs of peers; prints round-trip p50/p99"
    prefers_fast_path = True
    pairing = True

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--count",
            type=int,
            default=10_000,
            metavar="N",
            help="measured round trips (default 10000)",
        )
        group.add_argument(
            "--warmup",
            type=int,
            default=200,
            metavar="N",
            help="unmeasured round trips first (default 200)",
        )
        group.add_argument(
            "--write",
            type=int,
            default=0,
            metavar="BYTES",
            help="bytes written into the pair's region before every ring (default 0)",
        )
        group.add_argument(
            "--partner",
            type=int,
            default=None,
            metavar="ID",
            help="the peer to play with, instead of a ping peer found through the "
            "shared-memory directory",
        )

    @classmethod
    def check_options(cls, options: argparse.Namespace) -> str | None:
        if options.count < 1:
            return f"--count must be at least 1, got {options.count}"
        if options.warmup < 0:
            return f"--warmup must not be negative, got {options.warmup}"
        if options.partner is not None and not 0 <= options.partner <= MAX_PEER_ID:
            return f"--partner must be a peer id 0..{MAX_PEER_ID}, got {options.partner}"
        if options.write < 0:
            return f"--write must not be negative, got {options.write}"
        if options.write and options.partner is not None:
            return "--write needs a pair's region: pair through the directory (no --partner)"
        return None

    @classmethod
    def pairs(cls, options: argparse.Namespace) -> bool:
        return options.partner is None

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        self.rounds = self.options.warmup + self.options.count
        self.done_rounds = 0
        self.samples: list[int] = []
        self.t0 = 0
        self.reply_owed = False
        self.partner = -1
        self.serving = False
        #: what is written before every ring, and where (the pair's region)
        self.payload = bytes(self.options.write)
        self.data_gpa = guest.shm_gpa
        me = guest.peer_id
        if self.options.partner is None:
            guest.find_partner(size=self.options.write)
            return
        if self.options.partner == me:
            guest.fail(f"ping: peer {me} cannot play with itself")
            return
        self._play(self.options.partner, serving=me < self.options.partner)
        if self.serving and self.partner in guest.peers():
            self._serve()

    def paired(self, pair: Pair) -> None:
        if pair.region is not None:
            self.data_gpa += pair.region.offset
        self._play(pair.partner, serving=pair.leader)
        if self.serving:
            self._serve()

    def _play(self, partner: int, *, serving: bool) -> None:
        assert self.guest is not None
        self.partner, self.serving = partner, serving
        role = "serving" if serving else "answering"
        self.guest.log(f"ping: {role} peer {partner}")
        self.guest.waiting(f"answers from peer {partner}" if serving else f"peer {partner} to ring")

    def _ring(self) -> None:
        """Ring the partner, after writing the payload (if any) through the vCPU."""
        guest = self.guest
        assert guest is not None
        if self.payload:
            guest.vcpu.write(self.data_gpa, self.payload)
        guest.ring(self.partner, 0)

    def _serve(self) -> None:
        self.t0 = time.perf_counter_ns()
        self._ring()

    def peer_joined(self, peer_id: int) -> None:
        if peer_id != self.partner or self.guest is None or self.options.partner is None:
            return
        if self.serving and self.done_rounds == 0 and not self.t0:
            self._serve()
        elif self.reply_owed:
            self.reply_owed = False
            self._ring()

    def peer_left(self, peer_id: int) -> None:
        if peer_id == self.partner and self.guest is not None:
            self.guest.fail(
                f"ping: partner {peer_id} left after {self.done_rounds} of {self.rounds} rounds"
            )

    def interrupt(self, vector: int) -> None:
        now = time.perf_counter_ns()
        guest = self.guest
        assert guest is not None
        self.done_rounds += 1
        if self.serving:
            if self.done_rounds > self.options.warmup:
                self.samples.append(now - self.t0)
            if self.done_rounds >= self.rounds:
                guest.finish(self.summary())
                return
            if not self.done_rounds % PROGRESS_EVERY:
                guest.progress(self.done_rounds, self.rounds, "round trips")
            self.t0 = time.perf_counter_ns()
            self._ring()
        else:
            if guest.device.connected_vectors(self.partner):
                self._ring()
            else:  # its join notice is not processed yet: answer once it is
                self.reply_owed = True
            if self.done_rounds >= self.rounds:
                guest.finish(
                    f"ping: answered {self.done_rounds} rings from peer {self.partner} "
                    f"({self.options.count} measured, {self.options.warmup} warm-up)"
                )

    def summary(self) -> str:
        """The result line."""
        ordered = sorted(self.samples)
        p50 = percentile(ordered, 0.50) / 1000
        p99 = percentile(ordered, 0.99) / 1000
        return f"ping: {len(ordered)} round trips, p50 {p50:.2f} us, p99 {p99:.2f} us"
