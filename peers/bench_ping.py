"""The ping latency figure: our doorbell round trip against the physical limit.

``python -m peers.bench_ping [--count N] [--json]`` builds ``../shared/bench/eventfd_pingpong.c``
(the minimal two-process eventfd ping-pong, in C) with ``cc``, runs it, runs a daemon and
two ``ivshmem-peer --plugin ping`` processes, runs the C reference once more, and prints
both p50/p99 figures and the ratio of the p50s (our p50 / the mean of the two reference
p50s). Everything in one run, so the ratio is fair on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ivshmemd.argtypes import positive_int
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


def _run_reference(binary: str, count: int) -> tuple[float, float]:
    out = subprocess.run([binary, str(count)], capture_output=True, text=True, check=True)
    match = _LINE.search(out.stdout)
    if not match:
        raise SystemExit(f"unexpected reference output: {out.stdout!r}")
    return float(match[1]), float(match[2])


def _run_ping(directory: str, count: int, loop: str, spin_us: float) -> tuple[float, float]:
    args = ["--count", str(count), f"--{loop}", "--spin-us", str(spin_us)]
    with sync_daemon_process(directory, vectors=1) as daemon, sync_supervisor() as supervisor:
        argv = peer_command(daemon.socket_path, "ping", args)
        peers = [supervisor.start(SyncPeerProcess(argv), events=True) for _ in range(2)]
        finished = [p.wait_event(event="finished", timeout=PEER_TIMEOUT) for p in peers]
        summaries = [str(event.get("summary")) for event in finished]
    for text in summaries:
        match = _PING.search(text)
        if match:
            return float(match[2]), float(match[3])
    raise SystemExit(f"no ping result; peers said {summaries!r}")


def bench_ping(
    count: int = 20_000, loop: str = "fast-path", spin_us: float = 50.0
) -> dict[str, Any]:
    """Reference, ours (spinning ``spin_us`` before sleeping), ours without spinning, the
    reference again; returns every figure and the p50 ratios."""
    source = reference_source()
    if not source.exists():
        raise SystemExit(f"the C reference {source} is missing")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc) to build the reference")
    with tempfile.TemporaryDirectory() as directory:
        binary = os.path.join(directory, "eventfd_pingpong")
        subprocess.run([compiler, "-O2", "-o", binary, str(source)], check=True)
        ref1 = _run_reference(binary, count)
        ours = _run_ping(directory, count, loop, spin_us)
        asleep = _run_ping(directory, count, loop, 0.0)
        ref2 = _run_reference(binary, count)
    ref_p50 = (ref1[0] + ref2[0]) / 2
    return {
        "bench": "ping",
        "count": count,
        "loop": loop,
        "reference_p50_us": ref_p50,
        "reference_p99_us": (ref1[1] + ref2[1]) / 2,
        "reference_runs": [ref1, ref2],
        "spin_us": spin_us,
        "ping_p50_us": ours[0],
        "ping_p99_us": ours[1],
        "ratio_p50": ours[0] / ref_p50,
        "ping_no_spin_p50_us": asleep[0],
        "ping_no_spin_p99_us": asleep[1],
        "ratio_no_spin_p50": asleep[0] / ref_p50,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m peers.bench_ping``."""
    parser = argparse.ArgumentParser(
        prog="python -m peers.bench_ping",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=positive_int, default=20_000)
    parser.add_argument("--loop", choices=("fast-path", "trio"), default="fast-path")
    parser.add_argument("--spin-us", type=float, default=50.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench_ping(args.count, args.loop, args.spin_us)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"eventfd reference (C): p50 {result['reference_p50_us']:.2f} us, "
            f"p99 {result['reference_p99_us']:.2f} us"
        )
        print(
            f"ivshmem ping ({args.loop}, spin {args.spin_us:g} us): p50 "
            f"{result['ping_p50_us']:.2f} us, p99 {result['ping_p99_us']:.2f} us, "
            f"ratio (p50) {result['ratio_p50']:.2f}x"
        )
        print(
            f"ivshmem ping ({args.loop}, no spin): p50 {result['ping_no_spin_p50_us']:.2f} us, "
            f"p99 {result['ping_no_spin_p99_us']:.2f} us, "
            f"ratio (p50) {result['ratio_no_spin_p50']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
