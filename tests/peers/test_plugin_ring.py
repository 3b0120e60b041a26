"""The ``ring`` plugin in real processes: a real daemon, two real ``ivshmem-peer`` processes.

It moves 100 MB with every checksum right; a corrupted message fails the consumer; bad
options are refused with a clear message and exit status 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ivshmemd.supervise import DaemonProcess
from peers.harness import PeerProcess
from peers.pytest_plugin import DaemonFactory, PeerSpawner

PEER_TIMEOUT = 60.0
WAIT = ["--wait", "10"]


async def run_peers(
    spawn: PeerSpawner, daemon: DaemonProcess | str, plugin: str, *options: Sequence[str]
) -> list[PeerProcess]:
    """Run one peer of ``plugin`` per option list, concurrently, to their exit."""
    peers = [
        await spawn(daemon, plugin, args, peer_args=WAIT, wait_running=False) for args in options
    ]
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
    (["--checksum", "md5"], "invalid choice"),
    (["--corrupt-every", "-1"], "--corrupt-every must not be negative"),
    (["--partner", "-1"], "--partner must be a peer id 0..65535, got -1"),
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
    """The first peer reserves its pair's region when it starts waiting: a shared memory
    too small says so at once, without a partner."""
    async with start_daemon(vectors=1, size="64K") as daemon:
        (peer,) = await run_peers(ivshmem_peers, daemon, "ring", ["--ring-size", "1M"])
    assert peer.returncode == 1
    error = last(peer, "error")["message"]
    assert error == (
        "ring: no room for a ring pair's region (1052672 bytes) in the shared memory: 65536 "
        "bytes, 0 held by 0 regions, 4096 for the directory; give the daemon more "
        "(ivshmemd -l, ivshmemctl up --size) or ask for less"
    )
    assert "Traceback" not in stderr(peer)


async def test_eight_ring_peers_are_four_pairs_in_the_default_shared_memory(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    """Issue 11, item 3: ring peers with 2 vectors and crc32 used to share one ring at
    offset 0 and fail ("no ring header", "impossible head") or hang. Now they are pairs, each
    with its ring in its own region, and four pairs fit in the daemon's default 4M at once
    (tests/peers/test_pairing.py checks that regions never overlap)."""
    async with start_daemon(vectors=2, size="4M") as daemon:
        options = ["--bytes", "4M", "--message-size", "4K", "--checksum", "crc32"]
        peers = await ivshmem_peers.many(daemon, "ring", 8, options, peer_args=WAIT)
        for peer in peers:
            await peer.wait_exit(PEER_TIMEOUT)
    partner = {}
    for peer in peers:
        assert peer.returncode == 0, peer.describe()
        assert last(peer, "ring")["checksum_errors"] == 0
        assert last(peer, "ring")["bytes"] == 4 << 20
        partner[peer.peer_id] = last(peer, "paired")["partner"]
    assert all(partner[partner[me]] == me for me in partner), partner
    assert sorted(last(p, "ring")["role"] for p in peers) == ["consumer"] * 4 + ["producer"] * 4
