"""The daemon under stress: slow peers, limits, fd exhaustion, churn and scale."""

from __future__ import annotations

import os
import socket
from typing import Any

import trio

from tests.rawclient import RawClient


async def join(path: str, vectors: int, others: list[RawClient]) -> RawClient:
    """Connect a raw client and read its whole greeting and every join notice it causes."""
    client = await RawClient.connect(path)
    await client.read(3 + vectors * (len(others) + 1))
    for other in others:
        await other.read(vectors)
    return client


def count_expected(vectors: int, peers_before: int, joins_after: int) -> int:
    return 3 + vectors * (peers_before + 1) + vectors * joins_after


async def test_a_peer_that_does_not_read_delays_nobody_and_loses_nothing(
    start_daemon: Any,
) -> None:
    vectors = 64
    async with start_daemon(vectors=vectors, args=["--send-timeout", "60"]) as daemon:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(daemon.socket_path)
        await daemon.wait_log("peer 0 joined")
        clients: list[RawClient] = []
        try:
            for _ in range(12):  # 12 x 64 messages with fds: far beyond the slow socket buffer
                clients.append(await join(daemon.socket_path, vectors, clients))
            # everyone else got everything while the slow peer sat on a full buffer
            assert daemon.count("left") == 0
            # now the slow peer reads: every message is there, in order, nothing dropped
            slow.setblocking(False)
            reader = RawClient(slow)
            stream = await reader.read(count_expected(vectors, 0, len(clients)))
            assert stream[:3] == [(0, False), (0, False), (-1, True)]
            joined = [value for value, _fd in stream[3 + vectors :]]
            assert joined == [p for p in range(1, 13) for _ in range(vectors)]
            reader.close()
        finally:
            slow.close()
            for client in clients:
                client.close()


async def test_a_peer_that_never_reads_is_disconnected_and_others_told(
    start_daemon: Any,
) -> None:
    vectors = 64
    async with start_daemon(vectors=vectors, args=["--send-timeout", "2"]) as daemon:
        clients: list[RawClient] = []
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            async with trio.open_nursery() as nursery:
                observer = await RawClient.connect(daemon.socket_path)
                clients.append(observer)
                nursery.start_soon(observer.drain)
                await daemon.wait_log("peer 0 joined")
                slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                slow.connect(daemon.socket_path)
                await daemon.wait_log("peer 1 joined")
                # 10 joins x 64 fds: far more than the slow peer's socket buffer holds
                for _ in range(10):
                    newcomer = await RawClient.connect(daemon.socket_path)
                    clients.append(newcomer)
                    nursery.start_soon(newcomer.drain)
                    await daemon.wait_log(rf"peer {len(clients)} joined")
                line = (await daemon.wait_log(r"peer 1 left"))[0]
                assert "too slow" in line
                await observer.wait_for((1, False))
                # nobody else was dropped, and the observer heard every join in full
                assert daemon.count("left") == 1
                await observer.wait_for((len(clients), True), count=vectors)
                for peer_id in range(1, len(clients) + 1):
                    assert observer.stream.count((peer_id, True)) == vectors
                nursery.cancel_scope.cancel()
        finally:
            slow.close()
            for client in clients:
                client.close()


async def test_max_peers_refuses_with_a_reason(start_daemon: Any) -> None:
    async with start_daemon(vectors=1, args=["--max-peers", "2"]) as daemon:
        a = await join(daemon.socket_path, 1, [])
        b = await join(daemon.socket_path, 1, [a])
        refused = await RawClient.connect(daemon.socket_path)
        try:
            assert await refused.read_eof() == []
            assert "maximum of 2 peers" in (await daemon.wait_log("refused"))[0]
            b.close()
            await a.read(1)
            c = await join(daemon.socket_path, 1, [a])
            assert c.stream[1] == (2, False)  # a refusal consumes no id
            c.close()
        finally:
            a.close()
            refused.close()


async def test_fd_exhaustion_refuses_newcomers_and_keeps_serving(start_daemon: Any) -> None:
    vectors = 8
    async with start_daemon(vectors=vectors, wrapper=["prlimit", "--nofile=64"]) as daemon:
        clients: list[RawClient] = []
        try:
            while not daemon.count("refused"):
                candidate = await RawClient.connect(daemon.socket_path)
                # a refused newcomer gets EOF and no message at all; an admitted one its greeting
                await trio.lowlevel.wait_readable(candidate.sock)
                head = candidate.sock.recv(8, socket.MSG_PEEK)
                if not head:
                    candidate.close()
                    break
                await candidate.read(3 + vectors * (len(clients) + 1))
                for other in clients:
                    await other.read(vectors)
                clients.append(candidate)
                assert len(clients) < 20, "never ran out of fds"
            line = (await daemon.wait_log("refused"))[0]
            assert "out of file descriptors" in line and "kept for the control plane" in line
            assert daemon.fd_count() < 64 - 8  # refused while a reserve was still free
            assert len(clients) >= 2
            # the survivors still ring each other through the daemon's eventfds
            first, second = clients[0], clients[1]
            second_id = second.stream[1][0]
            os.eventfd_write(first.vector_fds(second_id)[3], 1)
            assert os.eventfd_read(second.vector_fds(second_id)[3]) == 1
            # a leave frees fds: the next newcomer is admitted
            clients.pop().close()
            for other in clients:
                await other.read(1)
            clients.append(await join(daemon.socket_path, vectors, clients))
        finally:
            for client in clients:
                client.close()


