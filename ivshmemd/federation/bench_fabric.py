"""Benchmark of a fabric of real daemons against raw pyzmq (figures only, no asserts).

``python -m ivshmemd.federation.bench fabric [--transport tcp|ipc ...] [--rounds R]
[--per-round N] [--seconds S] [--timeout T] [--netem] [--json]``

Two real ``ivshmemd`` (each with its federation and control processes) federated over the
transport, host A's processes pinned to one CPU and host B's to the other (as two hosts
would be). On each, a minimal peer: a raw ivshmem client (the unchanged protocol, one
eventfd per vector) driven by a blocking loop, the fastest a peer can be:

- **ping** on A rings B's peer (it writes the eventfd A handed out for it) and waits for
  its own eventfd; **echo** on B rings ping back with the count it read. The path is
  eventfd -> A's federation process -> frame -> B's federation process -> eventfd, twice.
- In the same two processes, on the same CPUs, over the same transport: a pyzmq DEALER
  (ping) and ROUTER (echo) doing the same round trip, one small message each way, the
  echo's ROUTER in the same ``zmq.Poller`` as its eventfds.

Round trips are interleaved round by round (raw, ours, raw, ours, ...) so both see the
same load; the figures are p50/p99 of each and the median of the per-round p50 ratios.

- **Throughput.** ping rings B's peer's second vector flat out for ``--seconds``; echo
  counts what arrives; relayed frames per second (each one delivered eventfd write, rings
  coalescing in between as an eventfd does) and doorbells per second, none lost, against
  raw zmq messages per second DEALER to ROUTER, pipelined.
- **Failure detection.** ``kill -9`` of daemon B alone (its federation process says bye
  as its link closes), then, after B restarted and its peer rejoined, ``kill -9`` of daemon
  B and its federation process at once (a host dying: silence, detected after
  ``--timeout``): the time until ping, a peer on A, reads the leave notice.
- **netem** (``--netem [MS]``, root with ``ip netns`` and ``tc``): the round trips once
  more over TCP between two network namespaces joined by a veth pair with MS (default 1) ms
  of delay each way (0: no qdisc, where the kernel has no netem).

``--json`` prints one JSON object instead of the human lines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import zmq

from ivshmemd import wire
from ivshmemd.argtypes import positive_int, seconds
from ivshmemd.control.client import ControlClient
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK
from ivshmemd.protocol import ClientParser, PeerLeft, PeerVector, ProtocolError, Welcome
from ivshmemd.supervise import (
    ChildError,
    SyncChild,
    SyncDaemon,
    SyncSupervisor,
    daemon_command,
    sync_supervisor,
    unique_name,
)
from ivshmemd.supervise.fabric import MEMBER_UP, federation_pid, host_id_ranges

from .benchstats import percentile, two_cpus

__all__ = ["main", "run_fabric"]

VECTORS: Final = 2
#: the vector rung for round trips, and the one flooded
PING_VECTOR: Final = 0
FLOOD_VECTOR: Final = 1
#: round trips of each kind before measuring (connections made, caches warm)
WARMUP: Final = 200
WAIT: Final = 60.0
_PAYLOAD: Final = b"r" * 12  # about a ring frame's size


# -- the two minimal peers (children) ----------------------------------------------------------


def emit(name: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": name, **fields}) + "\n")
    sys.stdout.flush()


class RawPeer:
    """A raw ivshmem client of one daemon, read in blocking code: its own eventfds and the
    other peers' (the daemon's eventfds are non-blocking and stay so: their open file is
    shared with the daemon and its federation process), its peer id and the shm fd."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(socket_path)
        self.parser = ClientParser()
        self.own: list[int] = []
        self.peers: dict[int, list[int]] = {}
        #: our peer id and the daemon's shm (once welcomed)
        self.peer_id: int | None = None
        self.shm_fd: int | None = None

    def read_one(self) -> PeerVector | PeerLeft | None:
        data, fds, _flags = wire.recv_message(self.sock)
        if not data:
            raise SystemExit("bench peer: the daemon closed our connection")
        event = self.parser.feed(wire.decode(data), fds[0] if fds else None)
        if isinstance(event, Welcome):
            self.peer_id, self.shm_fd = event.peer_id, event.shm_fd
            return None
        if isinstance(event, PeerVector):
            (self.own if event.own else self.peers.setdefault(event.peer_id, [])).append(event.fd)
            return event
        if isinstance(event, PeerLeft):
            for fd in self.peers.pop(event.peer_id, []):
                os.close(fd)
            return event
        return None

    def wait_peer(self, lo: int, hi: int) -> int:
        """Read until a peer with an id in ``lo..hi`` has all its vectors (and ours are
        here); its id."""
        while True:
            ready = [p for p, fds in self.peers.items() if lo <= p <= hi and len(fds) == VECTORS]
            if ready and len(self.own) == VECTORS:
                return ready[0]
            self.read_one()

    def close(self) -> None:
        shm = [] if self.shm_fd is None else [self.shm_fd]
        for fd in [*shm, *self.own, *(fd for fds in self.peers.values() for fd in fds)]:
            os.close(fd)
        self.shm_fd = None
        self.own.clear()
        self.peers.clear()
        self.sock.close()

    def wait_left(self, peer_id: int) -> float:
        """Read until ``peer_id``'s leave notice; the monotonic time it was read."""
        while True:
            event = self.read_one()
            if isinstance(event, PeerLeft) and event.peer_id == peer_id:
                return time.monotonic()


