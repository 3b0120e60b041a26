"""The peer side of the ivshmem-server protocol, over trio.

:func:`connect` opens the server's unix socket and reads the stream strictly (version 0, own
id, shm fd, the other peers' vectors, our own vectors) through the sans-I/O
:class:`ivshmemd.protocol.ClientParser`; afterwards :meth:`IvshmemClient.next_event` yields
join notices (:class:`PeerVector`) and leave notices (:class:`PeerLeft`) as they come. It
works against QEMU's own server as well as ours: it relies only on the documented stream.

Every fd received is owned by the client and closed by :meth:`IvshmemClient.close` (or
handed back when a peer leaves); a protocol violation raises :class:`ClientError` with a clear
message after closing whatever came with the offending message.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

import trio

from ivshmemd import wire
from ivshmemd.protocol import (
    ClientParser,
    PeerLeft,
    PeerVector,
    ProtocolError,
    Welcome,
)

__all__ = [
    "ClientError",
    "IvshmemClient",
    "PeerLeft",
    "PeerVector",
    "ServerGone",
    "ServerUnreachable",
    "connect",
    "connect_with_retry",
]

#: Without a known vector count, how long to wait for our own vectors after the shm message
#: before concluding that the server runs with zero vectors.
DEFAULT_SETTLE = 0.25


class ClientError(Exception):
    """The connection failed or the server broke the protocol (the message says how)."""


class ServerGone(ClientError):
    """The server closed the connection."""


class ServerUnreachable(ClientError):
    """Nothing accepts connections at the socket path (yet); ``errno`` says why."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class IvshmemClient:
    """One connection to an ivshmem server, after the handshake."""

    sock: socket.socket
    peer_id: int
    shm_fd: int
    shm_size: int
    own_vectors: list[int] = field(default_factory=list)
    #: peer id -> its vectors' eventfds (the fds we write to ring that peer), connection order
    peers: dict[int, list[int]] = field(default_factory=dict)
    parser: ClientParser = field(default_factory=ClientParser)
    _pending: bytes = b""
    _pending_fds: list[int] = field(default_factory=list)
    closed: bool = False

    # -- reading --------------------------------------------------------------------------

    def _recv_nowait(self) -> tuple[int, int | None] | None:
        """One whole message if one is available now; raise on EOF or a broken message."""
        while True:
            try:
                data, fds, flags = wire.recv_message(self.sock)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise ServerGone(f"connection to the server failed: {exc.strerror}") from None
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise ClientError("a message arrived with more fds than the protocol allows")
            if not data:
                _close_all(fds)
                if self._pending:
                    raise ClientError(
                        f"truncated message: the server closed after {len(self._pending)} bytes"
                    )
                raise ServerGone("the server closed the connection")
            self._pending += data
            self._pending_fds.extend(fds)
            if len(self._pending) < wire.MESSAGE_SIZE:
                continue
            value = wire.decode(self._pending)
            fds, self._pending, self._pending_fds = self._pending_fds, b"", []
            if len(fds) > 1:
                _close_all(fds)
                raise ClientError(f"message {value} carries {len(fds)} fds (at most 1 allowed)")
            return value, (fds[0] if fds else None)

    async def _recv(self) -> tuple[int, int | None]:
        while True:
            message = self._recv_nowait()
            if message is not None:
                return message
            await trio.lowlevel.wait_readable(self.sock)

    def _apply(self, value: int, fd: int | None) -> PeerVector | PeerLeft | Welcome | None:
        try:
            event = self.parser.feed(value, fd)
        except ProtocolError as exc:
            _close_all(exc.fds)
            raise ClientError(f"protocol error: {exc}") from None
        _close_all(self.parser.extra_fds)
        self.parser.extra_fds.clear()
        if isinstance(event, PeerVector):
            if event.own:
                self.own_vectors.append(event.fd)
            else:
                self.peers.setdefault(event.peer_id, []).append(event.fd)
        elif isinstance(event, PeerLeft):
            _close_all(self.peers.pop(event.peer_id, []))
        return event

    async def next_event(self) -> PeerVector | PeerLeft:
        """The next join notice (one vector of a peer) or leave notice."""
        while True:
            value, fd = await self._recv()
            event = self._apply(value, fd)
            if isinstance(event, PeerVector | PeerLeft):
                return event

    def next_event_nowait(self) -> PeerVector | PeerLeft | None:
        """Like :meth:`next_event`, but None when nothing is pending."""
        while True:
            message = self._recv_nowait()
            if message is None:
                return None
            event = self._apply(*message)
            if isinstance(event, PeerVector | PeerLeft):
                return event

    # -- doorbells ------------------------------------------------------------------------

    def ring(self, peer_id: int, vector: int) -> bool:
        """Write 1 to ``peer_id``'s eventfd ``vector``; False if there is no such vector."""
        fds = self.own_vectors if peer_id == self.peer_id else self.peers.get(peer_id)
        if fds is None or not 0 <= vector < len(fds):
            return False
        os.eventfd_write(fds[vector], 1)
        return True

    def close(self) -> None:
        """Close the socket and every fd received."""
        if self.closed:
            return
        self.closed = True
        fds = [self.shm_fd, *self.own_vectors, *self._pending_fds]
        for vectors in self.peers.values():
            fds.extend(vectors)
        self.peers.clear()
        self.own_vectors.clear()
        _close_all(fds)
        self.sock.close()

    def __enter__(self) -> IvshmemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def connect(
    path: str, *, vectors: int | None = None, settle: float = DEFAULT_SETTLE
) -> IvshmemClient:
    """Connect to the server at ``path`` and complete the handshake.

    Returns once all our own vectors have arrived. How many there are: ``vectors`` if given
    (the server's ``-n``); otherwise the count every existing peer came with (the server
    hands everyone the same number), which is exact whenever anyone else is connected. When
    we are alone, we wait up to ``settle`` seconds for the first own vector (none come from
    a server with zero vectors) and then until the stream pauses for ``settle / 5``;
    own vectors arriving later are still recorded as they are read.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        try:
            sock.connect(path)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except OSError as exc:
        sock.close()
        raise ServerUnreachable(
            f"cannot connect to {path}: {exc.strerror or exc}", exc.errno
        ) from None
    client: IvshmemClient | None = None
    parser = ClientParser()
    pending = IvshmemClient(sock, -1, -1, 0, parser=parser)
    try:
        while True:
            value, fd = await pending._recv()
            event = pending._apply(value, fd)
            if isinstance(event, Welcome):
                break
        size = os.fstat(event.shm_fd).st_size
        client = IvshmemClient(sock, event.peer_id, event.shm_fd, size, parser=parser)
        client._pending, client._pending_fds = pending._pending, pending._pending_fds
        if vectors is None:
            with trio.move_on_after(settle):
                while not client.own_vectors:
                    client._apply(*await client._recv())
            if client.peers:  # everyone has the same count: exact
                vectors = len(next(iter(client.peers.values())))
        if vectors is not None:
            while len(client.own_vectors) < vectors:
                client._apply(*await client._recv())
        elif client.own_vectors:  # alone: take what comes until the stream pauses
            while True:
                with trio.move_on_after(settle / 5):
                    client._apply(*await client._recv())
                    continue
                break
        return client
    except BaseException:
        if client is not None:
            client.close()
        else:
            pending.close()
        raise


async def connect_with_retry(
    path: str,
    *,
    vectors: int | None = None,
    timeout: float = 10.0,
    initial_delay: float = 0.01,
    max_delay: float = 0.5,
) -> IvshmemClient:
    """:func:`connect`, retrying with exponential backoff while the server is not up yet."""
    delay = initial_delay
    with trio.move_on_after(timeout):
        while True:
            try:
                return await connect(path, vectors=vectors)
            except ServerUnreachable as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise ClientError(f"no ivshmem server answered on {path} within {timeout:g} s")