async def test_churn_keeps_fds_and_every_observer_sees_everything(start_daemon: Any) -> None:
    cycles = 1000
    async with start_daemon(vectors=1) as daemon:
        observers = [await join(daemon.socket_path, 1, []) for _ in range(1)]
        observers.append(await join(daemon.socket_path, 1, observers))
        fds_before = daemon.fd_count()
        try:
            for _ in range(cycles):
                churner = await join(daemon.socket_path, 1, observers)
                churner.close()
                for observer in observers:
                    await observer.read(1)
            # each observer saw every join (with its fd) and then its leave, in order
            for observer in observers:
                tail = observer.stream[-2 * cycles :]
                joins, leaves = tail[0::2], tail[1::2]
                ids = [value for value, _fd in joins]
                assert all(fd for _v, fd in joins)
                assert leaves == [(value, False) for value in ids]
                assert ids == list(range(2, 2 + cycles))
                for _value, fd in observer.fds[2:]:
                    os.close(fd)
                del observer.fds[2:]
            await daemon.wait_log(rf"peer {cycles + 1} left")
            assert daemon.fd_count() == fds_before
        finally:
            for observer in observers:
                observer.close()


async def test_a_thousand_peers_see_each_other(start_daemon: Any) -> None:
    """No select() limit: 1,000 peers x 1 vector connect, and each sees all the others."""
    peers = 1000
    # one test process reads for all 1,000 clients, so give them time: this test is about
    # function (a benchmark measures the speed: python -m ivshmemd.bench join)
    async with start_daemon(vectors=1, args=["--send-timeout", "120"]) as daemon:
        clients: list[RawClient] = []
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(peers):
                    client = await RawClient.connect(daemon.socket_path)
                    clients.append(client)
                    nursery.start_soon(client.drain)
                    client.close_fds_as_they_come = True
                for index, client in enumerate(clients):
                    # its greeting (3), one fd per earlier peer and its own, one per later peer
                    await client.wait_for((peers - 1, True), timeout=120)
                    ids = [v for v, fd in client.stream[3:] if fd]
                    assert sorted(ids) == list(range(peers)), index
                nursery.cancel_scope.cancel()
            assert daemon.count("joined") == peers
            assert daemon.count("refused") == 0
        finally:
            for client in clients:
                client.close()


async def test_peer_ids_come_from_the_configured_range(start_daemon: Any) -> None:
    """--peer-ids FIRST-LAST: ids start at FIRST, wrap within the range, and a full range
    refuses the newcomer."""
    async with start_daemon(vectors=0, args=["--peer-ids", "700-702"]) as daemon:
        clients = [await RawClient.connect(daemon.socket_path) for _ in range(3)]
        try:
            ids = [(await c.read(3))[1][0] for c in clients]
            assert ids == [700, 701, 702]
            extra = await RawClient.connect(daemon.socket_path)
            assert await extra.read_eof() == []
            assert "all 3 peer ids in 700..702 are in use" in (await daemon.wait_log("refused"))[0]
            extra.close()
            clients.pop(1).close()
            await daemon.wait_log("peer 701 left")
            again = await RawClient.connect(daemon.socket_path)
            clients.append(again)
            assert (await again.read(3))[1][0] == 701  # the counter wrapped to the free id
        finally:
            for client in clients:
                client.close()


async def test_clients_that_vanish_at_once_are_dropped_cleanly(start_daemon: Any) -> None:
    """Clients that close right after connecting (before their greeting is out) are dropped
    with their fds closed, and the daemon stays healthy and shuts down cleanly."""
    async with start_daemon(vectors=2) as daemon:
        fds_before = daemon.fd_count()
        for _ in range(50):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(daemon.socket_path)
            sock.close()
        await daemon.wait_log(r"peer \d+ left", count=50)
        assert daemon.fd_count() == fds_before  # closed by the time "left" is logged
        assert await daemon.stop() == 0
        assert daemon.count("fatal") == 0