def _eventfd_wait(fd: int, poller: select.poll) -> int:
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            poller.poll()


def _ping(args: argparse.Namespace) -> None:
    """Host A's peer: round trips and floods on request (JSON lines on stdin)."""
    peer = RawPeer(args.socket)
    lo, hi = args.remote_ids
    target = peer.wait_peer(lo, hi)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(args.zmq)
    own = peer.own[PING_VECTOR]
    poller = select.poll()
    poller.register(own, select.POLLIN)
    clock = time.perf_counter
    emit("ready", target=target)
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "rtt":
            samples = []
            n = request["n"]
            if request["kind"] == "raw":
                for _ in range(n):
                    start = clock()
                    dealer.send(_PAYLOAD)
                    dealer.recv()
                    samples.append((clock() - start) * 1e6)
            else:
                out = peer.peers[target][PING_VECTOR]
                for _ in range(n):
                    start = clock()
                    os.eventfd_write(out, 1)
                    _eventfd_wait(own, poller)
                    samples.append((clock() - start) * 1e6)
            emit("rtt", kind=request["kind"], samples=samples)
        elif cmd == "flood":
            out = peer.peers[target][FLOOD_VECTOR]
            written = 0
            started = time.monotonic()
            end = clock() + request["seconds"]
            while clock() < end:
                for _ in range(64):
                    os.eventfd_write(out, 1)
                written += 64
            emit("flooded", written=written, started=started)
        elif cmd == "raw-flood":
            sent = 0
            start = clock()
            end = start + request["seconds"]
            while clock() < end:
                for _ in range(256):
                    dealer.send(b"f")
                sent += 256
            dealer.send(b"end")
            received = int(dealer.recv())
            emit("raw-flooded", sent=sent, received=received, elapsed=clock() - start)
        elif cmd == "watch-leave":
            emit("watching")
            emit("left", at=peer.wait_left(target))
        elif cmd == "rejoin":
            target = peer.wait_peer(lo, hi)
            emit("rejoined", target=target)
    dealer.close()
    context.term()


