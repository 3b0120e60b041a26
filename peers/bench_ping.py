"""The ping latency figure: our doorbell round trip against the physical limit, same core.

``python -m peers.bench_ping [--count N] [--rounds R] [--cpu C | --unpinned] [--json]`` builds
``../shared/bench/eventfd_pingpong.c`` (the minimal two-process eventfd ping-pong, in C) with
``cc``, then runs, ``R`` times over: the C reference, then a daemon and two
``ivshmem-peer --plugin ping`` processes. Each round's ratio is our p50 over the C p50 of
the run just before it; the report gives every run and the median ratio.

By default both ends of both ping-pongs are pinned to one core (``os.sched_setaffinity``,
inherited by the forked ends): on a VM an idle core's wake-up takes tens of microseconds
and swamps any doorbell figure (the unpinned C reference itself moves between 4 and 45 us),
while on one core a ring hands the CPU straight to the woken end. ``--unpinned`` measures
the scheduler's choice instead. Spinning before sleeping (``--spin-us``) only makes sense
unpinned: on one core the spinner holds the CPU its partner needs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ivshmemd.argtypes import positive_int
from ivshmemd.exitcodes import EXIT_OK
from ivshmemd.supervise import sync_daemon_process, sync_supervisor

from .harness import SyncPeerProcess, peer_command

__all__ = ["bench_ping", "main", "reference_source"]

#: Seconds a ping run may take.
PEER_TIMEOUT = 600.0
_LINE = re.compile(r"p50 ([0-9.]+) us\s+p99 ([0-9.]+) us")
_PING = re.compile(r"ping: (\d+) round trips, p50 ([0-9.]+) us, p99 ([0-9.]+) us")


def reference_source() -> Path:
    """Where the C reference lives (``../shared/bench`` beside the checkout)."""
    return Path(__file__).resolve().parents[2] / "shared" / "bench" / "eventfd_pingpong.c"


def _pinner(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and what it forks) to ``cpu``."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def _run_reference(binary: str, count: int, cpu: int | None) -> tuple[float, float]:
    out = subprocess.run(
        [binary, str(count)], capture_output=True, text=True, check=True, preexec_fn=_pinner(cpu)
    )
    match = _LINE.search(out.stdout)
    if not match:
        raise SystemExit(f"unexpected reference output: {out.stdout!r}")
    return float(match[1]), float(match[2])


@contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Run this block (and every child started in it, which inherits the mask) on ``cpu``."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _run_ping(
    directory: str,
    count: int,
    loop: str,
    spin_us: float,
    cpu: int | None,
    peer_extra: Sequence[str] = (),
    on_daemon: Callable[[str], None] | None = None,
    plugin_extra: Sequence[str] = (),
) -> tuple[float, float]:
    """One ping run; ``peer_extra`` are more peer options, ``plugin_extra`` more ping
    options, ``on_daemon(socket_path)`` runs once the daemon listens (e.g. to start watching
    its telemetry)."""
    args = ["--count", str(count), *plugin_extra]
    peer_args = [f"--{loop}", "--spin-us", str(spin_us), *peer_extra]
    with (
        _pinned(cpu),
        sync_daemon_process(directory, vectors=1) as daemon,
        sync_supervisor() as supervisor,
    ):
        if on_daemon is not None:
            on_daemon(daemon.socket_path)
        argv = peer_command(daemon.socket_path, "ping", args, peer_args=peer_args)
        peers = [supervisor.start(SyncPeerProcess(argv), events=True) for _ in range(2)]
        finished = [p.wait_event(event="finished", timeout=PEER_TIMEOUT) for p in peers]
        summaries = [str(event.get("summary")) for event in finished]
    for text in summaries:
        match = _PING.search(text)
        if match:
            return float(match[2]), float(match[3])
    raise SystemExit(f"no ping result; peers said {summaries!r}")


def _default_cpu() -> int:
    """The last core this process may run on (the one the benchmark pins to)."""
    return max(os.sched_getaffinity(0))


def bench_ping(
    count: int = 20_000,
    loop: str = "fast-path",
    spin_us: float = 0.0,
    *,
    rounds: int = 3,
    cpu: int | None = None,
    pinned: bool = True,
) -> dict[str, Any]:
    """Interleaved rounds of (C reference, ours); returns every figure and the median ratio
    of the p50s. ``cpu`` is the core both ends run on (default: the last allowed one);
    ``pinned=False`` lets the scheduler place them."""
    source = reference_source()
    if not source.exists():
        raise SystemExit(f"the C reference {source} is missing")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc) to build the reference")
    core = (cpu if cpu is not None else _default_cpu()) if pinned else None
    if core is not None and core not in os.sched_getaffinity(0):
        raise SystemExit(f"cpu {core} is not one this process may run on")
    references: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        binary = os.path.join(directory, "eventfd_pingpong")
        subprocess.run([compiler, "-O2", "-o", binary, str(source)], check=True)
        for _ in range(rounds):
            references.append(_run_reference(binary, count, core))
            ours.append(_run_ping(directory, count, loop, spin_us, core))
    ratios = [o[0] / r[0] for o, r in zip(ours, references, strict=True)]
    return {
        "bench": "ping",
        "count": count,
        "rounds": rounds,
        "loop": loop,
        "spin_us": spin_us,
        "pinned_cpu": core,
        "reference_runs": references,
        "ping_runs": ours,
        "reference_p50_us": statistics.median(r[0] for r in references),
        "ping_p50_us": statistics.median(o[0] for o in ours),
        "ratios_p50": ratios,
        "ratio_p50": statistics.median(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m peers.bench_ping``."""
    parser = argparse.ArgumentParser(
        prog="python -m peers.bench_ping",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=positive_int, default=20_000, help="round trips per run")
    parser.add_argument("--rounds", type=positive_int, default=3, help="(C, ours) pairs, median")
    parser.add_argument("--loop", choices=("fast-path", "trio"), default="fast-path")
    parser.add_argument("--spin-us", type=float, default=0.0, help="poll before sleeping")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", type=int, default=None, help="the core to pin both ends to")
    where.add_argument("--unpinned", action="store_true", help="let the scheduler place them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.spin_us < 0:
        parser.error(f"--spin-us must not be negative, got {args.spin_us}")
    result = bench_ping(
        args.count, args.loop, args.spin_us, rounds=args.rounds, cpu=args.cpu,
        pinned=not args.unpinned,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    where_text = "unpinned" if result["pinned_cpu"] is None else f"cpu {result['pinned_cpu']}"
    print(f"doorbell ping-pong, {args.count} round trips per run, {where_text}, {args.loop} loop:")
    for i, (ref, ping) in enumerate(
        zip(result["reference_runs"], result["ping_runs"], strict=True)
    ):
        print(
            f"  round {i + 1}: C eventfd p50 {ref[0]:.2f} us (p99 {ref[1]:.2f}), "
            f"ivshmem ping p50 {ping[0]:.2f} us (p99 {ping[1]:.2f}), "
            f"ratio {ping[0] / ref[0]:.2f}x"
        )
    print(
        f"median: C {result['reference_p50_us']:.2f} us, ours {result['ping_p50_us']:.2f} us, "
        f"ratio (p50) {result['ratio_p50']:.2f}x"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
