"""A peer reports the shm pages it wrote to its daemon's memory log before every doorbell
(issue 13, the peers' side), with real processes: a real daemon, a real peer running the
test-only ``memwriter`` plugin, and the test itself as both the memory log's listener (a
``SOCK_SEQPACKET`` server at ``SOCK.memlog``, decoding with :func:`ivshmemd.memlog.decode`)
and the rung peer (an ordinary client of the daemon, with its own eventfd).

Each doorbell is checked where it lands: when the test's eventfd fires, the report of the
pages written before it must already be readable on the memory log (read without waiting).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from ivshmemd.memlog import MAX_PACKET, Dirty, MemlogHello, decode, memlog_path
from peers.client import IvshmemClient, PeerVector, connect, read_vector, ring_eventfd
from peers.harness import PeerProcess
from peers.memreport import SEND_TIMEOUT
from peers.pytest_plugin import DaemonFactory, PeerSpawner

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
SIZE = 1 << 20
NPAGES = SIZE // 4096
WAIT = 20.0
#: (write path, pages it writes) and the pages the report must name (None: no report)
SCRIPT: list[tuple[str, str, list[int] | None]] = [
    ("vcpu", "3,70,200", [3, 70, 200]),
    ("write64", "5", [5]),
    ("span", "10-12", [10, 11, 12]),
    ("touch", "20,22,23", [20, 22, 23]),
    ("nested", "30,31", [30, 31]),
    ("device", "40", [40]),
    ("directory", "", [NPAGES - 1]),  # the shared-memory directory: the last page
    ("none", "", None),  # nothing written: no report
    ("vcpu", "3", [3]),  # written again after its report: reported again
    ("write64", "5,6", [5, 6]),
]


@contextmanager
def memlog_listener(socket_path: str, *, listen: bool = True) -> Iterator[socket.socket]:
    """The memory log's listening socket beside the daemon's (removed afterwards: we made
    it). ``listen=False``: bound, not listening (a connect is refused)."""
    path = memlog_path(socket_path)
    sock = socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    )
    try:
        sock.bind(path)
        if listen:
            sock.listen(4)
        yield sock
    finally:
        sock.close()
        os.unlink(path)


async def accept(listener: socket.socket) -> socket.socket:
    with trio.fail_after(WAIT):
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            return conn


async def receive(conn: socket.socket) -> bytes:
    """The next packet (b"" once the peer closed the channel)."""
    with trio.fail_after(WAIT):
        while True:
            try:
                return conn.recv(MAX_PACKET)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)


def received_now(conn: socket.socket) -> bytes | None:
    """The next packet if one is queued now, else None (never waits)."""
    try:
        return conn.recv(MAX_PACKET)
    except BlockingIOError:
        return None


@asynccontextmanager
async def receiver(socket_path: str) -> AsyncIterator[IvshmemClient]:
    """The rung peer: an ordinary client of the daemon, with one own vector."""
    client = await connect(socket_path, vectors=1)
    try:
        yield client
    finally:
        client.close()


async def joined(client: IvshmemClient, peer_id: int) -> int:
    """Wait until ``client`` knows ``peer_id``; its vector 0's eventfd."""
    with trio.fail_after(WAIT):
        while peer_id not in client.peers:
            event = await client.next_event()
            assert isinstance(event, PeerVector), event
    return client.peers[peer_id][0]


async def rung(fd: int) -> None:
    """Wait until our eventfd is rung, and consume it."""
    with trio.fail_after(WAIT):
        while not read_vector(fd):
            await trio.lowlevel.wait_readable(fd)


def memlog_lines(peer: PeerProcess) -> list[str]:
    logs = [event["message"] for event in peer.events if event.get("event") == "log"]
    return [line for line in logs if "memory log" in line]


