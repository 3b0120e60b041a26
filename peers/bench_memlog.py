"""What the memory log's reports cost on the doorbell path: the peers' figure of issue 13.

``python -m peers.bench_memlog [--count N] [--rounds R] [--write BYTES] [--cpu C] [--json]``

1. **The route, in process** (a real VM model, a real eventfd, a real ``SOCK_SEQPACKET``
   pair drained now and then): microseconds per doorbell for the plain route and for
   :func:`peers.memreport.reporting_ring` with nothing written since the last report (one
   check), then per *write and doorbell* (``--write`` bytes through the vCPU, then the
   ring) without a memory log (the written pages stay writable: TLB hits) and with one
   (each doorbell harvests the tracker, write-protects the pages again and sends a report;
   each write faults once).
2. **Ping, pinned, interleaved**: rounds of the :mod:`peers.bench_ping` ping-pong (both
   peers and the memory log's listener on one core), four runs per round: no listener
   (``off``), a listener and no writes (``idle``: every doorbell checks, none reports),
   ``--write`` bytes before every ring without a listener (``write``) and with one
   (``report``: every doorbell reports the pages). Ratios are taken within each round:
   ``idle/off`` (the cost of the check) and ``report/write`` (the cost of a report); the
   median over the rounds is printed. The listener stands in for the daemon at its leanest
   (:class:`MemlogSink`: a blocking ``recv`` per report, in a thread per peer, on the same
   core); what it received is decoded (:func:`ivshmemd.memlog.decode`) and counted after
   each run.

Benchmarks print figures; they never assert one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Final

from ivshmemd.argtypes import positive_int
from ivshmemd.exitcodes import EXIT_OK
from ivshmemd.memlog import MAX_PACKET, Dirty, decode, memlog_path

from .bench_ping import _default_cpu, _run_ping
from .client import ring_eventfd
from .memreport import MemReporter, reporting_ring

__all__ = ["MODES", "MemlogSink", "bench_memlog", "bench_routes", "main"]

MODES: Final = ("off", "idle", "write", "report")
_SHM_GPA: Final = 0x1_0000_0000


class MemlogSink:
    """A memory log's listener (the daemon's part), as lean as one can be in Python: a
    thread accepts every peer, a thread per peer receives its packets with blocking
    ``recv`` calls and keeps them; :meth:`close` stops it, removes the socket it made, and
    decodes what came (counts of reports and pages), off the measured path."""

    def __init__(self, socket_path: str) -> None:
        self.path = memlog_path(socket_path)
        self.reports = 0
        self.pages = 0
        self._packets: list[bytes] = []
        self._readers: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self._acceptor = threading.Thread(target=self._accept, name="memlog-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # shut down by close()
                return
            self._conns.append(conn)
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self._readers.append(reader)
            reader.start()

    def _read(self, conn: socket.socket) -> None:
        keep = self._packets.append
        try:
            while packet := conn.recv(MAX_PACKET):
                keep(packet)
        except OSError:  # shut down by close()
            return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join()
        for conn in self._conns:
            conn.shutdown(socket.SHUT_RDWR)
        for reader in self._readers:
            reader.join()
        for conn in self._conns:
            conn.close()
        self.listener.close()
        os.unlink(self.path)
        for packet in self._packets:
            message = decode(packet)
            if isinstance(message, Dirty):
                self.reports += 1
                self.pages += int(message.pages().shape[0])


@contextmanager
def _sinks() -> Iterator[tuple[list[MemlogSink], Callable[[str], None]]]:
    """``on_daemon`` for :func:`peers.bench_ping._run_ping` that starts a sink, and the
    sinks it started (closed on exit)."""
    sinks: list[MemlogSink] = []
    try:
        yield sinks, lambda socket_path: sinks.append(MemlogSink(socket_path))
    finally:
        for sink in sinks:
            sink.close()


def bench_routes(write: int = 4096, calls: int = 5_000, repeat: int = 5) -> dict[str, float]:
    """Microseconds per doorbell (best of ``repeat`` runs of ``calls``, the variants
    interleaved) of: ``plain`` (the route without memory log), ``idle`` (the reporting route,
    nothing written), ``write`` (``write`` bytes through the vCPU, then the plain route) and
    ``report`` (the same write, then the reporting route: a harvest and a packet)."""
    from vmm import Backing, Vm  # the VM model, as a peer loads it

    vm = Vm()
    size = 16 << 20
    backing = Backing.anonymous(size, page_size=2 << 20)
    vm.set_user_memory_region(1, 0, _SHM_GPA, size, backing)
    vcpu = vm.create_vcpu(0)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    ours, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    daemon.setblocking(False)
    reporter = MemReporter(ours, vm.track_dirty(1), lambda line: None)
    payload = bytes(write)
    plain = partial(ring_eventfd, fd)
    reporting = partial(reporting_ring, reporter.tracker, reporter.report, fd)
    write_page = vcpu.write

    def drain() -> None:
        try:
            while daemon.recv(MAX_PACKET):
                pass
        except BlockingIOError:
            pass
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass

    def run(route: Callable[[], bool], writing: bool) -> float:
        drain()
        start = time.perf_counter()
        for i in range(calls):
            if writing:
                write_page(_SHM_GPA, payload)
            route()
            if i % 64 == 63:
                drain()
        return (time.perf_counter() - start) / calls * 1e6

    variants: dict[str, tuple[Callable[[], bool], bool]] = {
        "plain": (plain, False),
        "idle": (reporting, False),
        "write": (plain, True),
        "report": (reporting, True),
    }
    best = dict.fromkeys(variants, float("inf"))
    try:
        reporter.report()  # what the set-up wrote
        for _ in range(repeat):
            for name, (route, writing) in variants.items():
                if not writing:
                    reporter.report()  # "idle" starts with nothing written
                best[name] = min(best[name], run(route, writing))
    finally:
        reporter.close()
        daemon.close()
        os.close(fd)
        vm.close()
        backing.close()
    return best


def bench_memlog(
    count: int = 20_000,
    rounds: int = 3,
    write: int = 4096,
    cpu: int | None = None,
    route_calls: int = 5_000,
) -> dict[str, Any]:
    """Interleaved pinned ping rounds per mode, and the routes in process (``route_calls``
    doorbells per variant and try): see the module docstring."""
    core = cpu if cpu is not None else _default_cpu()
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    received: dict[str, list[tuple[int, int]]] = {"idle": [], "report": []}
    writing = ["--write", str(write)]
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(rounds):
            for mode in MODES:
                extra = writing if mode in ("write", "report") else []
                with _sinks() as (sinks, start_sink):
                    listen = start_sink if mode in ("idle", "report") else None
                    runs[mode].append(
                        _run_ping(directory, count, "fast-path", 0.0, core, (), listen, extra)
                    )
                if mode in received:
                    received[mode].append((sinks[0].reports, sinks[0].pages))
    ratios = {
        "idle/off": [i[0] / o[0] for i, o in zip(runs["idle"], runs["off"], strict=True)],
        "report/write": [r[0] / w[0] for r, w in zip(runs["report"], runs["write"], strict=True)],
    }
    return {
        "bench": "memlog",
        "count": count,
        "rounds": rounds,
        "write_bytes": write,
        "pinned_cpu": core,
        "routes_us": bench_routes(write, route_calls),
        "runs": runs,
        "received": received,
        "p50_us": {mode: statistics.median(r[0] for r in runs[mode]) for mode in MODES},
        "ratios_p50": ratios,
        "ratio_p50": {name: statistics.median(values) for name, values in ratios.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m peers.bench_memlog``."""
    parser = argparse.ArgumentParser(
        prog="python -m peers.bench_memlog",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=positive_int, default=20_000, help="round trips per run")
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds of (off, idle, write, report)"
    )
    parser.add_argument(
        "--write", type=positive_int, default=4096, help="bytes written before every ring"
    )
    parser.add_argument("--cpu", type=int, default=None, help="the core to pin everything to")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench_memlog(args.count, args.rounds, args.write, args.cpu)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    routes = result["routes_us"]
    print(f"doorbell route in process, us per doorbell ({args.write} bytes written for "
          "write/report):")  # fmt: skip
    print(
        f"  plain {routes['plain']:.2f}, idle (check only) {routes['idle']:.2f} "
        f"({routes['idle'] - routes['plain']:+.2f}); write {routes['write']:.2f}, "
        f"write+report {routes['report']:.2f} ({routes['report'] - routes['write']:+.2f})"
    )
    print(f"ping, {args.count} round trips per run, pinned to cpu {result['pinned_cpu']}, "
          f"fast-path loop, p50 us (off / idle / write / report), {args.write} bytes "
          "written per ring in write and report:")  # fmt: skip
    for i in range(args.rounds):
        off, idle, write, report = (result["runs"][m][i][0] for m in MODES)
        reports, pages = result["received"]["report"][i]
        print(f"  round {i + 1}: {off:.2f} / {idle:.2f} / {write:.2f} / {report:.2f}  "
              f"ratios idle/off {idle / off:.3f}, report/write {report / write:.3f} "
              f"({reports} reports, {pages} pages received)")  # fmt: skip
    p50, ratio = result["p50_us"], result["ratio_p50"]
    print(f"median: off {p50['off']:.2f} us, idle {p50['idle']:.2f} us, write "
          f"{p50['write']:.2f} us, report {p50['report']:.2f} us; ratio idle/off "
          f"{ratio['idle/off']:.3f}, report/write {ratio['report/write']:.3f}")  # fmt: skip
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