def _echo(args: argparse.Namespace) -> None:
    """Host B's peer: rings A's peer back, echoes raw zmq, counts the flood, all in one
    ``zmq.Poller`` (it polls raw fds as well as zmq sockets)."""
    peer = RawPeer(args.socket)
    lo, hi = args.remote_ids
    source = peer.wait_peer(lo, hi)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(args.zmq)
    back = peer.peers[source][PING_VECTOR]
    rung, flooded = peer.own[PING_VECTOR], peer.own[FLOOD_VECTOR]
    poller = zmq.Poller()
    for item in (router, rung, flooded, 0, peer.sock.fileno()):
        poller.register(item, zmq.POLLIN)
    emit("ready", endpoint=router.getsockopt_string(zmq.LAST_ENDPOINT), source=source)
    counted = total = 0
    last_at = 0.0
    expect: int | None = None
    stdin = b""
    while True:
        for item, _ in poller.poll():
            if item is router:
                while True:
                    try:
                        ident, body = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if body == b"f":
                        counted += 1
                    elif body == b"end":
                        router.send_multipart([ident, str(counted).encode()])
                        counted = 0
                    else:
                        router.send_multipart([ident, body])
            elif item == rung:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(back, os.eventfd_read(rung))
            elif item == flooded:
                with contextlib.suppress(BlockingIOError):
                    total += os.eventfd_read(flooded)
                    last_at = time.monotonic()
            elif item == peer.sock.fileno():
                peer.read_one()  # notices (a rejoin of ping is not part of this run)
            elif item == 0:
                chunk = os.read(0, 4096)
                if not chunk:
                    router.close()
                    context.term()
                    return
                stdin += chunk
                while b"\n" in stdin:
                    line, stdin = stdin.split(b"\n", 1)
                    expect = int(json.loads(line)["expect"])
        if expect is not None and total >= expect:
            emit("counted", total=total, last_at=last_at)
            expect = None


# -- the run (parent) --------------------------------------------------------------------------


def _free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"tcp://{host}:{probe.getsockname()[1]}"


_Restart = Callable[[], SyncDaemon]


class Host:
    """One "host": a daemon pinned to ``cpu``, and its minimal peer."""

    def __init__(self, daemon: SyncDaemon, peer: SyncChild) -> None:
        self.daemon = daemon
        self.peer = peer

    def ask(self, request: Mapping[str, Any], reply: str) -> dict[str, Any]:
        """Send a request to the peer and wait for its next ``reply`` event."""
        count = len(self.peer.matching(event=reply)) + 1
        self.peer.send_line(json.dumps(request))
        return self.reply(reply, count)

    def reply(self, reply: str, count: int = 1) -> dict[str, Any]:
        """The peer's ``count``-th ``reply`` event, waiting for it."""
        try:
            return self.peer.wait_event(event=reply, count=count, timeout=WAIT)
        except ChildError as exc:
            log = "\n".join(list(self.daemon.log)[-20:])
            raise SystemExit(
                f"bench: no {reply!r} from the peer on {self.daemon.socket_path}: "
                f"{str(exc)[:300]}...\nthat daemon's last log lines:\n{log}"
            ) from None


def _wrapper(cpu: int | None, netns: str | None = None) -> list[str]:
    wrap = [] if netns is None else ["ip", "netns", "exec", netns]
    return wrap + ([] if cpu is None else ["taskset", "-c", str(cpu)])


#: the argv of a host's peer: ``(role, socket_path, remote id range, raw zmq endpoint)``
PeerArgv = Callable[[str, str, tuple[int, int], str], list[str]]


def peer_argv(
    module: str, role: str, socket_path: str, remote: tuple[int, int], endpoint: str
) -> list[str]:
    """The argv of a benchmark's peer child (``module``'s ``main`` with ``--role``)."""
    return [sys.executable, "-m", module, "--role", role,
            "--socket", socket_path, "--remote-ids", f"{remote[0]}-{remote[1]}",
            "--zmq", endpoint]  # fmt: skip


def federation_status(daemon: SyncDaemon) -> dict[str, Any]:
    """The ``federation`` part of the daemon's ``ivshmemctl status`` (the federation process
    refreshes it every half second)."""
    client = ControlClient(f"ipc://{daemon.socket_path}.ctl", 10.0)
    try:
        federation: dict[str, Any] = client.request("status")["federation"]
    finally:
        client.close()
    return federation


