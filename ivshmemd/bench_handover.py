"""The upgrade-in-place figures (issue 14): handover time, and doorbell latency through one.

``python -m ivshmemd.bench handover --peers 10 [--upgrades 5] [--churn N] [--json]``

1. **Handover time.** A daemon with PEERS raw clients (one vector each; each has read its
   whole stream) is sent SIGUSR2 UPGRADES times. For each, the daemon's own line says how
   long from the signal until the new image serves, of which how long the pre-flight check
   took (the old image serves meanwhile) and how long nothing was accepted (newcomers wait
   in the socket's backlog; peers' doorbells never stop: they go peer to peer). A probe
   client then checks that the new image answers a newcomer with every peer.
2. **Doorbell round trips through a handover against none, same run, interleaved.** Two of
   the clients ping-pong on their eventfds (the doorbell path: a write to the partner's
   eventfd, a blocking read of one's own), both pinned to one core, for the whole run, while
   the bench alternates a handover window (signal to serving again) with a quiet window as
   long. Each round trip is classed by the window it ended in; p50/p99 of both classes.
3. **Nothing kept.** With ``--churn N``, N more peers join (each reading its whole
   greeting) and leave after every handover, the long-lived clients reading what that
   sends them; the daemon's fds and RSS are taken before the first handover and once the
   last leave is served (the fd count back to its baseline, or as close as it came).
"""

from __future__ import annotations

import array
import os
import re
import socket
import statistics
import tempfile
import time
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from . import wire
from .exitcodes import EXIT_OK
from .supervise import fd_count, rss_bytes, sync_daemon_process

__all__ = ["bench_handover", "print_handover"]

DAEMON_ARGS: Final = ["--send-timeout", "600", "--max-peers", "4096"]
UPGRADED: Final = re.compile(
    r"serving again ([0-9.]+) ms after the signal \(pre-flight check ([0-9.]+) ms, then "
    r"([0-9.]+) ms not accepting\)"
)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _read(sock: socket.socket, count: int, keep: bool = False) -> list[tuple[int, int]]:
    """Read ``count`` messages (blocking): (value, fd or -1); fds closed unless ``keep``."""
    out: list[tuple[int, int]] = []
    for _ in range(count):
        data, fds, _flags = wire.recv_message(sock)
        if not data:
            raise SystemExit(f"bench: EOF after {len(out)} of {count} messages")
        fd = fds[0] if fds else -1
        if fd >= 0 and not keep:
            os.close(fd)
            fd = -2
        out.append((wire.decode(data), fd))
    return out


def _join_all(path: str, peers: int) -> list[socket.socket]:
    """PEERS clients, each having read everything sent to it so far."""
    clients: list[socket.socket] = []
    for index in range(peers):
        sock = _connect(path)
        _read(sock, 3 + index + 1)
        clients.append(sock)
    for index, sock in enumerate(clients):
        _read(sock, peers - index - 1)  # the later ones' join notices
    return clients


def _drain(sock: socket.socket) -> int:
    """Read whatever is waiting (fds closed), without blocking; how many messages."""
    count = 0
    sock.setblocking(False)
    try:
        while True:
            try:
                data, fds, _flags = wire.recv_message(sock)
            except BlockingIOError:
                return count
            for fd in fds:
                os.close(fd)
            if not data:
                raise SystemExit(f"bench: EOF on a long-lived client after {count} messages")
            count += 1
    finally:
        sock.setblocking(True)


def _greeting(sock: socket.socket) -> set[int]:
    """Read a newcomer's whole greeting (it ends with its own vector; how many peers it
    lists depends on the churn); the ids of the peers it lists."""
    head = _read(sock, 3)
    own = head[1][0]
    listed: set[int] = set()
    while True:
        ((value, fd),) = _read(sock, 1)
        if value == own and fd != -1:
            return listed
        listed.add(value)


def _churn(path: str, count: int, long_lived: list[socket.socket]) -> None:
    """``count`` peers join (each reads its greeting) and leave; the long-lived clients
    read what reached them so far (the rest at the next round)."""
    churners = []
    for _ in range(count):
        sock = _connect(path)
        _greeting(sock)
        churners.append(sock)
    for sock in churners:
        sock.close()
    for sock in long_lived:
        _drain(sock)


