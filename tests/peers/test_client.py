"""The peer-side client (``peers.client``) against recorded QEMU streams and broken servers.

A tiny in-test server replays, over a real unix socket with real fds, exactly what QEMU's
ivshmem-server sent (the golden traces), or a deliberately broken stream; the client must
build the right view from the former and fail with a clear error (leaking no fd) on the
latter.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from ivshmemd import wire
from peers.client import ClientError, PeerLeft, PeerVector, ServerGone, connect, ring_eventfd

TRACES = json.loads(
    (
        Path(__file__).resolve().parents[3] / "shared/testdata/qemu-ivshmem-server-traces.json"
    ).read_text()
)


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def serve_stream(
    listener: socket.socket, messages: Sequence[tuple[int, int]], raw_tail: bytes = b""
) -> None:
    """Accept one client and send ``(value, fd count)`` messages, then ``raw_tail``, then
    close. fds are fresh memfds/eventfds (the shm message gets a sized memfd)."""
    await trio.lowlevel.wait_readable(listener)
    conn, _ = listener.accept()
    made: list[int] = []
    try:
        for value, nfds in messages:
            fds = []
            for _ in range(nfds):
                if value == -1:
                    fd = os.memfd_create("shm")
                    os.ftruncate(fd, 1 << 20)
                else:
                    fd = os.eventfd(0, os.EFD_NONBLOCK)
                fds.append(fd)
            made.extend(fds)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            conn.sendmsg([wire.encode(value)], anc)
        if raw_tail:
            conn.sendall(raw_tail)
    finally:
        conn.close()
        for fd in made:
            os.close(fd)


def _listener(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    return listener, path


@pytest.mark.parametrize("name", ["C", "D"])
async def test_client_understands_qemu_streams(tmp_path: Path, name: str) -> None:
    """Replay what QEMU's server sent client C and D (2 vectors) and check the view."""
    stream = TRACES["join_leave_2_vectors"]["streams"][name]
    own = TRACES["join_leave_2_vectors"]["ids"][name]
    listener, path = _listener(tmp_path)
    before = _open_fds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, listener, [(v, int(fd)) for v, fd in stream])
        client = await connect(path, vectors=2)
        try:
            assert client.peer_id == own
            assert client.shm_size == 1 << 20
            assert len(client.own_vectors) == 2
            events = []
            try:
                while True:
                    events.append(await client.next_event())
            except ServerGone:
                pass
            # the replayed stream ends with the server closing: what is left is the view
            # of a peer that saw B leave, D (or C) join, and A leave
            assert sorted(client.peers) == sorted({"C": [3], "D": [2]}[name])
            assert all(len(v) == 2 for v in client.peers.values())
        finally:
            client.close()
    listener.close()
    assert _open_fds() <= before  # every fd received was closed (and the listener too)


@pytest.mark.parametrize(
    ("messages", "tail", "error"),
    [
        ([(1, 0)], b"", "unsupported protocol version 1"),
        ([(0, 0), (5, 0), (-1, 0)], b"", "shared-memory message without its fd"),
        ([(0, 0), (5, 0), (-1, 1), (-1, 1)], b"", "a second shared-memory message"),
        ([(0, 0), (5, 0), (-1, 1), (3, 2)], b"", "carries 2 fds"),
        ([(0, 0), (5, 0), (-1, 1)], b"\x07\x00\x00", "truncated message"),
        ([(0, 1)], b"", "version message carries an fd"),
        ([(0, 0), (70000, 0)], b"", "out of range"),
        ([(0, 0)], b"", "closed the connection"),
    ],
)
async def test_client_rejects_broken_streams_clearly(
    tmp_path: Path, messages: list[tuple[int, int]], tail: bytes, error: str
) -> None:
    listener, path = _listener(tmp_path)
    before = _open_fds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, listener, messages, tail)
        with pytest.raises(ClientError, match=error):
            client = await connect(path, vectors=1)
            try:
                while True:
                    await client.next_event()
            finally:
                client.close()
    listener.close()
    assert _open_fds() <= before


async def test_no_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match=r"cannot connect to .*nothing\.sock"):
        await connect(str(tmp_path / "nothing.sock"))


async def test_a_departed_peers_eventfds_stay_open_until_its_leave_is_handled(
    tmp_path: Path,
) -> None:
    """A leave notice is handled (the departed peer's last rings delivered, the plugin
    possibly ringing back) before its eventfds are closed: closing them on receipt made that
    ring hit a closed fd, or worse an unrelated fd that reused the number. They are closed
    when the next event is asked for, or with the client."""
    listener, path = _listener(tmp_path)
    before = _open_fds()
    stream = [(0, 0), (5, 0), (-1, 1), (5, 1), (3, 1), (3, 0)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, listener, stream)
        client = await connect(path, vectors=1)
        try:
            joined = await client.next_event()
            assert isinstance(joined, PeerVector) and joined.peer_id == 3
            left = await client.next_event()
            assert isinstance(left, PeerLeft) and left.peer_id == 3
            os.fstat(joined.fd)  # still open (EBADF before the fix)
            assert ring_eventfd(joined.fd)  # a plugin answering its last doorbell
            with pytest.raises(ServerGone):
                await client.next_event()
        finally:
            client.close()
    listener.close()
    assert _open_fds() <= before  # and closed in the end: nothing leaked
