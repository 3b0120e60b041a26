"""Benchmark of the federation's doorbell relay against raw pyzmq (figures only, no asserts).

``python -m ivshmemd.federation.bench [--rounds R] [--per-round N] [--seconds S] [--json]``

(``python -m ivshmemd.federation.bench fabric ...`` measures real daemons and peers
instead: :mod:`ivshmemd.federation.bench_fabric`; ``... bench memory ...`` what replicating
their memory costs: :mod:`ivshmemd.federation.bench_memory`. This one measures the relay
alone, two :class:`Federation` objects and no daemon.)

In one run, interleaved round by round so that both see the same machine load:

- **Round trip.** Raw: a pyzmq DEALER (this process) and a ROUTER echo (a child process)
  over TCP loopback, one small message each way. Relay: two daemons' :class:`Federation`
  objects in two processes, federated over TCP loopback; daemon A's local peer rings daemon
  B's peer (it writes the eventfd A made for that remote peer), A relays the count, B writes
  its peer's real eventfd, a responder there rings A's peer back the same way, and the time
  is taken when A's peer's own eventfd becomes readable: eventfd -> frame -> eventfd, twice.
  A with the raw client and B with the echo are pinned to two different CPUs. A third
  line times the raw round trip with the client driven from trio (the daemon's own loop),
  to show what the event loop costs apart from the relay.
- **Throughput.** Raw: zmq messages per second, DEALER to ROUTER, pipelined. Relay: frames
  (and doorbells, which may coalesce in the eventfd as they should) per second delivered
  into B's peers' eventfds while A's peer rings all of B's peers (one eventfd write each,
  then a checkpoint, flat out); the run checks that every doorbell written arrived.
- **Failure detection.** ``kill -9`` of daemon B, and the time until daemon A has announced
  B's peers as left (``--timeout`` seconds plus at most half a heartbeat is expected).

``--json`` prints one JSON object instead of the human lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import trio
import zmq

from ivshmemd.argtypes import positive_int, seconds
from ivshmemd.exitcodes import EXIT_OK
from ivshmemd.registry import IdAllocator, Peer, Registry, SharedFd
from ivshmemd.zmqtrio import TrioSocket

from .benchstats import percentile, two_cpus
from .config import FederationConfig
from .node import Federation

PONG_PEERS = 8
VECTORS = 2


# -- child: one federated daemon ---------------------------------------------------------------


@dataclass(eq=False)
class _BenchHost:
    """A host with real eventfds (as the daemon's registry makes them)."""

    vectors: int
    id_range: tuple[int, int]
    remote: dict[int, str] = field(default_factory=dict)
    left_at: dict[int, float] = field(default_factory=dict)
    changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def __post_init__(self) -> None:
        self.registry = Registry(self.vectors, 4096, IdAllocator(*self.id_range))

    def remote_peer_joined(self, member: str, peer_id: int, vectors: int) -> Sequence[SharedFd]:
        made = self.registry.create_vectors()
        self.registry.add(Peer(peer_id, made, info={"member": member}))
        self.remote[peer_id] = member
        self.changed.unpark_all()
        return made

    def remote_peer_left(self, member: str, peer_id: int) -> None:
        self.left_at[peer_id] = time.monotonic()
        del self.remote[peer_id]
        self.registry.remove(peer_id)
        self.changed.unpark_all()

    def member_event(self, kind: str, info: Mapping[str, Any]) -> None:
        self.changed.unpark_all()

    def add_local(self, federation: Federation) -> Peer:
        peer = Peer(self.registry.reserve_id(), self.registry.create_vectors())
        self.registry.add(peer)
        federation.local_peer_joined(peer)
        return peer

    def fd(self, peer_id: int, vector: int = 0) -> int:
        peer = self.registry.get(peer_id)
        assert peer is not None
        return peer.vectors[vector].fd

    async def wait_remote(self, count: int) -> None:
        while len(self.remote) < count:
            await self.changed.park()


def _reply(out: IO[str], obj: Mapping[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


async def _read_eventfd(fd: int) -> int:
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def _responder(host: _BenchHost, pongs: list[Peer], ping_id: int) -> None:
    """B's peers ring A's peer back with whatever they got (vector 0 of each)."""

    async def one(pong: Peer) -> None:
        fd = pong.vectors[0].fd
        back = host.fd(ping_id)
        while True:
            count = await _read_eventfd(fd)
            os.eventfd_write(back, count)

    async with trio.open_nursery() as nursery:
        for pong in pongs:
            nursery.start_soon(one, pong)


async def _rtt(host: _BenchHost, ping: Peer, target: int, n: int) -> list[float]:
    """``n`` round trips from A's peer to B's peer ``target`` and back (microseconds)."""
    out_fd = host.fd(target)
    in_fd = ping.vectors[0].fd
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        os.eventfd_write(out_fd, 1)
        await _read_eventfd(in_fd)
        samples.append((clock() - start) * 1e6)
    return samples


async def _flood(host: _BenchHost, targets: list[int], seconds: float) -> int:
    """Ring vector 1 of each of B's peers through A's eventfds, one write per eventfd per
    pass with a checkpoint between passes, for ``seconds``; the doorbells written. (A peer
    process writing flat out would take the CPU the relay needs: two cores only.)"""
    fds = [host.fd(peer_id, 1) for peer_id in targets]
    write = os.eventfd_write
    written = 0
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        for fd in fds:
            write(fd, 1)
        written += len(fds)
        await trio.lowlevel.checkpoint()
    return written


async def _child(args: argparse.Namespace) -> None:
    role = args.role
    index = 0 if role == "a" else 1
    config = FederationConfig(
        listen="tcp://127.0.0.1:0",
        id_range=(index * 1000, index * 1000 + 999),
        shm_size=1 << 20,
        vectors=VECTORS,
        peers=tuple(args.peer),
        timeout=args.timeout,
    )
    host = _BenchHost(VECTORS, config.id_range)
    federation = Federation(config, host)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    out = sys.stdout
    async with trio.open_nursery() as nursery:
        endpoint = await nursery.start(federation.run)
        mine = [host.add_local(federation) for _ in range(1 if role == "a" else PONG_PEERS)]
        _reply(out, {"endpoint": endpoint})
        await host.wait_remote(PONG_PEERS if role == "a" else 1)
        if role == "b":
            (ping_id,) = host.remote
            nursery.start_soon(_responder, host, mine, ping_id)
        _reply(out, {"ready": True})
        buffer = b""
        while True:
            while b"\n" not in buffer:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            cmd = request["cmd"]
            targets = sorted(host.remote)
            if cmd == "rtt":
                _reply(out, {"samples": await _rtt(host, mine[0], targets[0], request["n"])})
            elif cmd == "flood":
                _reply(out, {"written": await _flood(host, targets, request["seconds"])})
            elif cmd == "stats":
                _reply(out, federation.relay.stats.as_dict())
            elif cmd == "left":
                while not host.left_at:
                    await host.changed.park()
                _reply(out, {"left_at": min(host.left_at.values())})


# -- parent ------------------------------------------------------------------------------------


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


class _Child:
    """A child process spoken to in JSON lines."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench: child {self.proc.args!r} exited ({self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def _children() -> Iterator[list[_Child]]:
    made: list[_Child] = []
    try:
        yield made
    finally:
        for child in made:
            child.stop()


_ECHO = """
import os, sys, zmq
if sys.argv[1] != "-":
    os.sched_setaffinity(0, {int(sys.argv[1])})
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind("tcp://127.0.0.1:0")
print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
count = 0
while True:
    ident, body = sock.recv_multipart()
    if body == b"f":
        count += 1
    elif body == b"end":
        sock.send_multipart([ident, str(count).encode()])
        count = 0
    else:
        sock.send_multipart([ident, body])
"""


def _raw_rtt(sock: zmq.Socket[bytes], n: int) -> list[float]:
    samples = []
    clock = time.perf_counter
    payload = b"r" * 12  # about a ring frame's size
    for _ in range(n):
        start = clock()
        sock.send(payload)
        sock.recv()
        samples.append((clock() - start) * 1e6)
    return samples


def _trio_rtt(context: zmq.Context[Any], endpoint: str, n: int) -> list[float]:
    """The same round trips, with the client driven from trio as the daemon drives zmq
    (:class:`~ivshmemd.zmqtrio.TrioSocket`): what the event loop itself costs."""

    async def run() -> list[float]:
        with TrioSocket(context.socket(zmq.DEALER)) as sock:
            sock.socket.connect(endpoint)
            samples = []
            clock = time.perf_counter
            for index in range(n + 20):  # the first ones connect and warm up
                start = clock()
                await sock.send_multipart([b"r" * 12])
                await sock.recv_multipart()
                if index >= 20:
                    samples.append((clock() - start) * 1e6)
            return samples

    return trio.run(run)


def _raw_flood(sock: zmq.Socket[bytes], seconds: float) -> float:
    """Messages per second, DEALER to ROUTER, pipelined (counted by the receiver)."""
    sent = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for _ in range(256):
            sock.send(b"f")
        sent += 256
    sock.send(b"end")
    received = int(sock.recv())
    elapsed = time.perf_counter() - start
    if received != sent:
        raise SystemExit(f"bench: raw zmq lost messages ({received} of {sent})")
    return sent / elapsed


def run_bench(
    rounds: int, per_round: int, seconds: float, timeout: float, pin: bool = True
) -> dict[str, Any]:
    """Run every measurement; the figures as a dict."""
    cpu_a, cpu_b = two_cpus() if pin else (None, None)
    me = [sys.executable, "-m", "ivshmemd.federation.bench", "--timeout", str(timeout)]
    with _children() as children:
        echo = subprocess.Popen(
            [sys.executable, "-c", _ECHO, "-" if cpu_b is None else str(cpu_b)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert echo.stdout is not None
            echo_endpoint = echo.stdout.readline().strip()
            b = _Child([*me, "--role", "b", *(["--cpu", str(cpu_b)] if cpu_b is not None else [])])
            children.append(b)
            b_endpoint = b.ask()["endpoint"]
            a_args = ["--role", "a", "--peer", b_endpoint]
            a = _Child([*me, *a_args, *(["--cpu", str(cpu_a)] if cpu_a is not None else [])])
            children.append(a)
            a.ask()  # endpoint
            a.ask()  # ready
            b.ask()  # ready
            _pin(cpu_a)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(echo_endpoint)
            _raw_rtt(sock, 200)  # warm both paths up
            a.ask({"cmd": "rtt", "n": 200})
            raw: list[float] = []
            relay: list[float] = []
            from_trio: list[float] = []
            for _ in range(rounds):
                raw += _raw_rtt(sock, per_round)
                relay += a.ask({"cmd": "rtt", "n": per_round})["samples"]
                from_trio += _trio_rtt(ctx, echo_endpoint, per_round)
            raw_rates: list[float] = []
            relay_frames: list[float] = []
            relay_rings: list[float] = []
            for _ in range(2):
                raw_rates.append(_raw_flood(sock, seconds))
                before = b.ask({"cmd": "stats"})
                start = time.perf_counter()
                written = a.ask({"cmd": "flood", "seconds": seconds})["written"]
                while True:
                    after = b.ask({"cmd": "stats"})
                    arrived = after["delivered_rings"] - before["delivered_rings"]
                    if arrived >= written or time.perf_counter() - start > seconds + 30:
                        break
                    time.sleep(0.01)
                elapsed = time.perf_counter() - start
                if arrived != written:
                    raise SystemExit(f"bench: relay lost doorbells ({arrived} of {written})")
                relay_frames.append(
                    (after["delivered_frames"] - before["delivered_frames"]) / elapsed
                )
                relay_rings.append(arrived / elapsed)
            sock.close()
            ctx.term()
            # failure detection: kill -9 of B, seen by A
            killed_at = time.monotonic()
            b.proc.send_signal(signal.SIGKILL)
            left_at = a.ask({"cmd": "left"})["left_at"]
        finally:
            echo.kill()
            echo.wait()
            if echo.stdout is not None:
                echo.stdout.close()
    raw_p50, relay_p50 = percentile(raw, 0.5), percentile(relay, 0.5)
    return {
        "rounds": rounds,
        "round_trips": len(raw),
        "pinned": cpu_a is not None,
        "raw_zmq_rtt_us": {"p50": raw_p50, "p99": percentile(raw, 0.99)},
        "relay_rtt_us": {"p50": relay_p50, "p99": percentile(relay, 0.99)},
        "trio_zmq_rtt_us": {
            "p50": percentile(from_trio, 0.5),
            "p99": percentile(from_trio, 0.99),
        },
        "relay_over_raw_p50": relay_p50 / raw_p50,
        "relay_over_trio_zmq_p50": relay_p50 / percentile(from_trio, 0.5),
        "relay_over_raw_p99": percentile(relay, 0.99) / percentile(raw, 0.99),
        "raw_zmq_msgs_per_s": max(raw_rates),
        "relay_frames_per_s": max(relay_frames),
        "relay_doorbells_per_s": max(relay_rings),
        "relay_frames_over_raw": max(relay_frames) / max(raw_rates),
        "timeout_s": timeout,
        "kill_to_leave_s": left_at - killed_at,
    }


def _print_human(figures: Mapping[str, Any]) -> None:
    raw, relay = figures["raw_zmq_rtt_us"], figures["relay_rtt_us"]
    print(
        f"round trips: {figures['round_trips']} each, interleaved in {figures['rounds']} "
        f"rounds, {'pinned to 2 CPUs' if figures['pinned'] else 'not pinned'}"
    )
    print(
        f"  raw pyzmq DEALER/ROUTER tcp loopback: p50 {raw['p50']:7.1f} us  "
        f"p99 {raw['p99']:7.1f} us"
    )
    print(
        f"  relay eventfd->frame->eventfd x2:     p50 {relay['p50']:7.1f} us  "
        f"p99 {relay['p99']:7.1f} us"
    )
    trio_rtt = figures["trio_zmq_rtt_us"]
    print(
        f"  raw pyzmq driven from trio:           p50 {trio_rtt['p50']:7.1f} us  "
        f"p99 {trio_rtt['p99']:7.1f} us"
    )
    print(
        f"  relay / raw: p50 {figures['relay_over_raw_p50']:.2f}x  "
        f"p99 {figures['relay_over_raw_p99']:.2f}x  (goal <= 2x); relay / raw from trio: "
        f"p50 {figures['relay_over_trio_zmq_p50']:.2f}x"
    )
    print(
        f"throughput: raw zmq {figures['raw_zmq_msgs_per_s']:,.0f} msgs/s; relay "
        f"{figures['relay_frames_per_s']:,.0f} frames/s "
        f"({figures['relay_frames_over_raw']:.2f}x), "
        f"{figures['relay_doorbells_per_s']:,.0f} doorbells/s (coalesced, none lost)"
    )
    print(
        f"kill -9 of a member -> its peers announced as left: "
        f"{figures['kill_to_leave_s']:.2f} s (timeout {figures['timeout_s']:g} s)"
    )


def main(argv: list[str] | None = None) -> int:
    args_given = list(sys.argv[1:] if argv is None else argv)
    if args_given[:1] == ["fabric"]:  # real daemons and peers (bench_fabric)
        from .bench_fabric import main as fabric_main

        return fabric_main(args_given[1:])
    if args_given[:1] == ["memory"]:  # federated memory (bench_memory)
        from .bench_memory import main as memory_main

        return memory_main(args_given[1:])
    parser = argparse.ArgumentParser(
        prog="python -m ivshmemd.federation.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--per-round", type=positive_int, default=500)
    parser.add_argument(
        "--seconds", type=seconds(), default=1.0, help="length of each throughput run"
    )
    parser.add_argument(
        "--timeout",
        type=seconds(),
        default=3.0,
        help="--federation-timeout of the two daemons",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to two CPUs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role", choices=("a", "b"), help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(args_given)
    if args.role is not None:
        _pin(args.cpu)
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_child, args)
        return EXIT_OK
    figures = run_bench(
        args.rounds, args.per_round, args.seconds, args.timeout, pin=not args.no_pin
    )
    if args.json:
        print(json.dumps(figures))
    else:
        _print_human(figures)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