def _settle(pid: int, fds: int, long_lived: list[socket.socket]) -> int:
    """The daemon's fd count once it is back to ``fds`` (every leave served), or what it is
    after 10 s; long-lived clients read what reaches them meanwhile."""
    deadline = time.monotonic() + 10
    now = fd_count(pid)
    while now != fds and time.monotonic() < deadline:
        time.sleep(0.01)
        for sock in long_lived:
            _drain(sock)
        now = fd_count(pid)
    return now


def _percentile(ordered: npt.NDArray[np.int64], q: float) -> float:
    """The ``q`` quantile of sorted nanoseconds, in microseconds (0 for none)."""
    if not len(ordered):
        return 0.0
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) / 1000


def _pinger(path: str, known: int, cpu: int) -> tuple[int, int, int, list[socket.socket]]:
    """Two clients that ping-pong, in a forked child pinned to ``cpu`` (the pair: the
    child and its own forked child). Returns (pid, stop write end, samples read end, the
    pair's sockets: the parent reads what the daemon sends them, the child never does)."""
    a = _connect(path)
    a_stream = _read(a, 3 + known + 1, keep=True)
    b = _connect(path)
    b_stream = _read(b, 3 + known + 2, keep=True)
    a_stream += _read(a, 1, keep=True)
    a_id, b_id = a_stream[1][0], b_stream[1][0]
    a_own = next(fd for value, fd in a_stream if value == a_id and fd >= 0)
    a_to_b = next(fd for value, fd in a_stream if value == b_id and fd >= 0)
    b_own = next(fd for value, fd in b_stream if value == b_id and fd >= 0)
    b_to_a = next(fd for value, fd in b_stream if value == a_id and fd >= 0)
    stop_r, stop_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid:
        for fd in (stop_r, out_w, a_own, a_to_b, b_own, b_to_a):
            os.close(fd)
        return pid, stop_w, out_r, [a, b]
    try:
        os.sched_setaffinity(0, {cpu})
        os.set_blocking(stop_r, False)
        os.set_blocking(a_own, True)  # the daemon makes them non-blocking; we wait on them
        os.set_blocking(b_own, True)
        answerer = os.fork()
        if answerer == 0:  # the answering end
            while True:
                os.eventfd_read(b_own)
                os.eventfd_write(b_to_a, 1)
        samples = array.array("q")
        clock = time.perf_counter_ns
        while True:
            for _ in range(64):
                t0 = clock()
                os.eventfd_write(a_to_b, 1)
                os.eventfd_read(a_own)
                t1 = clock()
                samples.append(time.monotonic_ns())
                samples.append(t1 - t0)
            try:
                os.read(stop_r, 1)  # a byte, or EOF: the bench is gone
                break
            except BlockingIOError:
                continue
        os.kill(answerer, 9)
        os.waitpid(answerer, 0)
        data = samples.tobytes()
        view = memoryview(data)
        while view:
            view = view[os.write(out_w, view) :]
    finally:
        os._exit(EXIT_OK)


