"""Benchmarks of the daemon under hostile load (they print figures and assert nothing).

``python -m ivshmemd.bench_hostile slow-reader --seconds 60``
    A peer reads a burst of 100 messages every 2 s while newcomers join and leave as fast as
    one client can make them: the daemon's fd count (sampled) and how many newcomers were
    served in every 5 s window (none refused, none starved: the daemon kept serving).
``python -m ivshmemd.bench_hostile subscription-flood --seconds 10``
    Processes running as ``nobody`` (not on ``--allow-uid``) flood the events socket with
    subscriptions: the daemon's and its control process's RSS before, at most and after.
``python -m ivshmemd.bench_hostile control-flood --clients 40``
    Join latency (connect until the whole greeting arrived) with and without 40 clients
    sending control requests as fast as they can, in alternating windows of one run; the
    daemon (and its control process) pinned to CPU 0, the measuring client and the flood to
    the other CPUs, the measuring client at a higher priority.

``--json`` prints one JSON object instead of the human lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import trio

from . import wire
from .argtypes import int_in, positive_int, seconds
from .bench import DAEMON_ARGS, read_values, worker_event
from .exitcodes import EXIT_OK
from .supervise import SyncChild, fd_count, rss_bytes, sync_daemon_process, sync_supervisor

NOBODY: Final = 65534
#: Seconds a helper process may take beyond its own run to report.
HELPER_GRACE: Final = 60.0


def _helper(*args: object) -> SyncChild:
    """A helper process of this benchmark (``python -m ivshmemd.bench_hostile _NAME ...``),
    reporting JSON events on its stdout."""
    return SyncChild([sys.executable, "-m", "ivshmemd.bench_hostile", *map(str, args)])


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# --- slow reader --------------------------------------------------------------------------------


def _slow_reader(path: str, burst: int, period: float, seconds: float) -> int:
    """(A child process.) Read ``burst`` messages every ``period`` s; report at the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    worker_event("ready")
    read = 0
    dropped = False
    end = time.monotonic() + seconds
    while time.monotonic() < end and not dropped:
        time.sleep(period)
        for _ in range(burst):
            try:
                data, fds, _flags = wire.recv_message(sock)
            except BlockingIOError:
                break
            for fd in fds:
                os.close(fd)
            if not data:
                dropped = True
                break
            read += 1
    worker_event("result", read=read, dropped=dropped)
    sock.close()
    return EXIT_OK


async def _churn_and_sample(
    path: str, pid: int, vectors: int, seconds: float, window: float
) -> dict[str, Any]:
    served: list[int] = [0]
    refused = 0
    fds: list[int] = []
    end = trio.current_time() + seconds

    async def sample() -> None:
        while trio.current_time() < end:
            fds.append(fd_count(pid))
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        window_end = trio.current_time() + window
        while trio.current_time() < end:
            if trio.current_time() >= window_end:
                served.append(0)
                window_end += window
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.setblocking(False)
            try:
                with trio.move_on_after(5) as stalled:
                    # its greeting: the slow peer's vectors, and its own
                    await read_values(sock, 3 + 2 * vectors)
                    served[-1] += 1
                refused += stalled.cancelled_caught
            except SystemExit:  # EOF: refused
                refused += 1
            finally:
                sock.close()
    return {"served_per_window": served, "refused": refused, "fds": fds}


def bench_slow_reader(seconds: float, vectors: int, burst: int, period: float) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as directory,
        # the bench's daemon, with a send timeout a slow reader is well within
        sync_daemon_process(
            directory, vectors=vectors, args=(*DAEMON_ARGS, "--send-timeout", "5")
        ) as daemon,
        sync_supervisor() as supervisor,
    ):
        path = daemon.socket_path
        reader = supervisor.start(
            _helper("_slow_reader", path, burst, period, seconds), events=True
        )
        reader.wait_event(event="ready")
        fds_before = daemon.fd_count()
        churn = trio.run(_churn_and_sample, path, daemon.pid, vectors, seconds, 5.0)
        report = reader.wait_event(event="result", timeout=HELPER_GRACE)
        fds_after = daemon.fd_count()
    return {
        "bench": "slow-reader",
        "seconds": seconds,
        "vectors": vectors,
        "daemon_fds_before": fds_before,
        "daemon_fds_max": max(churn["fds"]),
        "daemon_fds_after": fds_after,
        "newcomers_served": sum(churn["served_per_window"]),
        "newcomers_served_per_5s_window": churn["served_per_window"],
        "newcomers_refused": churn["refused"],
        "slow_reader_messages_read": report["read"],
        "slow_reader_dropped": report["dropped"],
    }


# --- subscription flood by a disallowed uid -------------------------------------------------------


