"""Crash survival with systemd's fd store (issue 14): the test plays systemd (a NOTIFY_SOCKET
that keeps the FDSTORE fds, then starts the daemon again with LISTEN_FDS/LISTEN_PID/
LISTEN_FDNAMES), kills the daemon with SIGKILL under traffic, and checks that no peer
noticed: no EOF, no join or leave but for the peer that really left while it was down."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from ivshmemd.fdstore import LISTEN, SHM, peer_names, remote_names
from ivshmemd.shm import unlink_posix_shm
from ivshmemd.supervise import daemon_command, daemon_process, unique_name
from ivshmemd.supervise.fabric import (
    MEMBER_UP,
    federation_args,
    federation_endpoints,
    host_id_ranges,
)
from peers.pytest_plugin import PeerProcess, PeerSpawner
from tests.fakesystemd import FakeSystemd
from tests.handover_tools import peer_table, read_greeting, ring_reaches
from tests.rawclient import RawClient

VECTORS = 2


@pytest.fixture
async def systemd(tmp_path: Path) -> AsyncIterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.run)
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()
            fake.close()


async def _served_on(
    socket_path: str,
    before: list[dict[str, Any]],
    early: RawClient,
    a: RawClient,
    b: RawClient,
    pingers: list[PeerProcess],
) -> None:
    """The restarted daemon serves every old peer and the one that waited in the backlog."""
    early_id = await read_greeting(early, VECTORS)
    assert early_id == max(row["id"] for row in before) + 1  # the allocator went on
    listed = early.view()  # every old peer but c (a pinger may have finished meanwhile)
    assert {0, 1} <= set(listed) <= {row["id"] for row in before} - {2}
    assert set(listed.values()) == {VECTORS}
    after = peer_table(socket_path)
    survivors = [row for row in before if row["id"] in {r["id"] for r in after}]
    assert [r for r in after if r["id"] != early_id] == survivors
    for client in (a, b):
        await client.wait_for((2, False))  # c's leave, announced now
        await client.wait_for((early_id, True), count=VECTORS)
    for v in range(VECTORS):
        ring_reaches(early, a, 0, v)
        ring_reaches(b, early, early_id, v)
    for pinger in pingers:
        await pinger.wait_finished()
        assert await pinger.wait_exit() == 0
        assert not pinger.matching(event="peer-left", peer_id=0)
    early.close()


@asynccontextmanager
async def _service(
    fake: FakeSystemd, argv: list[str], log: Path, ready: int
) -> AsyncIterator[trio.Process]:
    """The daemon as systemd starts it: the store passed back, its runtime directory (that
    of the log), ``ready``-th READY=1 awaited."""
    command, fds = fake.command(argv)
    env = {**os.environ, **fake.environment(), "RUNTIME_DIRECTORY": str(log.parent)}
    with log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            command, pass_fds=fds, env=env, stdin=subprocess.DEVNULL, stderr=out
        )
    try:
        await fake.wait(ready, READY="1")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_kill_9_under_traffic_loses_no_peer(
    systemd: FakeSystemd, tmp_path: Path, ivshmem_peers: PeerSpawner
) -> None:
    socket_path = str(tmp_path / "iv.sock")
    shm = unique_name()
    argv = daemon_command(socket_path, shm, VECTORS)
    runtime = tmp_path / "run"
    runtime.mkdir()
    log = runtime / "daemon.log"
    try:
        async with _service(systemd, argv, log, ready=1) as first:
            assert systemd.names()[:2] == [LISTEN, SHM]
            a = await RawClient.connect(socket_path)
            await a.read(3 + VECTORS)
            b = await RawClient.connect(socket_path)
            await b.read(3 + 2 * VECTORS)
            await a.read(VECTORS)
            c = await RawClient.connect(socket_path)  # leaves while the daemon is down
            await c.read(3 + 3 * VECTORS)
            await a.read(VECTORS)
            await b.read(VECTORS)
            pingers = [await ivshmem_peers(socket_path, "ping", ["--count", "150000"])
                       for _ in "xy"]  # fmt: skip
            for client in (a, b, c):
                await client.read(2 * VECTORS)
            assert systemd.names() == [
                LISTEN, SHM, *(n for i in [0, 1, 2, *(p.peer_id for p in pingers)]
                               for n in peer_names(i, VECTORS))
            ]  # fmt: skip
            before = peer_table(socket_path)
            await pingers[0].wait_event(event="progress")  # traffic is running
            first.send_signal(signal.SIGKILL)
            await first.wait()
        marks = (len(a.stream), len(b.stream))
        c.close()  # hangs up while no daemon runs
        early = await RawClient.connect(socket_path)  # waits in the kept socket's backlog
        async with _service(systemd, argv, log, ready=2) as second:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.drain)  # an EOF fails the test
                nursery.start_soon(b.drain)
                await _served_on(socket_path, before, early, a, b, pingers)
                nursery.cancel_scope.cancel()
            second.send_signal(signal.SIGTERM)
            assert await second.wait() == 0
        early_id = early.stream[1][0]
        for client, mark in ((a, marks[0]), (b, marks[1])):
            since = [m for m in client.stream[mark:] if m[0] not in {p.peer_id for p in pingers}]
            assert since[0] == (2, False) and since[1 : 1 + VECTORS] == [(early_id, True)] * VECTORS
        text = log.read_text()
        assert "peer 2 left: it hung up while the daemon was down" in text
        assert "restarted with the fds systemd kept" in text
        assert systemd.names() == [], "a clean stop leaves nothing in the store"
        assert not (runtime / "iv.sock.state").exists()
        a.close()
        b.close()
    finally:
        unlink_posix_shm(shm)


async def _drain(client: RawClient, scope: trio.CancelScope) -> None:
    with scope:
        await client.drain()


async def test_kill_9_of_a_federated_daemon_keeps_its_remote_peers(
    systemd: FakeSystemd, tmp_path: Path
) -> None:
    """The remote peers' eventfds are in the store too: after the restart, the new
    federation process's members announce them again and the daemon keeps them (the same
    eventfds, no leave or join for its local peers); a remote peer that is gone by then
    is announced as left once --federation-timeout has passed."""
    endpoints = federation_endpoints(tmp_path, 2)
    first_b, first_a = (lo for lo, _hi in host_id_ranges(2))
    socket_path = str(tmp_path / "a.sock")
    shm = unique_name()
    argv = daemon_command(socket_path, shm, 1, args=federation_args(endpoints, 1, timeout=3))
    runtime = tmp_path / "run"
    runtime.mkdir()
    log = runtime / "daemon.log"
    try:
        async with (
            daemon_process(tmp_path, args=federation_args(endpoints, 0)) as b,
            trio.open_nursery() as nursery,
        ):
            async with _service(systemd, argv, log, ready=1) as first:
                await b.wait_log(MEMBER_UP)
                on_b = await RawClient.connect(b.socket_path)
                await on_b.read(3)
                nursery.start_soon(on_b.drain)  # B and its clients live on
                gone = await RawClient.connect(b.socket_path)  # leaves while A is down
                on_a = await RawClient.connect(socket_path)
                await on_a.read(3)
                draining = trio.CancelScope()
                nursery.start_soon(_drain, on_a, draining)  # an EOF fails the test
                await on_a.wait_for((first_b + 1, True))
                await on_a.wait_for((on_a.stream[1][0], True))  # its own vector
                # the daemon has finished admitting it (and journaled it): it answers after
                assert on_a.stream[1][0] in {row["id"] for row in peer_table(socket_path)}
                assert remote_names(first_b, 1)[0] in systemd.names()
                first.send_signal(signal.SIGKILL)
                await first.wait()
            mark = len(on_a.stream)
            await on_b.wait_for((first_a, False))  # A's old incarnation's peer
            gone.close()
            async with _service(systemd, argv, log, ready=2) as second:
                await on_b.wait_for((first_a, True), count=2)  # A's peer, again
                await on_a.wait_for((first_b + 1, False))  # after the timeout
                assert on_a.stream[mark:] == [(first_b + 1, False)]  # nothing else
                os.eventfd_write(on_a.vector_fds(first_b)[0], 3)  # the old eventfd
                own = on_b.vector_fds(first_b)[0]
                with trio.fail_after(30):
                    await trio.lowlevel.wait_readable(own)
                assert os.eventfd_read(own) == 3
                draining.cancel()
                second.send_signal(signal.SIGTERM)
                assert await second.wait() == 0
            nursery.cancel_scope.cancel()
        text = log.read_text()
        assert "restarted with the fds systemd kept" in text
        assert "1 remote peers restored after a crash were not announced again" in text
        assert systemd.names() == []
        on_a.close()
        on_b.close()
    finally:
        unlink_posix_shm(shm)
