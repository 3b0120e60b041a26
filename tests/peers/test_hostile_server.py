"""The peer client against servers that split, lie and stall (issue 8, points 12 and 13).

A tiny in-test server sends, over a real unix socket with real fds, either QEMU's recorded
streams cut into pieces at arbitrary bytes (a legal stream: the client must see exactly the
events it sees from the whole messages), or a handshake whose fds are not what they claim
(the client must refuse it with a clear error and leak no fd), or nothing at all.
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmemd import wire
from peers.client import ClientError, PeerLeft, PeerVector, ServerGone, connect

TIMEOUT = 30.0

TRACES = json.loads(
    (
        Path(__file__).resolve().parents[3] / "shared/testdata/qemu-ivshmem-server-traces.json"
    ).read_text()
)
#: (trace, client, vectors): every recorded stream of QEMU's server
STREAMS = (
    [("join_leave_2_vectors", name, 2) for name in TRACES["join_leave_2_vectors"]["streams"]]
    + [("zero_vectors", name, 0) for name in TRACES["zero_vectors"]["streams"]]
    + [("client_writes_is_dropped", "A", 1)]
)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def make_fd(value: int) -> int:
    if value == -1:
        fd = os.memfd_create("shm")
        os.ftruncate(fd, 1 << 20)
        return fd
    return os.eventfd(0, os.EFD_NONBLOCK)


Chunk = tuple[bytes, int | None]  # bytes to send in one sendmsg, and the fd riding on it


def chunks_of(
    stream: Sequence[tuple[int, bool]], cuts: list[int], merges: list[bool]
) -> list[tuple[bytes, bool]]:
    """Cut every message at the offsets in ``cuts`` (bit i of a message's cut mask: cut after
    byte i+1), then merge neighbouring pieces where ``merges`` says so, except that a piece
    starting a message with an fd always starts a chunk (its fd rides on that chunk)."""
    pieces: list[tuple[bytes, bool]] = []  # (bytes, starts a message carrying an fd)
    for index, (value, carries) in enumerate(stream):
        data = wire.encode(value)
        mask = cuts[index % len(cuts)] if cuts else 0
        start = 0
        for offset in range(1, wire.MESSAGE_SIZE):
            if mask >> (offset - 1) & 1:
                pieces.append((data[start:offset], carries and start == 0))
                start = offset
        pieces.append((data[start:], carries and start == 0))
    chunks: list[tuple[bytes, bool]] = []
    for index, (data, fd_start) in enumerate(pieces):
        merge = merges[index % len(merges)] if merges else False
        if chunks and merge and not fd_start:
            prev, prev_fd = chunks[-1]
            chunks[-1] = (prev + data, prev_fd)
        else:
            chunks.append((data, fd_start))
    return chunks


async def serve_chunks(listener: socket.socket, stream: Sequence[tuple[int, bool]],
                       chunks: list[tuple[bytes, bool]]) -> None:  # fmt: skip
    """Accept one client; send the chunks, a fresh fd riding on each chunk that starts an
    fd-carrying message (in stream order); then close."""
    await trio.lowlevel.wait_readable(listener)
    conn, _ = listener.accept()
    fd_values = [value for value, carries in stream if carries]
    made: list[int] = []
    try:
        for data, fd_start in chunks:
            anc = []
            if fd_start:
                fd = make_fd(fd_values.pop(0))
                made.append(fd)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            conn.sendmsg([data], anc)
    finally:
        conn.close()
        for fd in made:
            os.close(fd)


def abstract_listener() -> tuple[socket.socket, str]:
    path = f"\0ivshmem-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    return listener, path


async def events_seen(stream: Sequence[tuple[int, bool]], vectors: int,
                      chunks: list[tuple[bytes, bool]]) -> list[Any]:  # fmt: skip
    """What the client reports for a stream sent as ``chunks``: its welcome and every event."""
    listener, path = abstract_listener()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_chunks, listener, stream, chunks)
            client = await connect(path, vectors=vectors)
            try:
                seen: list[Any] = [("welcome", client.peer_id, len(client.own_vectors))]
                try:
                    while True:
                        event = await client.next_event()
                        if isinstance(event, PeerVector):
                            seen.append(("vector", event.peer_id, event.index, event.own))
                        else:
                            assert isinstance(event, PeerLeft)
                            seen.append(("left", event.peer_id))
                except ServerGone:
                    pass
                seen.append(("view", sorted((p, len(v)) for p, v in client.peers.items())))
                return seen
            finally:
                client.close()
    finally:
        listener.close()


def whole(stream: Sequence[tuple[int, bool]]) -> list[tuple[bytes, bool]]:
    return chunks_of(stream, [], [])


@pytest.mark.parametrize(("trace", "name", "vectors"), STREAMS)
def test_a_stream_split_anywhere_gives_the_same_events(trace: str, name: str,
                                                         vectors: int) -> None:  # fmt: skip
    stream = [(int(v), bool(fd)) for v, fd in TRACES[trace]["streams"][name]]
    reference = trio.run(events_seen, stream, vectors, whole(stream))
    assert reference[0][0] == "welcome"
    before = open_fds()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        cuts=st.lists(st.integers(0, 127), min_size=1, max_size=len(stream)),
        merges=st.lists(st.booleans(), min_size=1, max_size=16),
    )
    def split(cuts: list[int], merges: list[bool]) -> None:
        chunks = chunks_of(stream, cuts, merges)
        assert b"".join(data for data, _ in chunks) == b"".join(d for d, _ in whole(stream))
        assert trio.run(events_seen, stream, vectors, chunks) == reference

    split()
    assert open_fds() <= before


def test_the_3_plus_5_split_of_the_issue() -> None:
    stream = [(int(v), bool(fd)) for v, fd in TRACES["join_leave_2_vectors"]["streams"]["A"]]
    chunks = chunks_of(stream, [0b100], [False])  # every message as 3 bytes, then 5
    assert [len(data) for data, _ in chunks[:2]] == [3, 5]
    assert trio.run(events_seen, stream, 2, chunks) == trio.run(
        events_seen, stream, 2, whole(stream)
    )


# --- point 13: every fd is checked on receipt -------------------------------------------------


def _memfd(size: int) -> int:
    fd = os.memfd_create("shm")
    os.ftruncate(fd, size)
    return fd


def _read_only_memfd() -> int:
    writable = _memfd(1 << 20)
    try:
        return os.open(f"/proc/self/fd/{writable}", os.O_RDONLY)
    finally:
        os.close(writable)


def _pipe() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def _socket() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _directory() -> int:
    return os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDWR)


def _regular_file() -> int:
    return os.open(sys.executable, os.O_RDONLY)


BAD_SHM: list[tuple[str, Callable[[], int], str]] = [
    ("empty", lambda: _memfd(0), "has 0 bytes"),
    ("100 B", lambda: _memfd(100), "has 100 bytes"),
    ("12 KiB", lambda: _memfd(12 << 10), "has 12288 bytes"),
    ("read-only", _read_only_memfd, "not writable"),
    ("pipe", _pipe, "is a pipe"),
    ("directory", _directory, "is a directory"),
    ("socket", _socket, "is a socket"),
    ("/dev/null", _devnull, "is a character device (/dev/null)"),
]
BAD_VECTOR: list[tuple[str, Callable[[], int], str]] = [
    ("pipe", _pipe, "is a pipe, not an eventfd"),
    ("file", _regular_file, "is a regular file, not an eventfd"),
    ("socket", _socket, "is a socket, not an eventfd"),
    ("memfd", lambda: _memfd(4096), "is a regular file, not an eventfd"),
]


Factory = Callable[[], int]


async def serve_messages(
    listener: socket.socket, messages: Sequence[tuple[int, Factory | None]]
) -> None:
    """Accept one client and send ``(value, fd factory or None)`` messages, then wait for
    the client to hang up."""
    await trio.lowlevel.wait_readable(listener)
    conn, _ = listener.accept()
    conn.setblocking(False)
    try:
        for value, factory in messages:
            anc = []
            fd = None if factory is None else factory()
            if fd is not None:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            conn.sendmsg([wire.encode(value)], anc)
            if fd is not None:
                os.close(fd)
        await trio.lowlevel.wait_readable(conn)
    finally:
        conn.close()


def good_shm() -> int:
    return _memfd(1 << 20)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK)


@pytest.mark.parametrize(("label", "factory", "message"), BAD_SHM, ids=[b[0] for b in BAD_SHM])
async def test_a_bad_shm_fd_is_refused_clearly(
    label: str, factory: Callable[[], int], message: str
) -> None:
    await refused([(0, None), (4, None), (-1, factory), (4, eventfd)], message)


@pytest.mark.parametrize(
    ("label", "factory", "message"), BAD_VECTOR, ids=[b[0] for b in BAD_VECTOR]
)
@pytest.mark.parametrize("whose", ["own", "peer"])
async def test_a_vector_that_is_not_an_eventfd_is_refused_clearly(
    label: str, factory: Callable[[], int], message: str, whose: str
) -> None:
    if whose == "own":
        stream = [(0, None), (4, None), (-1, good_shm), (4, factory)]
        await refused(stream, f"our own vector 0 {message}")
    else:
        stream = [(0, None), (4, None), (-1, good_shm), (2, factory), (4, eventfd)]
        await refused(stream, f"peer 2's vector 0 {message}")


async def refused(messages: Sequence[tuple[int, Callable[[], int] | None]], message: str) -> None:
    listener, path = abstract_listener()
    before = open_fds()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_messages, listener, messages)
            with pytest.raises(ClientError, match=re.escape(message)):
                client = await connect(path, vectors=1)
                client.close()
    finally:
        listener.close()
    assert open_fds() <= before


async def test_a_server_that_accepts_and_says_nothing_is_reported_as_such() -> None:
    listener, path = abstract_listener()
    try:
        expected = "accepted the connection but did not complete the handshake within 0.3 s"
        with pytest.raises(ClientError, match=re.escape(expected)):
            await connect(path, vectors=1, timeout=0.3)
    finally:
        listener.close()


def test_ivshmem_peer_says_what_was_wrong_in_one_line(tmp_path: Path) -> None:
    """Through the command line: a bad shm fd is one line and exit 1, no traceback."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)

    async def run() -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_messages, listener, [(0, None), (4, None), (-1, _pipe)])
                result = await trio.run_process(
                    [sys.executable, "-m", "peers", "-S", path, "--wait", "5", "--plugin",
                     "monitor"],
                    capture_stderr=True, check=False,
                )  # fmt: skip
                nursery.cancel_scope.cancel()  # (a peer that never connected: stop serving)
                return result

    try:
        result = trio.run(run)
    finally:
        listener.close()
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "the server's shared memory is a pipe" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "x"])
def test_ivshmem_peer_refuses_a_bad_wait(wait: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peers", "--wait", wait, "--plugin", "monitor"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--wait" in result.stderr and "Traceback" not in result.stderr


def test_ivshmem_peer_with_no_server_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peers", "-S", str(tmp_path / "none.sock"), "--wait", "0",
         "--plugin", "monitor"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no ivshmem server answered on" in result.stderr
    assert "it does not exist" in result.stderr and "Traceback" not in result.stderr