@pytest.mark.parametrize("loop", ["trio", "fast-path"])
async def test_every_write_path_is_reported_before_its_doorbell_lands(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, loop: str
) -> None:
    script = ";".join(f"{path}:{pages}" for path, pages, _ in SCRIPT)
    async with start_daemon(vectors=1, size="1M") as daemon:
        with memlog_listener(daemon.socket_path) as listener:
            async with receiver(daemon.socket_path) as me:
                peer = await ivshmem_peers(
                    daemon, "memwriter", ["--to", str(me.peer_id), "--script", script],
                    pythonpath=[PLUGIN_DIR], peer_args=[f"--{loop}"],
                )  # fmt: skip
                conn = await accept(listener)
                try:
                    hello = decode(await receive(conn))
                    directory = ((NPAGES - 1) * 4096, 4096)  # host-local: never replicated
                    assert hello == MemlogHello(peer.peer_id, 4096, NPAGES, (directory,))
                    back = await joined(me, peer.peer_id)
                    for path, _pages, expected in SCRIPT:
                        await rung(me.own_vectors[0])
                        # the doorbell landed: what was written before it is readable now
                        packet = received_now(conn)
                        if expected is None:
                            assert packet is None, f"{path}: a report with nothing written"
                        else:
                            assert packet is not None, f"{path}: no report before the ring"
                            report = decode(packet, npages=NPAGES)
                            assert isinstance(report, Dirty)
                            assert report.pages().tolist() == expected, path
                        assert ring_eventfd(back)  # the next step
                    assert await peer.wait_finished() == f"memwriter: {len(SCRIPT)} steps"
                    assert not memlog_lines(peer)
                    assert await receive(conn) == b""  # the peer closed its channel
                finally:
                    conn.close()


@pytest.mark.parametrize("listener", ["none", "refusing"])
async def test_a_peer_without_a_listener_runs_as_before(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, listener: str
) -> None:
    async with start_daemon(vectors=1, size="1M") as daemon:
        with contextmanager_or_none(listener, daemon.socket_path):
            async with receiver(daemon.socket_path) as me:
                peer = await ivshmem_peers(
                    daemon, "memwriter", ["--to", str(me.peer_id), "--script", "vcpu:1;vcpu:2"],
                    pythonpath=[PLUGIN_DIR],
                )  # fmt: skip
                back = await joined(me, peer.peer_id)
                for _ in range(2):
                    await rung(me.own_vectors[0])
                    assert ring_eventfd(back)
                assert await peer.wait_finished() == "memwriter: 2 steps"
                assert not memlog_lines(peer)  # nobody listening is no failure: not a word


@contextmanager
def contextmanager_or_none(kind: str, socket_path: str) -> Iterator[None]:
    """Nothing at ``SOCK.memlog``, or a socket bound there that does not listen."""
    if kind == "none":
        yield
        return
    with memlog_listener(socket_path, listen=False):
        yield


async def test_a_listener_that_stops_reading_is_given_up_and_the_peer_goes_on(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    """The daemon stops reading: the peer's reports fill the channel, the one that finds
    no room for ``SEND_TIMEOUT`` seconds closes it, and every doorbell still lands."""
    flood = 20000  # far more reports than a unix socket queues
    async with start_daemon(vectors=1, size="1M") as daemon:
        with memlog_listener(daemon.socket_path) as listener:
            async with receiver(daemon.socket_path) as me:
                peer = await ivshmem_peers(
                    daemon, "memwriter", ["--to", str(me.peer_id), "--flood", str(flood)],
                    pythonpath=[PLUGIN_DIR],
                )  # fmt: skip
                conn = await accept(listener)  # and never read, until the peer is done
                try:
                    summary = await peer.wait_finished(timeout=WAIT + SEND_TIMEOUT)
                    assert summary == f"memwriter: flooded {flood} rings"
                    lines = memlog_lines(peer)
                    assert len(lines) == 1 and "did not take a report within 2 s" in lines[0]
                    assert os.eventfd_read(me.own_vectors[0]) == flood  # every ring landed
                    packets = 0
                    while packet := await receive(conn):
                        packets += 1
                        decode(packet, npages=NPAGES)
                    assert 1 < packets < flood  # the hello and some reports, then EOF
                finally:
                    conn.close()
