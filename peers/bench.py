"""Benchmarks of the built-in plugins, run as real processes: ``python -m peers.bench``.

    python -m peers.bench ring [--bytes 100M] [--message-size 64K] [--shm-size 4M]
                               [--rounds 3] [--json]

``ring`` starts a daemon and two ``ivshmem-peer --plugin ring --report json`` processes,
reads their ``finished`` lines, then, in the same run and on the same POSIX shm segment,
measures a raw memcpy of the same sizes with producer->consumer semantics: each message is
copied from a private source buffer into the ring area of the shm (at the offsets the ring
would use) and from there into a private destination buffer. It does that ``--rounds``
times (ring, memcpy, ring, memcpy, ...: on a shared machine the two must see the same
load) and prints every round and the median of the per-round ratios (``--json``: one JSON
object). The two peers run at once: on a machine with one free core they take turns, and
the ratio says so (run it under ``taskset`` to choose). Benchmarks print figures; they
never assert one.

Each benchmark is one function ``bench_<name>(args) -> dict``; a subcommand parser per
benchmark is added in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ivshmemd.argtypes import positive_int, positive_size
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK, signal_exit
from ivshmemd.supervise import (
    ChildError,
    SyncSupervisor,
    exit_text,
    sync_daemon_process,
    sync_supervisor,
)

from . import report
from .harness import SyncPeerProcess, peer_command
from .plugins.ringformat import CHECKSUMS, HEADER_SIZE, record_size, spans
from .shmdir import DIRECTORY_SIZE

__all__ = ["BenchError", "bench_ring", "build_parser", "main", "memcpy_ring", "run_pair"]

#: Seconds the two peers may take to move the data.
PEER_TIMEOUT = 600.0
#: What the ring should reach against memcpy (issue 9).
TARGET_RATIO = 0.8


class BenchError(Exception):
    """The benchmark could not run (a process failed, a figure is missing)."""


# -- processes -----------------------------------------------------------------------------


def run_pair(
    supervisor: SyncSupervisor, socket_path: str, plugin: str, options: Sequence[str]
) -> list[SyncPeerProcess]:
    """Run two peers of ``plugin`` to completion; return them (with their events).

    A peer whose partner fails fails in turn (its partner left), so both always end;
    :class:`BenchError` says what every failed peer said.
    """
    argv = peer_command(socket_path, plugin, options)
    peers = [supervisor.start(SyncPeerProcess(argv), events=True) for _ in range(2)]
    try:
        for peer in peers:
            peer.wait_exit(PEER_TIMEOUT)
    except ChildError as exc:
        raise BenchError(f"the {plugin} peers did not finish in {PEER_TIMEOUT:.0f} s") from exc
    failed = [peer for peer in peers if peer.returncode != 0]
    if failed:
        raise BenchError(" / ".join(
            f"a {plugin} peer failed, {exit_text(peer.returncode)}: {_last_words(peer)}"
            for peer in failed
        ))  # fmt: skip
    return peers


def _last_words(peer: SyncPeerProcess) -> str:
    said: list[str] = []
    for line in peer.events:
        match report.decode(line):
            case report.Finished(summary=str(text)) | report.Error(text) | report.Log(text):
                said.append(text)
    return " / ".join([*said[-2:], *list(peer.log)[-2:]])


# -- ring ----------------------------------------------------------------------------------


def memcpy_ring(
    shm: memoryview, total: int, message_size: int, ring_size: int, repeat: int = 3
) -> dict[str, float]:
    """Move ``total`` bytes through the ring area of ``shm`` with plain copies: each message
    from a private source into the ring (at the record offsets the ring plugin uses) and
    from the ring into a private destination. The best of ``repeat`` runs, in MB/s."""
    area = np.frombuffer(shm, np.uint8, ring_size, HEADER_SIZE)
    source = np.random.default_rng(1).integers(0, 256, message_size, dtype=np.uint8)
    dest = np.empty(message_size, np.uint8)
    best = float("inf")
    messages = 0
    for _ in range(repeat):
        head = moved = messages = 0
        t0 = time.perf_counter()
        while moved < total:
            length = min(message_size, total - moved)
            for ring_offset, start, n in spans(head, length, ring_size):  # wraps as the ring
                area[ring_offset : ring_offset + n] = source[start : start + n]  # copy in
                dest[start : start + n] = area[ring_offset : ring_offset + n]  # copy out
            head += record_size(length)
            moved += length
            messages += 1
        best = min(best, time.perf_counter() - t0)
    return {"mb_per_s": total / best / 1e6, "messages_per_s": messages / best, "seconds": best}


def _finished(peer: SyncPeerProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    ring, done = peer.matching(event="ring"), peer.matching(event=report.Finished.KIND)
    if not ring or not done:
        raise BenchError(f"a ring peer ended without its figures: {peer.describe()}")
    return ring[-1], done[-1]


def _ring_round(args: argparse.Namespace, options: list[str]) -> dict[str, Any]:
    """One round: the ring between two peer processes, then memcpy on the same shm."""
    with (
        tempfile.TemporaryDirectory(prefix="ivshmem-bench-") as directory,
        sync_daemon_process(directory, vectors=2, size=args.shm_size) as daemon,
        sync_supervisor() as supervisor,
    ):
        peers = run_pair(supervisor, daemon.socket_path, "ring", options)
        figures = {}
        summaries = {}
        for peer in peers:
            ring, done = _finished(peer)
            figures[ring["role"]] = ring
            summaries[ring["role"]] = done.get("summary")
        if set(figures) != {"producer", "consumer"}:
            raise BenchError(f"expected a producer and a consumer, got {sorted(figures)}")
        shm_size = int(peers[0].first_of["running"].get("shm_size", args.shm_size))
        # where the pair's ring was (its region in the shared-memory directory)
        consumer_ring = figures["consumer"]
        ring_size, offset = int(consumer_ring["ring_size"]), int(consumer_ring["offset"])
        fd = os.open(f"/dev/shm/{daemon.shm_name}", os.O_RDWR)
        try:
            with mmap.mmap(fd, shm_size) as mapping:
                view = memoryview(mapping)[offset:]
                try:
                    memcpy = memcpy_ring(view, args.bytes, args.message_size, ring_size)
                finally:
                    view.release()
        finally:
            os.close(fd)
    consumer = figures["consumer"]
    return {
        "shm_size": shm_size,
        "ring_size": ring_size,
        "ring_mb_per_s": consumer["mb_per_s"],
        "ring_messages_per_s": consumer["messages_per_s"],
        "ring_checksum_errors": consumer["checksum_errors"],
        "producer_mb_per_s": figures["producer"]["mb_per_s"],
        "memcpy_mb_per_s": memcpy["mb_per_s"],
        "memcpy_messages_per_s": memcpy["messages_per_s"],
        "ratio": consumer["mb_per_s"] / memcpy["mb_per_s"],
        "consumer_summary": summaries["consumer"],
        "producer_summary": summaries["producer"],
    }


def bench_ring(args: argparse.Namespace) -> dict[str, Any]:
    """Ring throughput between two peer processes against a raw memcpy on the same shm,
    ``args.rounds`` interleaved rounds; the figures of the round with the median ratio."""
    options = ["--bytes", str(args.bytes), "--message-size", str(args.message_size),
               "--checksum", args.checksum]  # fmt: skip
    # default: the whole shm but the directory and the ring header (one pair, one region)
    ring = args.ring_size or (args.shm_size - DIRECTORY_SIZE - HEADER_SIZE) // 4096 * 4096
    options += ["--ring-size", str(ring)]
    rounds = [_ring_round(args, options) for _ in range(args.rounds)]
    ratios = [r["ratio"] for r in rounds]
    middle = sorted(rounds, key=lambda r: r["ratio"])[(len(rounds) - 1) // 2]
    return {
        "bench": "ring",
        "bytes": args.bytes,
        "message_size": args.message_size,
        "checksum": args.checksum,
        "rounds": args.rounds,
        **middle,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "ring_mb_per_s_runs": [r["ring_mb_per_s"] for r in rounds],
        "memcpy_mb_per_s_runs": [r["memcpy_mb_per_s"] for r in rounds],
    }


def _print_ring(result: dict[str, Any]) -> None:
    print(result["consumer_summary"])
    print(result["producer_summary"])
    print(
        f"memcpy: {result['bytes']} bytes in {result['message_size']}-byte messages through "
        f"the same {result['ring_size']}-byte shm area (copy in + copy out): "
        f"{result['memcpy_mb_per_s']:.1f} MB/s, {result['memcpy_messages_per_s']:.0f} "
        "messages/s"
    )
    for i, (ring, memcpy, ratio) in enumerate(zip(result["ring_mb_per_s_runs"],
                                                  result["memcpy_mb_per_s_runs"],
                                                  result["ratios"], strict=True)):  # fmt: skip
        print(f"  round {i + 1}: ring {ring:.0f} MB/s, memcpy {memcpy:.0f} MB/s, {ratio:.2f}x")
    print(
        f"ring / memcpy: {result['ratio']:.2f}x, median of {result['rounds']} rounds "
        f"(target >= {TARGET_RATIO}x)"
    )


# -- command line --------------------------------------------------------------------------

BENCHES: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]],
                         Callable[[dict[str, Any]], None]]] = {
    "ring": (bench_ring, _print_ring),
}  # fmt: skip


#: The ring benchmark's size options: flag, default, help.
RING_SIZES: tuple[tuple[str, int | None, str], ...] = (
    ("--bytes", 100 << 20, "payload to move (default 100M)"),
    ("--message-size", 64 << 10, "payload bytes per message (default 64K)"),
    ("--shm-size", 4 << 20, "the daemon's shared memory (default 4M)"),
    (
        "--ring-size",
        None,
        "the ring's data area (default: the shm minus the directory and the header)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m peers.bench", description="Benchmarks of the peer plugins."
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    ring = sub.add_parser("ring", help="ring plugin throughput against a raw memcpy")
    for flag, default, what in RING_SIZES:
        ring.add_argument(flag, type=positive_size, default=default, metavar="SIZE", help=what)
    ring.add_argument(
        "--rounds", type=positive_int, default=3, help="(ring, memcpy) rounds, median (3)"
    )
    ring.add_argument(
        "--checksum",
        choices=tuple(CHECKSUMS),
        default="sum64",
        help="the ring's payload checksum (default sum64)",
    )
    for p in (ring,):
        p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark; exit 1 with a clear message if it cannot run."""
    args = build_parser().parse_args(argv)
    run, show = BENCHES[args.bench]
    try:
        result = run(args)
    except (BenchError, ChildError) as exc:
        print(f"peers.bench {args.bench}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return signal_exit(signal.SIGINT)
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