def _delivered(daemon: SyncDaemon) -> dict[str, int]:
    rings: dict[str, int] = federation_status(daemon)["rings"]
    return rings


def _wait_delivered(daemon: SyncDaemon, before: Mapping[str, int], rings: int) -> dict[str, int]:
    """B's ring counters once they show ``rings`` more delivered (the federation process
    reports them every half second)."""
    deadline = time.monotonic() + WAIT
    while True:
        now = _delivered(daemon)
        if now["delivered_rings"] - before["delivered_rings"] >= rings:
            return now
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: B's counters never showed the flood: {now}")
        time.sleep(0.1)


def _start_daemon(
    supervisor: SyncSupervisor,
    stack: contextlib.ExitStack,
    socket_path: str,
    options: Sequence[str],
    cpu: int | None,
    netns: str | None = None,
    size: str = "1M",
) -> SyncDaemon:
    """A daemon (pinned to ``cpu``, in ``netns``), serving once its federation listens
    (readiness from its log: systemd's abstract notify socket is not reachable from
    another network namespace)."""
    shm_name = unique_name("ivbench")
    argv = _wrapper(cpu, netns) + daemon_command(socket_path, shm_name, VECTORS, size, options)
    daemon = supervisor.start(SyncDaemon(argv, socket_path, shm_name, VECTORS))
    stack.callback(daemon.remove_leftovers)
    stack.callback(daemon.stop)
    daemon.wait_log(r"federation: .* listening on ", timeout=WAIT)
    return daemon


@contextlib.contextmanager
def fabric(
    directory: str,
    transport: str,
    timeout: float,
    cpus: tuple[int | None, int | None],
    namespaces: tuple[str, str] | None = None,
    *,
    size: str = "1M",
    options: Sequence[str] = (),
    peers: PeerArgv | None = None,
) -> Iterator[tuple[Host, Host, _Restart]]:
    """Daemons A and B (shm of ``size``, more daemon ``options``) federated over
    ``transport``, each with its minimal peer (roles ``ping`` on A, ``echo`` on B, run by
    ``peers``); yields A, B and a way to start B again."""
    peers = peers or functools.partial(peer_argv, "ivshmemd.federation.bench_fabric")
    ranges = host_id_ranges(2)
    tag = uuid.uuid4().hex[:8]
    if namespaces is not None:
        ends = [f"tcp://{_NETNS_ADDRESSES[i]}:7300" for i in range(2)]
        raw = f"tcp://{_NETNS_ADDRESSES[1]}:7301"
    elif transport == "tcp":
        ends = [_free_tcp_endpoint(), _free_tcp_endpoint()]
        raw = _free_tcp_endpoint()
    else:
        ends = [f"ipc://{directory}/fed-{tag}-{i}" for i in range(2)]
        raw = f"ipc://{directory}/raw-{tag}"
    argv = [
        [
            "--peer-ids", f"{lo}-{hi}", "--federation-listen", ends[i],
            "--federation-timeout", f"{timeout:g}",
            *(["--federation-peer", ends[0]] if i else []),
            # a private veth pair between two namespaces of this machine: no keys
            *(["--federation-insecure"] if namespaces else []),
            *options,
        ]
        for i, (lo, hi) in enumerate(ranges)
    ]  # fmt: skip
    netns = namespaces or (None, None)
    sockets = [f"{directory}/{tag}-{i}.sock" for i in range(2)]
    with sync_supervisor() as supervisor, contextlib.ExitStack() as stack:
        daemons = [
            _start_daemon(supervisor, stack, sockets[i], argv[i], cpus[i], netns[i], size)
            for i in range(2)
        ]
        for daemon in daemons:
            daemon.wait_log(MEMBER_UP, timeout=WAIT)
        children = []
        for role, index in (("echo", 1), ("ping", 0)):  # echo waits for ping to join
            command = peers(role, sockets[index], ranges[1 - index], raw)
            peer = SyncChild(_wrapper(cpus[index], netns[index]) + command)
            children.append(supervisor.start(peer, events=True, stdin=True))
        for peer in children:
            peer.wait_event(event="ready", timeout=WAIT)

        def restart_b() -> SyncDaemon:
            return _start_daemon(supervisor, stack, sockets[1], argv[1], cpus[1], netns[1], size)

        yield Host(daemons[0], children[1]), Host(daemons[1], children[0]), restart_b