def bench_handover(peers: int, upgrades: int, cpu: int = 0, churn: int = 0) -> dict[str, Any]:
    """See the module docstring."""
    with (
        tempfile.TemporaryDirectory() as directory,
        sync_daemon_process(directory, vectors=1, args=DAEMON_ARGS) as daemon,
    ):
        path = daemon.socket_path
        clients = _join_all(path, peers)
        pid, stop_w, out_r, pair = _pinger(path, peers, cpu)
        for sock in clients:
            _read(sock, 2)  # the pair's join notices
        long_lived = [*clients, *pair]
        windows: list[tuple[int, int, str]] = []
        handovers = []
        fds_before, rss_before = fd_count(daemon.pid), rss_bytes(daemon.pid)
        for index in range(upgrades):
            start = time.monotonic_ns()
            daemon.send_signal(12)  # SIGUSR2
            line = daemon.wait_log("serving again", count=index + 1, timeout=600)[-1]
            end = time.monotonic_ns()
            windows.append((start, end, "handover"))
            found = UPGRADED.search(line)
            assert found is not None, line
            total, check, dark = (float(found[i]) for i in (1, 2, 3))
            probe = _connect(path)
            listed = _greeting(probe)
            probe.close()
            assert len(listed) >= peers + 2, f"a newcomer was told of {len(listed)} peers"
            handovers.append({"ms": total, "preflight_ms": check, "not_accepting_ms": dark})
            quiet = time.monotonic_ns()
            time.sleep((end - start) / 1e9)
            windows.append((quiet, time.monotonic_ns(), "quiet"))
            _churn(path, churn, long_lived)
        fds_after = _settle(daemon.pid, fds_before, long_lived)
        rss_after = rss_bytes(daemon.pid)
        os.write(stop_w, b"x")
        data = bytearray()
        while chunk := os.read(out_r, 1 << 20):
            data += chunk  # in place: a long run sends hundreds of MiB
        os.waitpid(pid, 0)
        for sock in long_lived:
            sock.close()
    samples = np.frombuffer(bytes(data), dtype=np.int64).reshape(-1, 2)
    at, rtt = samples[:, 0], samples[:, 1]
    # each round trip in the window it ended in (windows are in order and do not overlap)
    starts = np.array([start for start, _end, _kind in windows], dtype=np.int64)
    ends = np.array([end for _start, end, _kind in windows], dtype=np.int64)
    kinds = np.array([kind for _start, _end, kind in windows])
    window = np.searchsorted(starts, at, side="right") - 1
    inside = (window >= 0) & (at <= ends[np.maximum(window, 0)])
    stats = {}
    for kind in ("handover", "quiet"):
        values = np.sort(rtt[inside & (kinds[np.maximum(window, 0)] == kind)])
        stats[kind] = {"round_trips": len(values), "p50_us": _percentile(values, 0.5),
                       "p99_us": _percentile(values, 0.99)}  # fmt: skip
    ms = [h["ms"] for h in handovers]
    return {
        "bench": "handover",
        "peers": peers,
        "upgrades": upgrades,
        "churn": churn,
        "handover_ms_median": statistics.median(ms),
        "handover_ms_max": max(ms),
        "preflight_ms_median": statistics.median(h["preflight_ms"] for h in handovers),
        "not_accepting_ms_median": statistics.median(h["not_accepting_ms"] for h in handovers),
        "handovers": handovers,
        "ping": stats,
        "p99_ratio": stats["handover"]["p99_us"] / stats["quiet"]["p99_us"]
        if stats["quiet"]["p99_us"]
        else None,
        "pinned_cpu": cpu,
        "daemon_fds": [fds_before, fds_after],
        "daemon_rss": [rss_before, rss_after],
    }


def print_handover(result: dict[str, Any]) -> None:
    """The human lines."""
    ping = result["ping"]
    print(
        f"handover: {result['peers']} peers, {result['upgrades']} upgrades: signal to serving "
        f"again {result['handover_ms_median']:.0f} ms median ({result['handover_ms_max']:.0f} "
        f"max), of which pre-flight check {result['preflight_ms_median']:.0f} ms (old image "
        f"serving) and {result['not_accepting_ms_median']:.0f} ms not accepting newcomers"
    )
    for kind in ("quiet", "handover"):
        print(
            f"handover: doorbell round trip ({kind:8s}): p50 {ping[kind]['p50_us']:.1f} us, "
            f"p99 {ping[kind]['p99_us']:.1f} us over {ping[kind]['round_trips']} round trips "
            f"(pair pinned to cpu {result['pinned_cpu']})"
        )
    ratio = result["p99_ratio"]
    print(f"handover: p99 through a handover / without: {ratio:.2f}" if ratio else "")
    fds, rss = result["daemon_fds"], result["daemon_rss"]
    churned = f", {result['churn']} peers joining and leaving after each" if result["churn"] else ""
    print(f"handover: daemon fds {fds[0]} -> {fds[1]}, RSS {rss[0] / 2**20:.1f} -> "
          f"{rss[1] / 2**20:.1f} MiB over {result['upgrades']} upgrades{churned}")  # fmt: skip
