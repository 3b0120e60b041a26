"""Benchmark of federated memory (issue 13): what replication costs (figures only, no asserts).

``python -m ivshmemd.federation.bench memory [--transport tcp|ipc ...] [--size BYTES]
[--ring BYTES] [--rounds R] [--per-round N] [--throughput-rounds R] [--seconds S]
[--flush S] [--timeout T] [--no-pin] [--json]``

Real daemons, as :mod:`ivshmemd.federation.bench_fabric` runs them (host A's processes
pinned to one CPU, host B's to the other; on each a raw ivshmem client in a blocking loop,
mapping its daemon's shm as a VM maps BAR2), twice over and at once:

- in the **dirty-log** fabric both clients also report the pages they write on
  ``SOCK.memlog`` (:mod:`ivshmemd.memlog`: a hello with their peer id, then the written
  pages before each ring), exactly as our peers do: the daemons diff only those pages;
- in the **scan** fabric they do not, as a QEMU VM does not: before relaying a ring, a
  daemon compares its whole region with its twin.

Rounds alternate between the two fabrics and raw pyzmq (a DEALER on A's client, a ROUTER on
B's, over the same transport), so that all see the same load; ratios are taken within a
round and their median is reported.

1. **Replication throughput.** A's client streams messages of 4 KiB, 64 KiB and 1 MiB to
   B's through a ring of ``--ring`` bytes of the shm (8 MiB: 2048 slots of 4 KiB, 8 of
   1 MiB): it writes each into the next slot, stamps it, (reports its pages,) rings B's
   client, and keeps at most a ring's worth of messages unacknowledged; B's
   client, on each interrupt, copies every message the count announces out of its shm,
   checks its stamps and acknowledges them with one ring back. MB/s against raw pyzmq
   streaming the same message sizes, DEALER to ROUTER, pipelined. A stamp that is wrong
   (data not replicated before the interrupt) stops the benchmark: it is a bug.
2. **Doorbell latency with N bytes written before it** (0, 4 KiB, 64 KiB, 1 MiB): A's
   client writes N bytes (every one changed), then rings B's, which checks the stamp and
   rings back; the time from the ring (the dirty-log path: from the report) to A's
   interrupt. p50/p99, and the ratio to the 0-byte case; raw pyzmq sending N bytes and a
   short answer, for reference. The region (``--size``, 64 MiB by default) is large enough
   for the scan to show.
3. **In process, on** :class:`~.twin.Twin` **and** :class:`~.replica.Replica`: the scan's
   cost per MiB of region (``changed_pages`` with nothing changed, and a flush that also
   collects a few changed pages), and a diff's cost per dirty page for k = 1..4096 pages
   (collect into frames, encode and decode them, apply), whole pages rewritten and one
   word per page.

``--json`` prints one JSON object instead of the human lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zmq

from ivshmemd.argtypes import positive_int, positive_size, seconds
from ivshmemd.exitcodes import EXIT_OK
from ivshmemd.memlog import encode_dirty, encode_hello, memlog_path
from ivshmemd.protocol import PeerLeft
from ivshmemd.sizes import round_shm_size

from .bench_fabric import (
    PING_VECTOR,
    WAIT,
    Host,
    RawPeer,
    add_peer_arguments,
    emit,
    fabric,
    federation_status,
    peer_argv,
    run_peer,
)
from .benchstats import percentile, two_cpus
from .replica import Replica
from .schema import Diff, decode_frame, encode_frame
from .twin import PAGE_SIZE, Twin

__all__ = ["main", "print_human", "run_memory"]

KIB: Final = 1024
MIB: Final = 1024 * 1024
#: bytes written before a ring, for the latency figure
LATENCY_SIZES: Final = (0, 4 * KIB, 64 * KIB, MIB)
#: message sizes, for the throughput figure
MESSAGE_SIZES: Final = (4 * KIB, 64 * KIB, MIB)
#: dirty pages per diff, for the per-page cost
DIRTY_PAGES: Final = (1, 4, 16, 64, 256, 1024, 4096)
#: pages changed for the "little changed" scan
FEW_PAGES: Final = 16
#: the two ways a client publishes its writes (a fabric each)
PATHS: Final = ("log", "scan")
#: round trips of each kind before measuring
WARMUP: Final = 20
#: messages queued at most in each raw zmq socket (bounded memory with 1 MiB messages)
ZMQ_HWM: Final = 64
_MODULE: Final = "ivshmemd.federation.bench_memory"
_STAMP: Final = 8

U8 = npt.NDArray[np.uint8]


def latency_base(region: int) -> int:
    """Where the latency writes go: the region's last MiB (throughput slots start at 0)."""
    return region - max(LATENCY_SIZES)


