"""What telemetry costs on the doorbell path: the figure of issue 15.

``python -m peers.bench_telemetry [--count N] [--rounds R] [--cpu C] [--json]``

1. **The route, alone**: calls per second of the three ways to ring a peer's eventfd
   (a real eventfd, read back now and then so it never saturates): the plain route
   ``partial(ring_eventfd, fd)`` (telemetry off), the route with its count in a
   preallocated list slot (``partial(ring_eventfd, fd, counts, slot)``, what the
   runtime uses), and a closure that keeps its count in a cell (the alternative).
2. **Ping, pinned, interleaved**: rounds of the :mod:`peers.bench_ping` ping-pong (both
   peers on one core) with telemetry off (``--no-telemetry``), on but nobody watching, and
   on while a watcher holds a lease (ticks every 0.25 s, a report per tick, the shm dirty
   log harvested); each round runs the three back to back, and the ratio to "off" is taken
   within the round. Goal: within 5% of off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

from ivshmemd.argtypes import positive_int
from ivshmemd.control.client import ControlClient
from ivshmemd.exitcodes import EXIT_OK
from ivshmemd.telemetry import default_telemetry_endpoints

from .bench_ping import _default_cpu, _run_ping
from .client import ring_eventfd

__all__ = ["bench_routes", "bench_telemetry", "main"]

MODES = ("off", "on", "watched")


def _closure_route(fd: int) -> Callable[[], bool]:
    count = 0

    def ring() -> bool:
        nonlocal count
        count += 1
        return ring_eventfd(fd)

    return ring


def bench_routes(calls: int = 100_000, repeat: int = 15) -> dict[str, float]:
    """Nanoseconds per route call for the three routes: the best of ``repeat`` runs of
    ``calls`` each, the variants interleaved (so that a noisy moment hits all of them)."""
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        counts = [0]
        routes: dict[str, Callable[[], bool]] = {
            "plain": partial(ring_eventfd, fd),
            "list_slot": partial(ring_eventfd, fd, counts, 0),
            "closure": _closure_route(fd),
        }
        best = dict.fromkeys(routes, float("inf"))
        for _ in range(repeat):
            for name, route in routes.items():
                _drain(fd)
                best[name] = min(best[name], timeit.timeit(route, number=calls))
        return {name: seconds / calls * 1e9 for name, seconds in best.items()}
    finally:
        os.close(fd)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _watcher(client_box: list[ControlClient]) -> Callable[[str], None]:
    def watch(socket_path: str) -> None:
        client = ControlClient(default_telemetry_endpoints(socket_path).reports, 5.0)
        client_box.append(client)
        client.request("watch", {"interval": 0.25, "seconds": 600})

    return watch


def bench_telemetry(count: int = 20_000, rounds: int = 5, cpu: int | None = None) -> dict[str, Any]:
    """Interleaved pinned ping rounds per mode (see the module docstring)."""
    core = cpu if cpu is not None else _default_cpu()
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(rounds):
            for mode in MODES:
                clients: list[ControlClient] = []
                extra = ["--no-telemetry"] if mode == "off" else []
                on_daemon = _watcher(clients) if mode == "watched" else None
                try:
                    runs[mode].append(
                        _run_ping(directory, count, "fast-path", 0.0, core, extra, on_daemon)
                    )
                finally:
                    for client in clients:
                        client.close()
    ratios = {
        mode: [r[0] / o[0] for r, o in zip(runs[mode], runs["off"], strict=True)]
        for mode in MODES[1:]
    }
    return {
        "bench": "telemetry",
        "count": count,
        "rounds": rounds,
        "pinned_cpu": core,
        "routes_ns": bench_routes(),
        "runs": runs,
        "p50_us": {mode: statistics.median(r[0] for r in runs[mode]) for mode in MODES},
        "ratios_p50": ratios,
        "ratio_p50": {mode: statistics.median(values) for mode, values in ratios.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m peers.bench_telemetry``."""
    parser = argparse.ArgumentParser(
        prog="python -m peers.bench_telemetry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=positive_int, default=20_000, help="round trips per run")
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="rounds of (off, on, watched)"
    )
    parser.add_argument("--cpu", type=int, default=None, help="the core to pin both peers to")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench_telemetry(args.count, args.rounds, args.cpu)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    routes = result["routes_ns"]
    print("doorbell route, ns per call (a real eventfd):")
    for name, ns in routes.items():
        print(f"  {name:<11} {ns:7.1f} ns  ({ns - routes['plain']:+.1f} ns vs plain)")
    print(f"ping, {args.count} round trips per run, pinned to cpu {result['pinned_cpu']}, "
          "fast-path loop, p50 us (off / on / watched):")  # fmt: skip
    for i in range(args.rounds):
        off, on, watched = (result["runs"][m][i][0] for m in MODES)
        print(f"  round {i + 1}: {off:.2f} / {on:.2f} / {watched:.2f}  "
              f"ratios on {on / off:.3f}, watched {watched / off:.3f}")  # fmt: skip
    p50, ratio = result["p50_us"], result["ratio_p50"]
    print(f"median: off {p50['off']:.2f} us, on {p50['on']:.2f} us, watched "
          f"{p50['watched']:.2f} us; ratio on/off {ratio['on']:.3f}, watched/off "
          f"{ratio['watched']:.3f}")  # fmt: skip
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
