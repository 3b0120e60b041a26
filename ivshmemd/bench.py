"""Benchmarks of the daemon (they print figures and assert nothing).

``python -m ivshmemd.bench join --peers 64 --vectors 4``
    Starts a daemon and connects PEERS clients (spread over worker processes, one per core),
    then reports the time from the first connect until every client has seen every other
    (all vectors), and the fd messages per second the daemon delivered in that time.
``python -m ivshmemd.bench churn --cycles 1000``
    Two observers stay connected while a client joins and leaves CYCLES times; reports the
    daemon's open fds and RSS before and after, and whether the observers saw every event.

``python -m ivshmemd.bench handover --peers 10 --upgrades 5``
    Upgrades in place (SIGUSR2) with PEERS peers: signal to serving again, and a doorbell
    ping-pong's p50/p99 through a handover against without, interleaved in one run
    (:mod:`ivshmemd.bench_handover`).

``--json`` prints one JSON object instead of the human lines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Final

import trio

from . import wire
from .argtypes import int_in, positive_int
from .bench_handover import bench_handover, print_handover
from .exitcodes import EXIT_FAILED, EXIT_OK
from .supervise import (
    ChildError,
    SyncChild,
    cpu_seconds,
    fd_count,
    rss_bytes,
    sync_daemon_process,
    sync_supervisor,
)


def connect(path: str) -> socket.socket:
    """A raw, non-blocking client connection to the daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    return sock


async def read_values(sock: socket.socket, count: int) -> list[int]:
    """Read ``count`` messages, closing their fds at once; their values, in order."""
    values: list[int] = []
    while len(values) < count:
        try:
            data, fds, _flags = wire.recv_message(sock)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not data:
            raise SystemExit(f"bench client: EOF after {len(values)} of {count} messages")
        for fd in fds:
            os.close(fd)
        values.append(wire.decode(data))
    return values