def _round_trips(a: Host, rounds: int, per_round: int) -> dict[str, Any]:
    for kind in ("raw", "relay"):
        a.ask({"cmd": "rtt", "kind": kind, "n": WARMUP}, "rtt")
    raw: list[float] = []
    relay: list[float] = []
    ratios = []
    for _ in range(rounds):
        got_raw = a.ask({"cmd": "rtt", "kind": "raw", "n": per_round}, "rtt")["samples"]
        got_relay = a.ask({"cmd": "rtt", "kind": "relay", "n": per_round}, "rtt")["samples"]
        raw += got_raw
        relay += got_relay
        ratios.append(statistics.median(got_relay) / statistics.median(got_raw))
    return {
        "round_trips": len(raw),
        "raw_zmq_rtt_us": {"p50": percentile(raw, 0.5), "p99": percentile(raw, 0.99)},
        "relay_rtt_us": {"p50": percentile(relay, 0.5), "p99": percentile(relay, 0.99)},
        "relay_over_raw_p50_median": statistics.median(ratios),
        "relay_over_raw_p99": percentile(relay, 0.99) / percentile(raw, 0.99),
    }


def _throughput(a: Host, b: Host, flood_seconds: float) -> dict[str, Any]:
    raw_rates, frame_rates, ring_rates = [], [], []
    total = 0  # doorbells flooded so far: what echo has counted once all arrived
    for _ in range(2):  # interleaved: raw, ours, raw, ours
        raw = a.ask({"cmd": "raw-flood", "seconds": flood_seconds}, "raw-flooded")
        if raw["received"] != raw["sent"]:
            raise SystemExit(f"bench: raw zmq lost messages ({raw['received']} of {raw['sent']})")
        raw_rates.append(raw["sent"] / raw["elapsed"])
        before = _delivered(b.daemon)
        flood = a.ask({"cmd": "flood", "seconds": flood_seconds}, "flooded")
        written = flood["written"]
        total += written
        counted = b.ask({"expect": total}, "counted")
        after = _wait_delivered(b.daemon, before, written)
        elapsed = counted["last_at"] - flood["started"]
        frames = after["delivered_frames"] - before["delivered_frames"]
        frame_rates.append(frames / elapsed)
        ring_rates.append(written / elapsed)
    return {
        "raw_zmq_msgs_per_s": max(raw_rates),
        "relay_frames_per_s": max(frame_rates),
        "relay_doorbells_per_s": max(ring_rates),
        "relay_frames_over_raw": max(frame_rates) / max(raw_rates),
    }


def _kill_to_leave(a: Host, b: Host, restart_b: _Restart) -> dict[str, float]:
    """kill -9 of daemon B (its federation process says bye), then of a restarted B with
    its federation process (silence): the time until ping on A reads the leave."""
    a.ask({"cmd": "watch-leave"}, "watching")
    killed = time.monotonic()
    b.daemon.kill()
    daemon_only = a.reply("left")["at"] - killed
    b.daemon.wait_exit(WAIT)
    b.peer.kill()
    b.daemon.remove_leftovers()
    again = restart_b()
    with contextlib.closing(RawPeer(again.socket_path)):  # a peer on B, to leave
        a.ask({"cmd": "rejoin"}, "rejoined")
        a.ask({"cmd": "watch-leave"}, "watching")
        helper = federation_pid(again.pid)
        killed = time.monotonic()
        os.kill(helper, signal.SIGKILL)
        again.kill()
        host_death = a.reply("left", 2)["at"] - killed
        again.wait_exit(WAIT)
    return {"kill_daemon_to_leave_s": daemon_only, "kill_host_to_leave_s": host_death}