def _flood_subscriptions(endpoint: str, seconds: float, uid: int) -> None:
    """(A forked child.) Become ``uid``, then subscribe and resubscribe, for ``seconds``."""
    import zmq

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    end = time.monotonic() + seconds
    round_ = 0
    while time.monotonic() < end:
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for index in range(2000):
            sub.setsockopt(zmq.SUBSCRIBE, b"%d-%d" % (round_, index))
        sub.connect(endpoint)
        sub.poll(100)
        sub.close(linger=0)
        round_ += 1
    os._exit(EXIT_OK)


def bench_subscription_flood(seconds: float, processes: int, uid: int) -> dict[str, Any]:
    import zmq  # noqa: F401  (imported before forking: the children drop privileges)

    directory = tempfile.mkdtemp(prefix="ivshmem-bench-")
    os.chmod(directory, 0o1777)  # the flooding uid must reach the events socket
    daemon_args = (*DAEMON_ARGS, "--socket-mode", "0666", "--allow-uid", "0")
    try:
        with sync_daemon_process(directory, args=daemon_args) as daemon:
            helper = _children(daemon.pid)[0]
            before = (daemon.rss(), rss_bytes(helper))
            pids = []
            for _ in range(processes):
                pid = os.fork()
                if pid == 0:
                    _flood_subscriptions(f"ipc://{daemon.socket_path}.events", seconds, uid)
                pids.append(pid)
            peak = list(before)
            while any(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids):
                peak = [max(peak[0], daemon.rss()), max(peak[1], rss_bytes(helper))]
                time.sleep(0.2)
            for pid in pids:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            after = (daemon.rss(), rss_bytes(helper))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "bench": "subscription-flood",
        "seconds": seconds,
        "processes": processes,
        "uid": uid,
        "daemon_rss_before": before[0],
        "daemon_rss_max": peak[0],
        "daemon_rss_after": after[0],
        "control_process_rss_before": before[1],
        "control_process_rss_max": peak[1],
        "control_process_rss_after": after[1],
    }


# --- join latency under a control-request flood ---------------------------------------------------


def _control_flood(endpoint: str, flag: str) -> int:
    """(A child process.) While ``flag`` exists, send status requests back to back; report
    how many were answered on SIGTERM."""
    import zmq

    answered = 0
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    request = b"\x82\xa1v\x01\xa3cmd\xa6status"  # {"v": 1, "cmd": "status"}
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.REQ_RELAXED, 1)
    sock.connect(endpoint)
    worker_event("ready")
    while not stop:
        if not os.path.exists(flag):
            time.sleep(0.005)
            continue
        sock.send(request)
        if sock.poll(1000):
            sock.recv()
            answered += 1
    worker_event("answered", count=answered)
    sock.close(linger=0)
    context.term()
    return EXIT_OK


async def _measure_joins(
    path: str, vectors: int, peers: int, windows: int, window: float, flag: str
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"quiet": [], "flood": []}
    background: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        for count in range(peers):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.setblocking(False)
            await read_values(sock, 3 + vectors * (count + 1))
            background.append(sock)

        async def drain(sock: socket.socket) -> None:
            while True:
                await read_values(sock, 1)

        for sock in background:
            nursery.start_soon(drain, sock)
        for index in range(windows):
            phase = "flood" if index % 2 else "quiet"
            if phase == "flood":
                Path(flag).touch()
            elif os.path.exists(flag):
                os.unlink(flag)
            await trio.sleep(0.2)  # let the flood start or stop
            end = trio.current_time() + window
            while trio.current_time() < end:
                start = time.perf_counter()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                sock.setblocking(False)
                await read_values(sock, 3 + vectors * (peers + 1))
                samples[phase].append(time.perf_counter() - start)
                sock.close()
        if os.path.exists(flag):
            os.unlink(flag)
        nursery.cancel_scope.cancel()
    for sock in background:
        sock.close()
    return samples


def bench_control_flood(
    clients: int, vectors: int, peers: int, windows: int, window: float, pin: bool
) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    with (
        tempfile.TemporaryDirectory() as directory,
        sync_daemon_process(directory, vectors=vectors, args=DAEMON_ARGS) as daemon,
        sync_supervisor() as supervisor,
    ):
        path = daemon.socket_path
        flag = os.path.join(directory, "flood")
        floods = [
            supervisor.start(_helper("_control_flood", f"ipc://{path}.ctl", flag), events=True)
            for _ in range(clients)
        ]
        for flood in floods:
            flood.wait_event(event="ready")
        if pin and len(cpus) > 1:
            for pid in (daemon.pid, *_children(daemon.pid)):
                os.sched_setaffinity(pid, {cpus[0]})
            for flood in floods:
                os.sched_setaffinity(flood.pid, set(cpus[1:]))
            os.sched_setaffinity(0, set(cpus[1:]))
            os.setpriority(os.PRIO_PROCESS, 0, -5)
        samples = trio.run(_measure_joins, path, vectors, peers, windows, window, flag)
        for flood in floods:
            flood.terminate()
        answered = sum(
            flood.wait_event(event="answered", timeout=HELPER_GRACE)["count"] for flood in floods
        )

    def figures(values: list[float]) -> dict[str, float]:
        return {
            "joins": len(values),
            "p50_ms": _percentile(values, 0.5) * 1e3,
            "p99_ms": _percentile(values, 0.99) * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3,
        }

    quiet, flooded = figures(samples["quiet"]), figures(samples["flood"])
    return {
        "bench": "control-flood",
        "clients": clients,
        "vectors": vectors,
        "peers": peers,
        "windows": windows,
        "pinned": pin and len(cpus) > 1,
        "quiet": quiet,
        "flood": flooded,
        "p50_ratio": flooded["p50_ms"] / quiet["p50_ms"],
        "p99_ratio": flooded["p99_ms"] / quiet["p99_ms"],
        "control_requests_answered": answered,
    }