def worker_event(event: str, **fields: Any) -> None:
    """A benchmark worker's event line (JSON) for its supervisor."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _worker(path: str, count: int, vectors: int, total: int) -> None:
    worker_event("ready")
    await trio.lowlevel.FdStream(os.dup(0)).receive_some(16)  # "go"

    done = trio.Event()
    remaining = count

    async def tracked() -> None:
        nonlocal remaining
        sock = connect(path)
        try:
            await read_values(sock, 3 + vectors * total)
            remaining -= 1
            if remaining == 0:
                done.set()
            await trio.sleep_forever()
        finally:
            sock.close()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(tracked)
            await trio.sleep(0)
        await done.wait()
        worker_event("done")
        await trio.lowlevel.FdStream(os.dup(0)).receive_some(16)  # "stop", or EOF
        nursery.cancel_scope.cancel()


#: Options of the benchmarked daemon: nobody is slow on purpose, and no peer cap.
DAEMON_ARGS: Final = ("--send-timeout", "300", "--max-peers", "65536")
#: Seconds the workers may take to connect and see every peer.
WORKER_TIMEOUT: Final = 600.0


def _worker_argv(path: str, share: int, vectors: int, peers: int) -> list[str]:
    return [sys.executable, "-m", "ivshmemd.bench", "_worker", path, str(share), str(vectors),
            str(peers)]  # fmt: skip


def bench_join(peers: int, vectors: int, workers: int, fd_store: bool = False) -> dict[str, Any]:
    """Time until ``peers`` clients have all seen each other (``fd_store``: with the crash
    journal on, as under systemd with FileDescriptorStoreMax=: every join pushes its fds to
    the notify socket and rewrites the state file)."""
    shares = [peers // workers + (1 if i < peers % workers else 0) for i in range(workers)]
    env = {**os.environ, "FDSTORE": "1000000"} if fd_store else None
    with (
        tempfile.TemporaryDirectory() as directory,
        sync_daemon_process(directory, vectors=vectors, args=DAEMON_ARGS, env=env) as daemon,
        sync_supervisor() as supervisor,
    ):
        started = [
            supervisor.start(
                SyncChild(_worker_argv(daemon.socket_path, share, vectors, peers)),
                events=True,
                stdin=True,
            )
            for share in shares
            if share
        ]
        for worker in started:
            worker.wait_event(event="ready")
        fds_before = fd_count(daemon.pid)
        cpu_before = cpu_seconds(daemon.pid)
        start = time.perf_counter()
        for worker in started:
            worker.send_line("go")
        for worker in started:
            worker.wait_event(event="done", timeout=WORKER_TIMEOUT)
        elapsed = time.perf_counter() - start
        daemon_cpu = cpu_seconds(daemon.pid) - cpu_before
        fds_during = fd_count(daemon.pid)
        for worker in started:
            worker.send_line("stop")
    messages = 3 * peers + vectors * peers * peers
    fd_messages = 1 * peers + vectors * peers * peers
    return {
        "bench": "join",
        "fd_store": fd_store,
        "peers": peers,
        "vectors": vectors,
        "workers": len(started),
        "seconds": elapsed,
        "messages": messages,
        "fd_messages": fd_messages,
        "fd_messages_per_s": fd_messages / elapsed,
        "daemon_fds_before": fds_before,
        "daemon_fds_with_peers": fds_during,
        "daemon_cpu_seconds": daemon_cpu,
    }


async def _churn(path: str, cycles: int, pid: int) -> dict[str, Any]:
    observers: list[socket.socket] = []
    for index in range(2):
        sock = connect(path)
        await read_values(sock, 3 + index + 1)
        for other in observers:
            await read_values(other, 1)
        observers.append(sock)
    fds_before = fd_count(pid)
    rss_before = rss_bytes(pid)
    seen: list[list[int]] = [[], []]
    start = time.perf_counter()
    for _ in range(cycles):
        churner = connect(path)
        await read_values(churner, 3 + 3)
        for index, obs in enumerate(observers):
            seen[index].extend(await read_values(obs, 1))
        churner.close()
        for index, obs in enumerate(observers):
            seen[index].extend(await read_values(obs, 1))
    elapsed = time.perf_counter() - start
    expected = [peer for peer in range(2, 2 + cycles) for _ in range(2)]
    complete = all(s == expected for s in seen)
    fds_after = fd_count(pid)
    rss_after = rss_bytes(pid)
    for obs in observers:
        obs.close()
    return {
        "bench": "churn",
        "cycles": cycles,
        "seconds": elapsed,
        "cycles_per_s": cycles / elapsed,
        "daemon_fds_before": fds_before,
        "daemon_fds_after": fds_after,
        "daemon_rss_before": rss_before,
        "daemon_rss_after": rss_after,
        "observers_saw_every_event_in_order": complete,
    }


def bench_churn(cycles: int) -> dict[str, Any]:
    """Join/leave ``cycles`` times; compare the daemon's fds and RSS before and after."""
    with (
        tempfile.TemporaryDirectory() as directory,
        sync_daemon_process(directory, vectors=1, args=DAEMON_ARGS) as daemon,
    ):
        return trio.run(_churn, daemon.socket_path, cycles, daemon.pid)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    if result["bench"] == "handover":
        print_handover(result)
    elif result["bench"] == "join":
        print(
            f"join{' (fd store)' if result['fd_store'] else ''}: {result['peers']} peers x "
            f"{result['vectors']} vectors: all saw each other "
            f"in {result['seconds'] * 1000:.1f} ms; {result['fd_messages']} fd messages, "
            f"{result['fd_messages_per_s']:,.0f} fd messages/s "
            f"(daemon fds: {result['daemon_fds_before']} idle, "
            f"{result['daemon_fds_with_peers']} with all peers; daemon CPU "
            f"{result['daemon_cpu_seconds']:.2f} s of {result['seconds']:.2f} s)"
        )
    else:
        print(
            f"churn: {result['cycles']} join/leave cycles in {result['seconds']:.2f} s "
            f"({result['cycles_per_s']:,.0f}/s); daemon fds {result['daemon_fds_before']} -> "
            f"{result['daemon_fds_after']}, RSS {result['daemon_rss_before'] / 2**20:.1f} -> "
            f"{result['daemon_rss_after'] / 2**20:.1f} MiB; observers saw every event in "
            f"order: {result['observers_saw_every_event_in_order']}"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m ivshmemd.bench {join,churn} ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        path, count, vectors, total = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        trio.run(_worker, path, count, vectors, total)
        return EXIT_OK
    parser = argparse.ArgumentParser(
        prog="python -m ivshmemd.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    join = sub.add_parser("join", help="N peers join; time until all have seen each other")
    join.add_argument("--peers", type=int_in(1, 65536), default=64)
    join.add_argument("--vectors", type=int_in(1, 64), default=4)
    join.add_argument("--workers", type=positive_int, default=os.cpu_count() or 2)
    join.add_argument(
        "--fd-store", action="store_true",
        help="with the crash journal (systemd's fd store, the state file)",
    )  # fmt: skip
    join.add_argument("--json", action="store_true")
    churn = sub.add_parser("churn", help="join/leave cycles: fds and RSS before and after")
    churn.add_argument("--cycles", type=positive_int, default=1000)
    churn.add_argument("--json", action="store_true")
    handover = sub.add_parser("handover", help="upgrade in place: its time, ping p99 through it")
    handover.add_argument("--peers", type=int_in(1, 4000), default=10)
    handover.add_argument("--upgrades", type=positive_int, default=5)
    handover.add_argument("--cpu", type=int_in(0, 4095), default=0,
                          help="the core the ping-pong pair is pinned to (default 0)")  # fmt: skip
    handover.add_argument("--churn", type=int_in(0, 4000), default=0, metavar="N",
                          help="peers joining and leaving after each upgrade")  # fmt: skip
    handover.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.bench == "join":
            result = bench_join(args.peers, args.vectors, args.workers, args.fd_store)
        elif args.bench == "handover":
            result = bench_handover(args.peers, args.upgrades, args.cpu, args.churn)
        else:
            result = bench_churn(args.cycles)
    except ChildError as exc:  # the daemon or a worker failed: say so in one line
        print(f"ivshmemd.bench {args.bench}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print(result, args.json)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
