"""The ``ring`` plugin in real processes: a real daemon, two real ``ivshmem-peer`` processes.

It moves 100 MB with every checksum right; a corrupted message fails the consumer; bad
options are refused with a clear message and exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from peers.plugin import available_plugins
from peers.plugins.ring import (
    CHECKSUMS,
    batch_bytes,
    checksum_at,
    checksum_crc32,
    checksum_sum64,
    record_size,
)
from peers.testing import DaemonProcess

PEER_TIMEOUT = 60.0
StartDaemon = Callable[..., AbstractAsyncContextManager[DaemonProcess]]


def plugin_env(directory: Path, names: Sequence[str]) -> dict[str, str]:
    """The environment for peer processes: if the installed project does not register the
    plugins yet, a dist-info on PYTHONPATH registers them (as any third-party package would)."""
    env = dict(os.environ)
    missing = [name for name in names if name not in available_plugins()]
    if missing:
        info = directory / "ivshmem_builtin_plugins-0.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ivshmem-builtin-plugins\n"
                                       "Version: 0\n")  # fmt: skip
        lines = {"ring": "ring = peers.plugins.ring:RingPlugin",
                 "pagetable": "pagetable = peers.plugins.pagetable:PagetablePlugin"}  # fmt: skip
        (info / "entry_points.txt").write_text(
            "[ivshmem.peers]\n" + "".join(lines[name] + "\n" for name in missing)
        )
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(directory), env.get("PYTHONPATH", "")) if p
        )
    return env


class PeerRun:
    """What a finished peer process left: exit status, JSON lines, stderr."""

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.returncode = returncode
        self.stderr = stderr.decode(errors="replace")
        self.events: list[dict[str, Any]] = [
            json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")
        ]

    def last(self, event: str) -> dict[str, Any]:
        found = [e for e in self.events if e.get("event") == event]
        assert found, f"no {event!r} event; events {self.events}, stderr {self.stderr!r}"
        return found[-1]


async def run_peers(
    argvs: Sequence[Sequence[str]], env: dict[str, str], timeout: float = PEER_TIMEOUT
) -> list[PeerRun]:
    """Run the peer processes concurrently to completion (killed in any case on the way out)."""
    procs: list[trio.Process] = []
    results: list[PeerRun | None] = [None] * len(argvs)

    async def one(i: int, proc: trio.Process) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()

        async def pump(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
            async for chunk in stream:
                into += chunk

        async with trio.open_nursery() as pumps:
            pumps.start_soon(pump, proc.stdout, out)
            pumps.start_soon(pump, proc.stderr, err)
        results[i] = PeerRun(await proc.wait(), bytes(out), bytes(err))

    try:
        for argv in argvs:
            procs.append(await trio.lowlevel.open_process(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=env,
            ))  # fmt: skip
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                for i, proc in enumerate(procs):
                    nursery.start_soon(one, i, proc)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def peer_argv(socket_path: str, plugin: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "peers", "-S", socket_path, "--plugin", plugin,
            "--report", "json", "--wait", "10", *options]  # fmt: skip


def by_role(runs: list[PeerRun]) -> dict[str, PeerRun]:
    """The runs keyed by the role their ``ring`` event reports."""
    return {run.last("ring")["role"]: run for run in runs}


# -- the record format, in process ---------------------------------------------------------


def test_checksums_catch_a_flipped_byte_and_count_every_byte() -> None:
    payload = bytearray(os.urandom(4099))  # not a whole number of words: the tail counts
    for checksum in (checksum_sum64, checksum_crc32):
        good = checksum(bytes(payload))
        for where in (0, 8, 4096, 4098):
            payload[where] ^= 1
            assert checksum(bytes(payload)) != good, (checksum.__name__, where)
            payload[where] ^= 1
        assert checksum(bytes(payload)) == good
    assert checksum_sum64(b"") != checksum_sum64(b"\0")  # the length is part of it


def test_checksums_in_place_match_the_plain_checksums() -> None:
    buf = memoryview(bytearray(os.urandom(8192)))
    words = np.frombuffer(buf, np.uint64)
    for kind, plain in CHECKSUMS.items():
        for start, n in [(0, 0), (0, 8192), (32, 4096), (8, 4099), (4096, 1), (64, 7)]:
            assert checksum_at(kind, buf, words, start, n) == plain(bytes(buf[start : start + n]))
    with pytest.raises(ValueError, match="8-byte aligned"):
        checksum_at("sum64", buf, words, 4, 16)


@pytest.mark.parametrize(
    ("ring", "largest"),
    [(8192, 1088), (1 << 20, 65600), (69632, 65600), (65600, 65600), (4096, 64)],
)
def test_the_sleep_thresholds_never_let_both_sides_sleep(ring: int, largest: int) -> None:
    batch = batch_bytes(ring, largest)
    assert 0 <= batch <= ring // 4 and batch <= ring - largest
    tail = 0  # indices are free-running: only differences matter
    for rec in range(64, largest + 1, 64):
        for head in range(tail + ring - rec + 64, tail + ring + 1, 64):  # no room for rec
            want = head - ring + max(batch, rec)  # the tail the blocked producer waits for
            assert tail < want <= head  # reachable, and it frees room for rec
            # the consumer sleeps only with head <= its tail + batch, i.e. past ``want``:
            # its release reaching ``want`` rang the producer, so both never sleep
            assert head > tail + batch and head - batch >= want


def test_records_are_cache_line_aligned_and_hold_header_and_payload() -> None:
    assert record_size(1) == 64
    assert record_size(32) == 64
    assert record_size(33) == 128
    assert record_size(65536) == 65536 + 64


# -- real processes ------------------------------------------------------------------------


async def test_ring_moves_100_megabytes_with_every_checksum_right(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    env = plugin_env(tmp_path, ["ring"])
    async with start_daemon(vectors=2, size="4M") as daemon:
        argv = peer_argv(daemon.socket_path, "ring", "--bytes", "100M", "--message-size", "64K")
        runs = await run_peers([argv, argv], env)
    roles = by_role(runs)
    assert set(roles) == {"producer", "consumer"}
    for role, run in roles.items():
        assert run.returncode == 0, (role, run.stderr, run.events[-3:])
        figures = run.last("ring")
        assert figures["bytes"] == 100 << 20
        assert figures["messages"] == 1600
        assert figures["checksum_errors"] == 0
        finished = run.last("finished")
        assert finished["ok"] is True
        assert finished["summary"].startswith(
            "ring: 104857600 bytes in 1600 messages, 0 checksum errors, "
        ), finished
        assert " MB/s, " in finished["summary"] and " messages/s" in finished["summary"]


async def test_ring_wraps_small_odd_sized_messages_with_crc32(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    env = plugin_env(tmp_path, ["ring"])
    async with start_daemon(vectors=1, size="64K") as daemon:
        argv = peer_argv(daemon.socket_path, "ring", "--bytes", "1000003", "--message-size",
                         "1000", "--ring-size", "8K", "--checksum", "crc32")  # fmt: skip
        runs = await run_peers([argv, argv], env)
    consumer = by_role(runs)["consumer"]
    assert consumer.returncode == 0, consumer.stderr
    figures = consumer.last("ring")
    assert (figures["bytes"], figures["messages"], figures["checksum_errors"]) == (1000003, 1001, 0)


@pytest.mark.parametrize(
    ("size", "options", "messages"),
    [
        # payloads not a whole number of words: checksummed one by one; a tiny ring, so
        # both sides sleep and wake on their event indices all the time
        ("64K", ["--bytes", "300007", "--message-size", "1001", "--ring-size", "8K"], 300),
        # whole-word payloads checksummed by the batch, then a shorter last message
        ("1M", ["--bytes", "1000000", "--message-size", "64K"], 16),
    ],
)
async def test_ring_handles_uneven_messages_and_sizes(
    start_daemon: StartDaemon, tmp_path: Path, size: str, options: list[str], messages: int
) -> None:
    env = plugin_env(tmp_path, ["ring"])
    async with start_daemon(vectors=2, size=size) as daemon:
        argv = peer_argv(daemon.socket_path, "ring", *options)
        runs = await run_peers([argv, argv], env)
    consumer = by_role(runs)["consumer"]
    assert consumer.returncode == 0, (consumer.stderr, consumer.events[-3:])
    figures = consumer.last("ring")
    total = int(options[1])
    assert (figures["bytes"], figures["messages"], figures["checksum_errors"]) == (
        total,
        messages,
        0,
    )


async def test_a_corrupted_message_fails_the_consumer(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    env = plugin_env(tmp_path, ["ring"])
    async with start_daemon(vectors=2, size="1M") as daemon:
        argv = peer_argv(daemon.socket_path, "ring", "--bytes", "4M", "--message-size", "64K",
                         "--corrupt-every", "7")  # fmt: skip
        runs = await run_peers([argv, argv], env)
    consumer = by_role(runs)["consumer"]
    assert consumer.returncode == 1
    figures = consumer.last("ring")
    assert figures["checksum_errors"] == 64 // 7  # messages 7, 14, ..., 63
    finished = consumer.last("finished")
    assert finished["ok"] is False
    assert "9 checksum errors" in finished["summary"]
    assert "FAILED" in finished["summary"] and "first in message 7" in finished["summary"]


BAD_OPTIONS = [
    (["--ring-size", "5000"], "--ring-size must be a positive multiple of 4096"),
    (["--ring-size", "4K", "--message-size", "64K"], "cannot hold one 65536-byte message"),
    (["--message-size", "0"], "--message-size must be"),
    (["--bytes", "0"], "--bytes must be at least 1"),
    (["--bytes", "12Q"], "unknown suffix"),
    (["--role", "sideways"], "invalid choice"),
    (["--corrupt-every", "-1"], "--corrupt-every must not be negative"),
    (["--partner", "70000"], "--partner must be a peer id"),
]


async def test_bad_ring_options_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    env = plugin_env(tmp_path, ["ring"])
    socket_path = str(tmp_path / "no-daemon.sock")  # options are checked before connecting
    runs = await run_peers(
        [peer_argv(socket_path, "ring", *options) for options, _ in BAD_OPTIONS], env
    )
    for (options, complaint), run in zip(BAD_OPTIONS, runs, strict=True):
        assert run.returncode == 2, (options, run.stderr)
        assert complaint in run.stderr, (options, run.stderr)
        assert "Traceback" not in run.stderr


async def test_a_ring_larger_than_the_shared_memory_fails_clearly(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    env = plugin_env(tmp_path, ["ring"])
    async with start_daemon(vectors=1, size="64K") as daemon:
        (run,) = await run_peers(
            [peer_argv(daemon.socket_path, "ring", "--role", "producer", "--ring-size", "1M")],
            env,
        )
    assert run.returncode == 1
    finished = run.last("finished")
    assert finished["ok"] is False
    assert "does not fit in the 65536-byte shared memory" in finished["summary"]