# --- output and entry point --------------------------------------------------------------------


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    kind = result["bench"]
    if kind == "slow-reader":
        windows = result["newcomers_served_per_5s_window"]
        print(
            f"slow-reader: {result['seconds']:g} s, -n {result['vectors']}: daemon fds "
            f"{result['daemon_fds_before']} -> max {result['daemon_fds_max']} -> "
            f"{result['daemon_fds_after']}; {result['newcomers_served']} newcomers served "
            f"({min(windows)}..{max(windows)} per 5 s window), {result['newcomers_refused']} "
            f"refused; the slow reader read {result['slow_reader_messages_read']} messages, "
            f"dropped: {result['slow_reader_dropped']}"
        )
    elif kind == "subscription-flood":
        mib = 1 << 20
        print(
            f"subscription-flood: {result['processes']} processes as uid {result['uid']} for "
            f"{result['seconds']:g} s: daemon RSS {result['daemon_rss_before'] / mib:.1f} -> "
            f"max {result['daemon_rss_max'] / mib:.1f} -> {result['daemon_rss_after'] / mib:.1f}"
            f" MiB; control process RSS {result['control_process_rss_before'] / mib:.1f} -> "
            f"max {result['control_process_rss_max'] / mib:.1f} -> "
            f"{result['control_process_rss_after'] / mib:.1f} MiB"
        )
    else:
        quiet, flood = result["quiet"], result["flood"]
        print(
            f"control-flood: join of a peer among {result['peers']} (-n {result['vectors']}), "
            f"{'pinned' if result['pinned'] else 'not pinned'}: quiet p50 "
            f"{quiet['p50_ms']:.3f} ms p99 {quiet['p99_ms']:.3f} ms ({quiet['joins']} joins); "
            f"with {result['clients']} control clients p50 {flood['p50_ms']:.3f} ms p99 "
            f"{flood['p99_ms']:.3f} ms ({flood['joins']} joins); ratio p50 "
            f"{result['p50_ratio']:.2f}x, p99 {result['p99_ratio']:.2f}x; "
            f"{result['control_requests_answered']} control requests answered meanwhile"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_slow_reader"]:
        return _slow_reader(argv[1], int(argv[2]), float(argv[3]), float(argv[4]))
    if argv[:1] == ["_control_flood"]:
        return _control_flood(argv[1], argv[2])
    parser = argparse.ArgumentParser(
        prog="python -m ivshmemd.bench_hostile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    slow = sub.add_parser("slow-reader", help="a slow reader while newcomers churn")
    slow.add_argument("--seconds", type=seconds(), default=60.0)
    slow.add_argument("--vectors", type=int_in(1, 64), default=4)
    slow.add_argument("--burst", type=positive_int, default=100)
    slow.add_argument("--period", type=seconds(), default=2.0)
    flood = sub.add_parser("subscription-flood", help="a disallowed uid floods subscriptions")
    flood.add_argument("--seconds", type=seconds(), default=10.0)
    flood.add_argument("--processes", type=positive_int, default=4)
    flood.add_argument("--uid", type=int_in(1, 1 << 31), default=NOBODY)
    control = sub.add_parser("control-flood", help="join latency under a control flood")
    control.add_argument("--clients", type=positive_int, default=40)
    control.add_argument("--vectors", type=int_in(1, 64), default=4)
    control.add_argument("--peers", type=int_in(0, 1000), default=8)
    control.add_argument("--windows", type=int_in(2, 1000), default=20)
    control.add_argument("--window", type=seconds(), default=1.0)
    control.add_argument("--no-pin", dest="pin", action="store_false")
    for p in (slow, flood, control):
        p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.bench == "slow-reader":
        result = bench_slow_reader(args.seconds, args.vectors, args.burst, args.period)
    elif args.bench == "subscription-flood":
        result = bench_subscription_flood(args.seconds, args.processes, args.uid)
    else:
        result = bench_control_flood(
            args.clients, args.vectors, args.peers, args.windows, args.window, args.pin
        )
    _print(result, args.json)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
