"""Benchmarks of the daemon (they print figures and assert nothing).

``python -m ivshmemd.bench join --peers 64 --vectors 4``
    Starts a daemon and connects PEERS clients (spread over worker processes, one per core),
    then reports the time from the first connect until every client has seen every other
    (all vectors), and the fd messages per second the daemon delivered in that time.
``python -m ivshmemd.bench churn --cycles 1000``
    Two observers stay connected while a client joins and leaves CYCLES times; reports the
    daemon's open fds and RSS before and after, and whether the observers saw every event.

``--json`` prints one JSON object instead of the human lines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio

from . import wire
from .argtypes import int_in, positive_int


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


async def _worker(path: str, count: int, vectors: int, total: int) -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
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
        sys.stdout.write("done\n")
        sys.stdout.flush()
        await trio.lowlevel.FdStream(os.dup(0)).receive_some(16)  # "stop"
        nursery.cancel_scope.cancel()


def start_daemon(
    directory: str, vectors: int, extra: list[str]
) -> tuple[subprocess.Popen[str], str, str]:
    """A foreground daemon in ``directory`` (its log drained in a thread): (process, socket
    path, shm name). ``extra`` flags come last, so they override the defaults here."""
    path = os.path.join(directory, "bench.sock")
    name = f"ivshmem-bench-{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivshmemd", "-F", "-S", path, "-M", name, "-l", "1M",
         "-n", str(vectors), "--send-timeout", "300", "--max-peers", "65536", *extra],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"daemon failed to start: {line}")
    # keep draining its log so it never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
    return proc, path, name


def stop_daemon(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_join(peers: int, vectors: int, workers: int) -> dict[str, Any]:
    """Time until ``peers`` clients have all seen each other."""
    with tempfile.TemporaryDirectory() as directory:
        daemon, path, _name = start_daemon(directory, vectors, [])
        procs: list[subprocess.Popen[str]] = []
        try:
            shares = [peers // workers + (1 if i < peers % workers else 0) for i in range(workers)]
            for share in shares:
                if share:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "ivshmemd.bench", "_worker", path, str(share),
                         str(vectors), str(peers)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    ))  # fmt: skip
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            fds_before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
            cpu_before = cpu_seconds(daemon.pid)
            start = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                assert proc.stdout is not None
                status = proc.stdout.readline().strip()
                if status != "done":
                    raise SystemExit(f"a worker failed: {status!r}")
            elapsed = time.perf_counter() - start
            daemon_cpu = cpu_seconds(daemon.pid) - cpu_before
            fds_during = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        finally:
            for proc in procs:
                try:
                    if proc.stdin:
                        proc.stdin.write("stop\n")
                        proc.stdin.close()
                except OSError:
                    pass
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            stop_daemon(daemon)
    messages = 3 * peers + vectors * peers * peers
    fd_messages = 1 * peers + vectors * peers * peers
    return {
        "bench": "join",
        "peers": peers,
        "vectors": vectors,
        "workers": len(procs),
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
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    rss_before = rss(pid)
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
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    rss_after = rss(pid)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (from /proc), to show who is the bottleneck."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_churn(cycles: int) -> dict[str, Any]:
    """Join/leave ``cycles`` times; compare the daemon's fds and RSS before and after."""
    with tempfile.TemporaryDirectory() as directory:
        daemon, path, _name = start_daemon(directory, 1, [])
        try:
            return trio.run(_churn, path, cycles, daemon.pid)
        finally:
            stop_daemon(daemon)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    if result["bench"] == "join":
        print(
            f"join: {result['peers']} peers x {result['vectors']} vectors: all saw each other "
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
        return 0
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
    join.add_argument("--json", action="store_true")
    churn = sub.add_parser("churn", help="join/leave cycles: fds and RSS before and after")
    churn.add_argument("--cycles", type=positive_int, default=1000)
    churn.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.bench == "join":
        result = bench_join(args.peers, args.vectors, args.workers)
    else:
        result = bench_churn(args.cycles)
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