# -- netem: two network namespaces, a veth pair with a delay -----------------------------------

_NETNS_ADDRESSES: Final = ("10.213.0.1", "10.213.0.2")


class NetemUnavailable(Exception):
    """The namespaces or the netem qdisc cannot be made here (the message says why)."""


@contextlib.contextmanager
def _netem_namespaces(delay_ms: float) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair, ``delay_ms`` of netem delay on each end."""
    tag = uuid.uuid4().hex[:6]
    names = (f"ivbench-a-{tag}", f"ivbench-b-{tag}")
    links = (f"iva{tag}", f"ivb{tag}")

    def run(*argv: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode:
            raise NetemUnavailable(f"{' '.join(argv[:6])}...: {done.stderr.strip()}")

    made: list[str] = []
    try:
        for name in names:
            run("ip", "netns", "add", name)
            made.append(name)
        run("ip", "link", "add", links[0], "netns", names[0], "type", "veth",
            "peer", "name", links[1], "netns", names[1])  # fmt: skip
        for name, link, address in zip(names, links, _NETNS_ADDRESSES, strict=True):
            run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", link)
            run("ip", "-n", name, "link", "set", link, "up")
            run("ip", "-n", name, "link", "set", "lo", "up")
            if delay_ms > 0:
                run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", link, "root",
                    "netem", "delay", f"{delay_ms:g}ms")  # fmt: skip
        yield names
    finally:
        for name in made:  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def netem_problem() -> str | None:
    """Why the netem run cannot happen here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tc", "taskset"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.get_exec_path()):
            return f"{tool} is not installed"
    return None


# -- the whole run -----------------------------------------------------------------------------


def run_fabric(
    transports: Sequence[str],
    rounds: int,
    per_round: int,
    flood_seconds: float,
    timeout: float,
    *,
    pin: bool = True,
    netem: float | None = None,
) -> dict[str, Any]:
    """Every measurement, for each transport; the figures as a dict."""
    cpus = two_cpus() if pin else (None, None)
    figures: dict[str, Any] = {
        "pinned": cpus[0] is not None,
        "rounds": rounds,
        "timeout_s": timeout,
        "transports": {},
    }
    with tempfile.TemporaryDirectory(prefix="ivbench-") as directory:
        for index, transport in enumerate(transports):
            with fabric(directory, transport, timeout, cpus) as (a, b, restart_b):
                result = _round_trips(a, rounds, per_round)
                result.update(_throughput(a, b, flood_seconds))
                if index == 0:
                    result.update(_kill_to_leave(a, b, restart_b))
                figures["transports"][transport] = result
        if netem is not None:
            problem = netem_problem()
            if problem is not None:
                figures["netem"] = {"skipped": problem}
            else:
                try:
                    with (
                        _netem_namespaces(netem) as names,
                        fabric(directory, "tcp", timeout, cpus, names) as (a, _b, _),
                    ):
                        figures["netem"] = {"delay_ms": netem, **_round_trips(a, rounds, per_round)}
                except NetemUnavailable as exc:
                    figures["netem"] = {"skipped": str(exc)}
    return figures