def _patterns(size: int, seed: int) -> tuple[U8, U8]:
    """Two contents of ``size`` bytes that differ in every byte (alternated, so that each
    write changes every byte it writes: a byte-exact diff ships all of them)."""
    first = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return first, ~first


# -- the two clients (children) ----------------------------------------------------------------


class _Memory:
    """A client's mapping of its daemon's shm and, once asked, its memory-log channel."""

    def __init__(self, peer: RawPeer, socket_path: str) -> None:
        if peer.shm_fd is None or peer.peer_id is None:
            raise SystemExit("bench peer: no shm from the daemon")
        self.size = os.fstat(peer.shm_fd).st_size
        self.map = mmap.mmap(peer.shm_fd, self.size, mmap.MAP_SHARED)
        self.bytes: U8 = np.frombuffer(self.map, dtype=np.uint8)
        self.words = np.frombuffer(self.map, dtype=np.uint64)
        self.peer_id = peer.peer_id
        self.socket_path = socket_path
        self.channel: socket.socket | None = None
        self._reports: dict[tuple[int, int], bytes] = {}

    def log(self) -> None:
        """(Re)open the memory-log channel and say who reports (as our peers do)."""
        if self.channel is not None:
            self.channel.close()
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        channel.connect(memlog_path(self.socket_path))
        channel.send(encode_hello(self.peer_id, PAGE_SIZE, self.size // PAGE_SIZE))
        self.channel = channel

    def report(self, offset: int, length: int) -> None:
        """Report the pages of ``length`` bytes written at ``offset`` before a ring (the
        vmm's harvest of the dirty log is not measured here: the report is made once per
        place and kept)."""
        if self.channel is None or length == 0:
            return
        packet = self._reports.get((offset, length))
        if packet is None:
            npages = self.size // PAGE_SIZE
            dirty = np.zeros(-(-npages // 64) * 64, dtype=bool)
            dirty[offset // PAGE_SIZE : -(-(offset + length) // PAGE_SIZE)] = True
            encoded = encode_dirty(np.packbits(dirty, bitorder="little").view("<u8"))
            assert encoded is not None
            packet = self._reports[(offset, length)] = encoded
        self.channel.send(packet)

    def stamp_at(self, offset: int) -> int:
        return int(self.words[offset // _STAMP])

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        del self.bytes, self.words
        self.map.close()


class _Rung:
    """Waits for a ring on our own eventfd, watching the daemon's socket meanwhile: if the
    peer we ring leaves (its daemon was declared dead: see the daemons' logs), no answer
    will come, and the measurement stops with one line instead of waiting forever."""

    def __init__(self, peer: RawPeer, own: int, target: int) -> None:
        self.peer, self.own, self.target = peer, own, target
        self.poller = select.poll()
        self.poller.register(own, select.POLLIN)
        self.poller.register(peer.sock.fileno(), select.POLLIN)

    def wait(self) -> int:
        """The count read from our eventfd."""
        while True:
            try:
                return os.eventfd_read(self.own)
            except BlockingIOError:
                pass
            for fd, _ in self.poller.poll():
                if fd == self.peer.sock.fileno():
                    event = self.peer.read_one()
                    if isinstance(event, PeerLeft) and event.peer_id == self.target:
                        raise SystemExit(
                            f"bench peer: peer {self.target} left in the middle of a "
                            "measurement (its daemon's link broke: see the daemons' logs)"
                        )


def _client(
    args: argparse.Namespace,
) -> tuple[RawPeer, int, _Memory, zmq.Context[zmq.Socket[bytes]]]:
    """A client of its daemon, once the other host's client is there: the client, the
    other's peer id, the client's view of the shm, and a zmq context for the raw side."""
    peer = RawPeer(args.socket)
    other = peer.wait_peer(*args.remote_ids)
    return peer, other, _Memory(peer, args.socket), zmq.Context()


def _ping(args: argparse.Namespace) -> None:
    """Host A's client: round trips, streams and raw zmq floods on request (JSON lines)."""
    peer, target, memory, context = _client(args)
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.sndhwm = ZMQ_HWM
    dealer.connect(args.zmq)
    own, out = peer.own[PING_VECTOR], peer.peers[target][PING_VECTOR]
    rung = _Rung(peer, own, target)
    patterns = _patterns(max(*MESSAGE_SIZES, *LATENCY_SIZES), seed=1)
    base = latency_base(memory.size)
    stamp = message = 0  # the last latency stamp and the last message, for B's checks
    clock = time.perf_counter
    emit("ready", peer_id=peer.peer_id)
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "memlog":
            memory.log()
            emit("memlog", peer_id=memory.peer_id)
        elif cmd == "rtt":
            size, samples = request["bytes"], []
            if request["kind"] == "zmq":
                payload = b"e" + patterns[0][1:size].tobytes()
                for _ in range(request["n"]):
                    start = clock()
                    dealer.send(payload)
                    dealer.recv()
                    samples.append((clock() - start) * 1e6)
            else:
                for _ in range(request["n"]):
                    if size:
                        stamp += 1
                        memory.bytes[base : base + size] = patterns[stamp % 2][:size]
                        memory.words[(base + size - _STAMP) // _STAMP] = stamp
                    start = clock()
                    memory.report(base, size)
                    os.eventfd_write(out, 1)
                    rung.wait()
                    samples.append((clock() - start) * 1e6)
            emit("rtt", samples=samples)
        elif cmd == "produce":
            size, window = request["size"], request["window"]
            first = message
            inflight = 0
            start = clock()
            end = start + request["seconds"]
            while True:
                while inflight < window and clock() < end:
                    message += 1
                    slot = (message % window) * size
                    memory.bytes[slot : slot + size] = patterns[(message // window) % 2][:size]
                    memory.words[slot // _STAMP] = message
                    memory.words[(slot + size - _STAMP) // _STAMP] = message
                    memory.report(slot, size)
                    os.eventfd_write(out, 1)
                    inflight += 1
                if not inflight:
                    break
                inflight -= rung.wait()
            emit("produced", messages=message - first, elapsed=clock() - start)
        elif cmd == "zmq-flood":
            size = request["size"]
            payload = b"c" + patterns[0][1:size].tobytes()
            sent = 0
            start = clock()
            end = start + request["seconds"]
            while clock() < end:
                dealer.send(payload)
                sent += 1
            dealer.send(b"x")
            received = int(dealer.recv())
            emit("zmq-flooded", sent=sent, received=received, elapsed=clock() - start)
    memory.close()
    peer.close()
    dealer.close()
    context.term()


@dataclass(slots=True)
class _Checks:
    """What B's client checked, and what was wrong (the first few)."""

    checked: int = 0
    wrong: int = 0
    first_wrong: str = ""

    def check(self, what: str, got: int, expected: int) -> None:
        self.checked += 1
        if got != expected:
            self.wrong += 1
            if not self.first_wrong:
                self.first_wrong = f"{what}: stamp {got}, expected {expected}"


def _echo(args: argparse.Namespace) -> None:
    """Host B's client: rings A's back (checking the latency writes), consumes A's stream,
    counts and echoes raw zmq, all in one ``zmq.Poller``."""
    peer, source, memory, context = _client(args)
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvhwm = ZMQ_HWM
    router.bind(args.zmq)
    back, rung = peer.peers[source][PING_VECTOR], peer.own[PING_VECTOR]
    poller = zmq.Poller()
    for item in (router, rung, 0, peer.sock.fileno()):
        poller.register(item, zmq.POLLIN)
    base = latency_base(memory.size)
    mode: dict[str, Any] = {"mode": "rtt", "bytes": 0}
    checks = _Checks()
    stamp = message = 0
    counted = 0
    stdin = b""
    emit("ready", peer_id=peer.peer_id)
    while True:
        for item, _ in poller.poll():
            if item is router:
                while True:
                    try:
                        ident, body = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    tag = body[:1]
                    if tag == b"c":
                        counted += 1
                    elif tag == b"x":
                        router.send_multipart([ident, str(counted).encode()])
                        counted = 0
                    else:
                        router.send_multipart([ident, b"k"])
            elif item == rung:
                try:
                    count = os.eventfd_read(rung)
                except BlockingIOError:
                    continue
                if mode["mode"] == "rtt":
                    size = mode["bytes"]
                    if size:
                        stamp += 1
                        checks.check("round trip", memory.stamp_at(base + size - _STAMP), stamp)
                else:
                    size, window = mode["size"], mode["window"]
                    for _ in range(count):
                        message += 1
                        slot = (message % window) * size
                        data = memory.map[slot : slot + size]  # read: a copy, as zmq's recv
                        head = int.from_bytes(data[:_STAMP], "little")
                        tail = int.from_bytes(data[-_STAMP:], "little")
                        checks.check("message head", head, message)
                        checks.check("message tail", tail, message)
                os.eventfd_write(back, count)
            elif item == peer.sock.fileno():
                peer.read_one()
            elif item == 0:
                chunk = os.read(0, 4096)
                if not chunk:
                    memory.close()
                    peer.close()
                    router.close()
                    context.term()
                    return
                stdin += chunk
                while b"\n" in stdin:
                    line, stdin = stdin.split(b"\n", 1)
                    request = json.loads(line)
                    if request["cmd"] == "memlog":
                        memory.log()
                        emit("memlog", peer_id=memory.peer_id)
                    elif request["cmd"] == "mode":
                        mode = request
                        emit("mode")
                    elif request["cmd"] == "report":
                        emit("report", checked=checks.checked, wrong=checks.wrong,
                             first_wrong=checks.first_wrong)  # fmt: skip


# -- the fabrics (parent) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pair:
    """One fabric: ``path`` is how its clients publish their writes (``log`` or ``scan``)."""

    path: str
    a: Host
    b: Host


def _peer_argv(role: str, socket_path: str, remote: tuple[int, int], endpoint: str) -> list[str]:
    return peer_argv(_MODULE, role, socket_path, remote, endpoint)


def _memory_status(host: Host) -> dict[str, Any]:
    memory: dict[str, Any] = federation_status(host.daemon).get("memory") or {}
    return memory


def _log_writes(pair: _Pair) -> None:
    """Make both clients of ``pair`` report their writes, and wait until each daemon counts
    its client as one that logs (a hello that reached the federation process before it
    knew the client's pid is refused: then the client says hello again)."""
    for host in (pair.a, pair.b):
        peer_id = host.ask({"cmd": "memlog"}, "memlog")["peer_id"]
        deadline = time.monotonic() + WAIT
        again = time.monotonic() + 2.0
        while peer_id not in _memory_status(host).get("logged_peers", []):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: daemon {host.daemon.socket_path} never took the "
                                 f"memory log of peer {peer_id}")  # fmt: skip
            if time.monotonic() > again:
                host.ask({"cmd": "memlog"}, "memlog")
                again = time.monotonic() + 2.0
            time.sleep(0.1)  # the federation process reports its status every half second


def _checked(pair: _Pair) -> int:
    """What B's client checked in ``pair``; stops the benchmark on a wrong stamp."""
    report = pair.b.ask({"cmd": "report"}, "report")
    if report["wrong"]:
        raise SystemExit(
            f"bench: the {pair.path} path delivered {report['wrong']} of {report['checked']} "
            f"interrupts before the data: {report['first_wrong']}"
        )
    checked: int = report["checked"]
    return checked


@contextlib.contextmanager
def _pairs(
    directory: str,
    transport: str,
    timeout: float,
    cpus: tuple[int | None, int | None],
    region: int,
    flush: float,
) -> Iterator[list[_Pair]]:
    options = ["--federation-memory", "on", "--federation-flush", f"{flush:g}"]
    with contextlib.ExitStack() as stack:
        pairs = []
        for path in PATHS:
            hosts = fabric(directory, transport, timeout, cpus, size=str(region),
                           options=options, peers=_peer_argv)  # fmt: skip
            a, b, _restart = stack.enter_context(hosts)
            pairs.append(_Pair(path, a, b))
        _log_writes(pairs[0])
        yield pairs


# -- the measurements --------------------------------------------------------------------------


def _median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def _throughput(
    pairs: Sequence[_Pair], sizes: Sequence[int], ring: int, seconds_each: float, rounds: int
) -> dict[str, Any]:
    """MB/s of each path and of raw zmq, per message size, interleaved round by round."""
    rates: dict[str, dict[int, list[float]]] = {
        kind: {size: [] for size in sizes} for kind in ("zmq", *PATHS)
    }
    for _ in range(rounds):
        for size in sizes:
            window = ring // size
            raw = pairs[0].a.ask({"cmd": "zmq-flood", "size": size, "seconds": seconds_each},
                                 "zmq-flooded")  # fmt: skip
            if raw["received"] != raw["sent"]:
                raise SystemExit(f"bench: raw zmq lost messages ({raw['received']} of "
                                 f"{raw['sent']})")  # fmt: skip
            rates["zmq"][size].append(raw["sent"] * size / raw["elapsed"] / 1e6)
            for pair in pairs:
                pair.b.ask({"cmd": "mode", "mode": "consume", "size": size, "window": window},
                           "mode")  # fmt: skip
                got = pair.a.ask({"cmd": "produce", "size": size, "window": window,
                                  "seconds": seconds_each}, "produced")  # fmt: skip
                rates[pair.path][size].append(got["messages"] * size / got["elapsed"] / 1e6)
    result: dict[str, Any] = {}
    for size in sizes:
        raw_rates = rates["zmq"][size]
        entry: dict[str, float] = {"raw_zmq_mb_s": statistics.median(raw_rates)}
        for path in PATHS:
            entry[f"{path}_mb_s"] = statistics.median(rates[path][size])
            entry[f"{path}_over_raw"] = _median_ratio(rates[path][size], raw_rates)
        result[str(size)] = entry
    return result


def _latency(
    pairs: Sequence[_Pair], sizes: Sequence[int], rounds: int, per_round: int
) -> dict[str, Any]:
    """Round trips with N bytes written before the ring, per path (and raw zmq carrying N
    bytes), interleaved round by round; p50/p99 and ratios of per-round medians."""
    kinds = ("zmq", *PATHS)
    samples: dict[str, dict[int, list[float]]] = {k: {s: [] for s in sizes} for k in kinds}
    medians: dict[str, dict[int, list[float]]] = {k: {s: [] for s in sizes} for k in kinds}

    def one(kind: str, size: int, n: int) -> list[float]:
        if kind == "zmq":
            request = {"cmd": "rtt", "kind": "zmq", "bytes": size, "n": n}
            got: list[float] = pairs[0].a.ask(request, "rtt")["samples"]
            return got
        pair = pairs[PATHS.index(kind)]
        pair.b.ask({"cmd": "mode", "mode": "rtt", "bytes": size}, "mode")
        got = pair.a.ask({"cmd": "rtt", "kind": "shm", "bytes": size, "n": n}, "rtt")["samples"]
        return got

    for kind in kinds:
        for size in sizes:
            one(kind, size, WARMUP)
    for _ in range(rounds):
        for size in sizes:
            for kind in kinds:
                got = one(kind, size, per_round)
                samples[kind][size] += got
                medians[kind][size].append(statistics.median(got))
    result: dict[str, Any] = {}
    zero = min(sizes)
    for kind in kinds:
        result[kind] = {
            str(size): {
                "p50_us": percentile(samples[kind][size], 0.5),
                "p99_us": percentile(samples[kind][size], 0.99),
                "over_smallest": _median_ratio(medians[kind][size], medians[kind][zero]),
            }
            for size in sizes
        }
    result["scan_over_log"] = {
        str(size): _median_ratio(medians["scan"][size], medians["log"][size]) for size in sizes
    }
    return result


# -- in-process microbenchmarks ------------------------------------------------------------------


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _timed(reps: int, prepare: Any, work: Any) -> list[float]:
    """``work()`` timed ``reps`` times (seconds), ``prepare()`` untimed before each."""
    times = []
    for _ in range(reps):
        prepare()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return times


def _micro(region_bytes: int, reps: int, cpu: int | None) -> dict[str, Any]:
    """The scan's cost per MiB and a diff's cost per dirty page, on Twin and Replica."""
    with _pinned(cpu):
        rng = np.random.default_rng(7)
        region = rng.integers(0, 256, region_bytes, dtype=np.uint8)
        mirror = region.copy()
        origin: Replica[None] = Replica("a", Twin(region), holder=True)
        receiver: Replica[None] = Replica("b", Twin(mirror), holder=True)
        npages = origin.twin.npages
        pages_view = region.reshape(npages, PAGE_SIZE)
        mib = region_bytes / MIB
        now = 0.0

        def nothing() -> None:
            pass

        scan = _timed(reps, nothing, origin.twin.changed_pages)

        flushed: list[Diff] = []

        def touch_few() -> None:
            """Change a few bytes (and carry the last flush to the receiver, untimed)."""
            for frame in flushed:
                receiver.receive("a", frame, now)
            flushed.clear()
            pages = rng.choice(npages, FEW_PAGES, replace=False)
            region[pages * PAGE_SIZE + rng.integers(0, PAGE_SIZE, FEW_PAGES)] ^= 0xFF

        def flush_few() -> None:
            flushed.extend(origin.flush(None, now))

        few = _timed(reps, touch_few, flush_few)
        for frame in flushed:
            receiver.receive("a", frame, now)
        per_page: dict[str, dict[str, dict[str, float]]] = {"page": {}, "word": {}}
        for shape in ("page", "word"):
            for k in (k for k in DIRTY_PAGES if k <= npages):
                phases: dict[str, list[float]] = {"collect": [], "wire": [], "apply": []}
                for _ in range(reps):
                    pages = np.sort(rng.choice(npages, k, replace=False)).astype(np.int64)
                    if shape == "page":
                        pages_view[pages] ^= 0xFF
                    else:
                        pages_view[pages, :_STAMP] ^= 0xFF
                    now += 0.001
                    t0 = time.perf_counter()
                    frames = origin.flush(pages, now)
                    t1 = time.perf_counter()
                    wire = [encode_frame(frame, seq) for seq, frame in enumerate(frames, 1)]
                    decoded = [decode_frame(raw)[1] for raw in wire]
                    t2 = time.perf_counter()
                    for part in decoded:
                        assert isinstance(part, Diff)
                        receiver.receive("a", part, now)
                    t3 = time.perf_counter()
                    phases["collect"].append(t1 - t0)
                    phases["wire"].append(t2 - t1)
                    phases["apply"].append(t3 - t2)
                if not np.array_equal(region, mirror):
                    raise SystemExit(f"bench: a diff of {k} pages did not reproduce the region")
                costs = {name: statistics.median(ts) * 1e6 / k for name, ts in phases.items()}
                costs["total"] = sum(costs.values())
                per_page[shape][str(k)] = costs
    return {
        "region_bytes": region_bytes,
        "scan_us_per_mib": statistics.median(scan) * 1e6 / mib,
        "scan_ms": statistics.median(scan) * 1e3,
        "flush_few_us_per_mib": statistics.median(few) * 1e6 / mib,
        "few_pages": FEW_PAGES,
        "diff_us_per_page": per_page,
    }


# -- the whole run -----------------------------------------------------------------------------


def run_memory(
    transports: Sequence[str],
    *,
    region: int,
    ring: int,
    rounds: int,
    per_round: int,
    throughput_rounds: int,
    seconds_each: float,
    flush: float,
    timeout: float,
    pin: bool = True,
) -> dict[str, Any]:
    """Every measurement; the figures as a dict."""
    cpus = two_cpus() if pin else (None, None)
    figures: dict[str, Any] = {
        "pinned": cpus[0] is not None,
        "region_bytes": region,
        "ring_bytes": ring,
        "flush_s": flush,
        "rounds": rounds,
        "per_round": per_round,
        "throughput_rounds": throughput_rounds,
        "seconds_each": seconds_each,
        "micro": _micro(region, max(3, rounds), cpus[0]),
        "transports": {},
    }
    with tempfile.TemporaryDirectory(prefix="ivbench-") as directory:
        for transport in transports:
            with _pairs(directory, transport, timeout, cpus, region, flush) as pairs:
                result = {
                    "throughput": _throughput(
                        pairs, MESSAGE_SIZES, ring, seconds_each, throughput_rounds
                    ),
                    "latency": _latency(pairs, LATENCY_SIZES, rounds, per_round),
                }
                result["checked"] = {pair.path: _checked(pair) for pair in pairs}
                result["memory"] = {pair.path: _memory_status(pair.a) for pair in pairs}
                figures["transports"][transport] = result
    return figures


def _size(n: int) -> str:
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    if n >= KIB and n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n} B"


def print_human(figures: Mapping[str, Any]) -> None:
    """The human lines of the figures (what ``--json`` does not print)."""
    pinned = "host A on one CPU, host B on another" if figures["pinned"] else "not pinned"
    print(f"federated memory: region {_size(figures['region_bytes'])}, a ring of "
          f"{_size(figures['ring_bytes'])}, background flush {figures['flush_s']:g} s, "
          f"{pinned}")  # fmt: skip
    micro = figures["micro"]
    print(f"scan (Twin.changed_pages, nothing changed): {micro['scan_us_per_mib']:.0f} us/MiB "
          f"({micro['scan_ms']:.1f} ms for {_size(micro['region_bytes'])}); a flush with "
          f"{micro['few_pages']} pages changed (scan + collect): "
          f"{micro['flush_few_us_per_mib']:.0f} us/MiB")  # fmt: skip
    print("diff per dirty page, us (collect + encode/decode + apply): whole pages | one word")
    pages, words = micro["diff_us_per_page"]["page"], micro["diff_us_per_page"]["word"]
    for k in pages:
        p, w = pages[k], words[k]
        print(f"  k={int(k):5d}: {p['total']:7.2f} ({p['collect']:.2f} + {p['wire']:.2f} + "
              f"{p['apply']:.2f}) | {w['total']:7.2f} ({w['collect']:.2f} + {w['wire']:.2f} + "
              f"{w['apply']:.2f})")  # fmt: skip
    for transport, result in figures["transports"].items():
        print(f"{transport}: throughput A -> B, MB/s (median of {figures['throughput_rounds']} "
              f"interleaved rounds of {figures['seconds_each']:g} s):")  # fmt: skip
        for size, entry in result["throughput"].items():
            print(f"  {_size(int(size)):>7}: raw zmq {entry['raw_zmq_mb_s']:8.1f}; dirty-log "
                  f"{entry['log_mb_s']:8.1f} ({entry['log_over_raw']:.2f}x, goal >= 0.5x); "
                  f"scan {entry['scan_mb_s']:8.1f} ({entry['scan_over_raw']:.2f}x)")  # fmt: skip
        latency = result["latency"]
        print(f"{transport}: doorbell round trip A -> B -> A with N bytes written first, "
              f"us p50/p99 (x the 0-byte p50), {figures['rounds']} rounds of "
              f"{figures['per_round']}:")  # fmt: skip
        for size in latency["log"]:
            log_, scan, raw = latency["log"][size], latency["scan"][size], latency["zmq"][size]
            print(f"  {_size(int(size)):>7}: dirty-log {log_['p50_us']:8.0f}/{log_['p99_us']:<8.0f}"
                  f"({log_['over_smallest']:5.2f}x)  scan {scan['p50_us']:8.0f}/"
                  f"{scan['p99_us']:<8.0f}({scan['over_smallest']:5.2f}x)  scan/log "
                  f"{latency['scan_over_log'][size]:6.1f}x  raw zmq N bytes "
                  f"{raw['p50_us']:.0f}/{raw['p99_us']:.0f}")  # fmt: skip
        checked = result["checked"]
        print(f"  data checked on every interrupt: {checked['log']} (dirty-log) and "
              f"{checked['scan']} (scan) stamps, none wrong")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivshmemd.federation.bench memory",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--transport", action="append", choices=("tcp", "ipc"),
        help="the federation's and the raw zmq's transport (repeatable; default ipc and tcp)",
    )  # fmt: skip
    parser.add_argument("--size", type=positive_size, default=64 * MIB,
                        help="the shm (default 64M; rounded up to a power of 2)")  # fmt: skip
    parser.add_argument("--ring", type=positive_size, default=8 * MIB,
                        help="the throughput stream's ring in the shm (default 8M; its "
                        "messages in flight at most)")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=10, help="latency rounds")
    parser.add_argument("--per-round", type=positive_int, default=50,
                        help="round trips of each kind and size per round")  # fmt: skip
    parser.add_argument("--throughput-rounds", type=positive_int, default=3)
    parser.add_argument("--seconds", type=seconds(), default=1.0,
                        help="length of each throughput run")  # fmt: skip
    parser.add_argument("--flush", type=seconds(), default=0.1,
                        help="--federation-flush of the daemons (their default)")  # fmt: skip
    parser.add_argument("--timeout", type=seconds(), default=10.0,
                        help="--federation-timeout of the daemons (generous: a member busy "
                        "with a region transfer on a loaded machine is not dead)")  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin the hosts to CPUs")
    parser.add_argument("--json", action="store_true")
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    if args.role is not None:
        return run_peer(args, _ping, _echo)
    region = round_shm_size(args.size)
    need = args.ring + max(LATENCY_SIZES)
    if args.ring < max(MESSAGE_SIZES):
        parser.error(f"--ring {args.ring} cannot hold a message of {_size(max(MESSAGE_SIZES))}")
    if region < need:
        parser.error(f"--size {region} is too small for --ring {args.ring}: at least "
                     f"{need} bytes (the ring and {_size(max(LATENCY_SIZES))} for the round "
                     "trips)")  # fmt: skip
    figures = run_memory(
        args.transport or ["ipc", "tcp"], region=region, ring=args.ring,
        rounds=args.rounds, per_round=args.per_round,
        throughput_rounds=args.throughput_rounds, seconds_each=args.seconds,
        flush=args.flush, timeout=args.timeout, pin=not args.no_pin,
    )  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    else:
        print_human(figures)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
