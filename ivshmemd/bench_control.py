"""Benchmark of the control plane: request round trip and event delivery.

    python -m ivshmemd.bench_control [--requests N] [--cycles N] [--json]

A child process serves the control plane (serve_control on ipc endpoints in a temporary
directory, with a small in-memory view standing in for the daemon's registry); this process
is the client, as ``ivshmemctl`` is. Figures:

- ``status`` round trip over one REQ socket (p50, p99, mean), after a warm-up;
- the same through a fresh ``ivshmemctl``-style client (new REQ socket per request);
- events for N join/leave cycles: how many arrived, whether in sequence with no gap, and
  the rate.

Prints human lines, or one JSON object with ``--json``. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import trio
import zmq

from ivshmemd.argtypes import positive_int
from ivshmemd.control.client import ControlClient
from ivshmemd.control.schema import (
    EVENTS_WELCOME,
    SequenceTracker,
    decode_event,
    decode_reply,
    default_control_endpoint,
    default_events_endpoint,
    encode_request,
)
from ivshmemd.control.server import EventPublisher, serve_control
from ivshmemd.sdnotify import notify
from ivshmemd.supervise import SyncChild, sync_supervisor


class BenchView:
    """A ControlView with a registry-like peer table, as cheap as the daemon's would be."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.started = time.monotonic()
        self.table: dict[int, dict[str, Any]] = {}
        self.next_id = 0
        self.counters = {"joins": 0, "leaves": 0, "refusals": 0, "messages_sent": 0}
        self.counters["slow_disconnects"] = 0

    def cycle(self) -> None:
        peer_id = self.next_id
        self.next_id = (self.next_id + 1) % 65536
        self.table[peer_id] = {"id": peer_id, "pid": 1, "uid": 0, "gid": 0, "vectors": 1}
        self.counters["joins"] += 1
        self.publisher.peer_joined(peer_id, 1)
        del self.table[peer_id]
        self.counters["leaves"] += 1
        self.publisher.peer_left(peer_id, 1, "disconnected")

    def status(self) -> dict[str, Any]:
        return {
            "version": "bench",
            "uptime": time.monotonic() - self.started,
            "shm": {"name": "ivshmem", "path": "/dev/shm/ivshmem", "size": 4 << 20},
            "vectors": 1,
            "peers": len(self.table),
            "limits": {"max_peers": 4096, "max_vectors": 64},
        }

    def peers(self) -> list[dict[str, Any]]:
        return list(self.table.values())

    def kick(self, peer_id: int) -> bool:
        return self.table.pop(peer_id, None) is not None

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    @property
    def owner_uid(self) -> int:
        return os.getuid()


async def _serve(sock_path: str) -> None:
    publisher = EventPublisher()
    view = BenchView(publisher)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            serve_control,
            view,
            default_control_endpoint(sock_path),
            default_events_endpoint(sock_path),
            publisher,
        )
        notify({"READY": 1})  # to the supervising benchmark
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            for _ in range(int(line)):
                view.cycle()
        nursery.cancel_scope.cancel()


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def _round_trips(endpoint: str, count: int) -> list[float]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    request = encode_request("status")
    times = []
    try:
        for i in range(count + 100):
            t0 = time.perf_counter()
            sock.send(request)
            decode_reply(sock.recv())
            if i >= 100:  # warm-up
                times.append(time.perf_counter() - t0)
    finally:
        sock.close(linger=0)
        ctx.term()
    return sorted(times)


def _fresh_client_round_trips(endpoint: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        client = ControlClient(endpoint, timeout=5.0)
        t0 = time.perf_counter()
        client.request("status")
        times.append(time.perf_counter() - t0)
        client.close()
    return sorted(times)


def _events(events_endpoint: str, child: SyncChild, cycles: int) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 10_000)
    sub.connect(events_endpoint)
    try:
        if sub.recv_multipart() != [EVENTS_WELCOME]:
            raise RuntimeError("no welcome on the events socket")
        t0 = time.perf_counter()
        child.send_line(str(cycles))
        tracker = SequenceTracker()
        received = 0
        in_order = True
        first: int | None = None
        try:
            while received < 2 * cycles:
                event = decode_event(sub.recv_multipart())
                first = event.seq if first is None else first
                in_order &= tracker.observe(event.seq) is None
                received += 1
        except zmq.Again:
            pass
        elapsed = time.perf_counter() - t0
    finally:
        sub.close(linger=0)
        ctx.term()
    return {
        "cycles": cycles,
        "expected": 2 * cycles,
        "received": received,
        "first_seq": first,
        "last_seq": tracker.last_seq,
        "in_sequence_no_gaps": in_order and tracker.missed == 0,
        "events_per_s": received / elapsed if elapsed > 0 else None,
    }


def run(requests: int, cycles: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ivbench-") as tmp, sync_supervisor() as supervisor:
        sock_path = os.path.join(tmp, "b.sock")
        argv = [sys.executable, "-m", "ivshmemd.bench_control", "--serve", sock_path]
        child = supervisor.start(SyncChild(argv), notify=True, stdin=True)
        child.wait_ready()
        rtt = _round_trips(default_control_endpoint(sock_path), requests)
        fresh = _fresh_client_round_trips(default_control_endpoint(sock_path), 200)
        events = _events(default_events_endpoint(sock_path), child, cycles)
    return {
        "status_round_trip_us": {
            "requests": len(rtt),
            "p50": _percentile(rtt, 0.50) * 1e6,
            "p99": _percentile(rtt, 0.99) * 1e6,
            "mean": statistics.fmean(rtt) * 1e6,
        },
        "status_fresh_client_us": {
            "requests": len(fresh),
            "p50": _percentile(fresh, 0.50) * 1e6,
            "p99": _percentile(fresh, 0.99) * 1e6,
        },
        "events": events,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=positive_int, default=5000)
    parser.add_argument("--cycles", type=positive_int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", metavar="SOCK", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(_serve, args.serve)
        return 0
    result = run(args.requests, args.cycles)
    if args.json:
        print(json.dumps(result))
        return 0
    rt, fresh, ev = (
        result["status_round_trip_us"],
        result["status_fresh_client_us"],
        result["events"],
    )
    print(
        f"status round trip ({rt['requests']} requests, one REQ socket): "
        f"p50 {rt['p50']:.0f} us, p99 {rt['p99']:.0f} us, mean {rt['mean']:.0f} us"
    )
    print(
        f"status via a fresh client per request ({fresh['requests']}): "
        f"p50 {fresh['p50']:.0f} us, p99 {fresh['p99']:.0f} us"
    )
    print(
        f"events for {ev['cycles']} join/leave cycles: {ev['received']}/{ev['expected']} "
        f"received, seq {ev['first_seq']}..{ev['last_seq']}, "
        f"{'in sequence, no gaps' if ev['in_sequence_no_gaps'] else 'GAPS OR DISORDER'}, "
        f"{ev['events_per_s']:.0f} events/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