def _print_human(figures: Mapping[str, Any]) -> None:
    pinned = "host A on one CPU, host B on another" if figures["pinned"] else "not pinned"
    print(f"two real daemons, a minimal peer on each ({pinned}); "
          f"round trips interleaved in {figures['rounds']} rounds")  # fmt: skip
    for transport, result in figures["transports"].items():
        raw, relay = result["raw_zmq_rtt_us"], result["relay_rtt_us"]
        print(f"{transport}: {result['round_trips']} round trips of each")
        print(f"  raw pyzmq DEALER/ROUTER:          p50 {raw['p50']:7.1f} us  "
              f"p99 {raw['p99']:7.1f} us")  # fmt: skip
        print(f"  peer A -> daemons -> peer B -> A:  p50 {relay['p50']:7.1f} us  "
              f"p99 {relay['p99']:7.1f} us")  # fmt: skip
        print(f"  ours / raw: median of per-round p50 ratios "
              f"{result['relay_over_raw_p50_median']:.2f}x (goal <= 2x), p99 "
              f"{result['relay_over_raw_p99']:.2f}x")  # fmt: skip
        print(f"  throughput: raw zmq {result['raw_zmq_msgs_per_s']:,.0f} msgs/s; relayed "
              f"{result['relay_frames_per_s']:,.0f} frames/s "
              f"({result['relay_frames_over_raw']:.2f}x), "
              f"{result['relay_doorbells_per_s']:,.0f} doorbells/s "
              "(coalesced, none lost)")  # fmt: skip
        if "kill_daemon_to_leave_s" in result:
            print(f"  kill -9 of daemon B -> leave notice on A: "
                  f"{result['kill_daemon_to_leave_s'] * 1e3:.1f} ms (its federation process "
                  f"says bye)")  # fmt: skip
            print(f"  kill -9 of daemon B and its federation process -> leave notice on A: "
                  f"{result['kill_host_to_leave_s']:.2f} s "
                  f"(--federation-timeout {figures['timeout_s']:g})")  # fmt: skip
    netem = figures.get("netem")
    if netem is not None:
        if "skipped" in netem:
            print(f"netem: skipped ({netem['skipped']})")
        else:
            raw, relay = netem["raw_zmq_rtt_us"], netem["relay_rtt_us"]
            print(f"tcp between two network namespaces, netem {netem['delay_ms']:g} ms each "
                  f"way: raw p50 {raw['p50']:.0f} us, ours p50 {relay['p50']:.0f} us "
                  f"(p99 {raw['p99']:.0f} / {relay['p99']:.0f} us), median ratio "
                  f"{netem['relay_over_raw_p50_median']:.2f}x")  # fmt: skip


PeerRole = Callable[[argparse.Namespace], None]


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden arguments a benchmark's peer child is started with (:func:`peer_argv`)."""
    parser.add_argument("--role", choices=("ping", "echo"), help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--remote-ids", type=id_range, help=argparse.SUPPRESS)
    parser.add_argument("--zmq", help=argparse.SUPPRESS)


def run_peer(args: argparse.Namespace, ping: PeerRole, echo: PeerRole) -> int:
    """Run a peer child's role (``ping`` on host A, ``echo`` on B); its exit status, with
    one line on stderr if the daemon or the system failed it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        (ping if args.role == "ping" else echo)(args)
    except (ProtocolError, OSError) as exc:
        print(f"bench peer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def id_range(text: str) -> tuple[int, int]:
    """``LO-HI`` (the hidden ``--remote-ids`` of a benchmark's peer child)."""
    lo, _, hi = text.partition("-")
    return int(lo), int(hi)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivshmemd.federation.bench fabric",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--transport", action="append", choices=("tcp", "ipc"),
        help="the federation's and the raw zmq's transport (repeatable; default tcp and ipc)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--per-round", type=positive_int, default=500)
    parser.add_argument("--seconds", type=seconds(), default=1.0,
                        help="length of each throughput run")  # fmt: skip
    parser.add_argument("--timeout", type=seconds(), default=3.0,
                        help="--federation-timeout of the daemons")  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin the hosts to CPUs")
    parser.add_argument(
        "--netem", nargs="?", type=float, const=1.0, metavar="MS",
        help="also the round trip between two network namespaces with MS (default 1) ms "
        "of netem delay each way (root, ip netns, tc; 0: the namespaces, no netem)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    if args.role is not None:
        return run_peer(args, _ping, _echo)
    figures = run_fabric(
        args.transport or ["tcp", "ipc"], args.rounds, args.per_round, args.seconds,
        args.timeout, pin=not args.no_pin, netem=args.netem,
    )  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    else:
        _print_human(figures)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
