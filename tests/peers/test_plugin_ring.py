"""The ``ring`` plugin in real processes: a real daemon, two real ``ivshmem-peer`` processes.

It moves 100 MB with every checksum right; a corrupted message fails the consumer; bad
options are refused with a clear message and exit status 2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ivshmemd.supervise import DaemonProcess
from peers.harness import PeerProcess
from peers.plugins.ring import (
    CHECKSUMS,
    batch_bytes,
    checksum_at,
    checksum_crc32,
    checksum_sum64,
    record_size,
)
from peers.pytest_plugin import DaemonFactory, PeerSpawner

PEER_TIMEOUT = 60.0
WAIT = ["--wait", "10"]


async def run_peers(
    spawn: PeerSpawner, daemon: DaemonProcess | str, plugin: str, *options: Sequence[str]
) -> list[PeerProcess]:
    """Run one peer of ``plugin`` per option list, concurrently, to their exit."""
    peers = [await spawn(daemon, plugin, [*WAIT, *args], wait_running=False) for args in options]
    for peer in peers:
        await peer.wait_exit(PEER_TIMEOUT)
    return peers


def last(peer: PeerProcess, event: str) -> dict[str, Any]:
    """Its last ``event`` (the test fails with what it said if there is none)."""
    found = peer.matching(event=event)
    assert found, f"no {event!r} event: {peer.describe()}"
    return found[-1]


def by_role(peers: list[PeerProcess]) -> dict[str, PeerProcess]:
    """The peers keyed by the role their ``ring`` event reports."""
    return {last(peer, "ring")["role"]: peer for peer in peers}


def stderr(peer: PeerProcess) -> str:
    return "\n".join(peer.stderr)


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
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=2, size="4M") as daemon:
        options = ["--bytes", "100M", "--message-size", "64K"]
        roles = by_role(await run_peers(ivshmem_peers, daemon, "ring", options, options))
    assert set(roles) == {"producer", "consumer"}
    for role, peer in roles.items():
        assert peer.returncode == 0, (role, peer.describe())
        figures = last(peer, "ring")
        assert figures["bytes"] == 100 << 20
        assert figures["messages"] == 1600
        assert figures["checksum_errors"] == 0
        finished = last(peer, "finished")
        assert finished["ok"] is True
        assert finished["summary"].startswith(
            "ring: 104857600 bytes in 1600 messages, 0 checksum errors, "
        ), finished
        assert " MB/s, " in finished["summary"] and " messages/s" in finished["summary"]


async def test_ring_wraps_small_odd_sized_messages_with_crc32(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1, size="64K") as daemon:
        options = ["--bytes", "1000003", "--message-size", "1000", "--ring-size", "8K",
                   "--checksum", "crc32"]  # fmt: skip
        peers = await run_peers(ivshmem_peers, daemon, "ring", options, options)
    consumer = by_role(peers)["consumer"]
    assert consumer.returncode == 0, consumer.describe()
    figures = last(consumer, "ring")
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
    start_daemon: DaemonFactory,
    ivshmem_peers: PeerSpawner,
    size: str,
    options: list[str],
    messages: int,
) -> None:
    async with start_daemon(vectors=2, size=size) as daemon:
        peers = await run_peers(ivshmem_peers, daemon, "ring", options, options)
    consumer = by_role(peers)["consumer"]
    assert consumer.returncode == 0, consumer.describe()
    figures = last(consumer, "ring")
    total = int(options[1])
    assert (figures["bytes"], figures["messages"], figures["checksum_errors"]) == (
        total,
        messages,
        0,
    )


async def test_a_corrupted_message_fails_the_consumer(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=2, size="1M") as daemon:
        options = ["--bytes", "4M", "--message-size", "64K", "--corrupt-every", "7"]
        peers = await run_peers(ivshmem_peers, daemon, "ring", options, options)
    consumer = by_role(peers)["consumer"]
    assert consumer.returncode == 1
    figures = last(consumer, "ring")
    assert figures["checksum_errors"] == 64 // 7  # messages 7, 14, ..., 63
    finished = last(consumer, "finished")
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


async def test_bad_ring_options_exit_2_with_a_clear_message(
    ivshmem_peers: PeerSpawner, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "no-daemon.sock")  # options are checked before connecting
    peers = await run_peers(ivshmem_peers, socket_path, "ring", *(o for o, _ in BAD_OPTIONS))
    for (options, complaint), peer in zip(BAD_OPTIONS, peers, strict=True):
        assert peer.returncode == 2, (options, peer.describe())
        assert complaint in stderr(peer), (options, peer.describe())
        assert "Traceback" not in stderr(peer)


async def test_a_ring_larger_than_the_shared_memory_fails_clearly(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1, size="64K") as daemon:
        options = ["--role", "producer", "--ring-size", "1M"]
        (peer,) = await run_peers(ivshmem_peers, daemon, "ring", options)
    assert peer.returncode == 1
    finished = last(peer, "finished")
    assert finished["ok"] is False
    assert "does not fit in the 65536-byte shared memory" in finished["summary"]
