"""The peer side of the ivshmem-server protocol, over trio.

:func:`connect` opens the server's unix socket and reads the stream strictly (version 0, own
id, shm fd, the other peers' vectors, our own vectors) through the sans-I/O
:class:`ivshmemd.protocol.ClientParser`; afterwards :meth:`IvshmemClient.next_event` yields
join notices (:class:`PeerVector`) and leave notices (:class:`PeerLeft`) as they come. It
works against QEMU's own server as well as ours: it relies only on the documented stream.

Every fd received is owned by the client and closed by :meth:`IvshmemClient.close` (or
handed back when a peer leaves); a protocol violation raises :class:`ClientError` with a clear
message after closing whatever came with the offending message.

The server is not trusted further than the protocol allows:

* **The stream is a stream.** A message may arrive in pieces (3 bytes, then 5): each read
  asks for exactly what the current message still lacks, so pieces are reassembled and a
  read never runs into the next message (whose fd the kernel would hand over with it).
* **Every fd is checked on receipt.** The shared memory must be a writable regular file
  (memfd, tmpfs, hugetlbfs) of at least 4 KiB and a power of two in size; every vector must
  be an eventfd (``anon_inode:[eventfd]``). Anything else (a pipe, a socket, a directory,
  ``/dev/null``, a read-only or empty file) refuses the stream at once with a message that
  says what arrived, instead of failing later, or only when rung.
* **No wait is unbounded.** :func:`connect` gives the handshake its own timeout, so a server
  that accepts and then says nothing is reported as such (not as "no server").
* **Eventfds are shared, their flags too.** ``O_NONBLOCK`` lives in the open file
  description that every holder of an eventfd shares, so another peer can clear it. Our own
  vectors are read with ``preadv2(RWF_NOWAIT)`` (:func:`read_vector`, and
  :func:`vector_handler` for an event loop), which never blocks whatever the flags say; a
  ring (:func:`ring_eventfd`) puts ``O_NONBLOCK`` back first if it was cleared, and a
  counter that cannot take another ring drops it instead of waiting.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from collections.abc import Callable
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
    "check_eventfd",
    "check_shm_fd",
    "connect",
    "connect_with_retry",
    "read_vector",
    "ring_eventfd",
    "vector_handler",
]

#: Without a known vector count, how long to wait for our own vectors after the shm message
#: before concluding that the server runs with zero vectors.
DEFAULT_SETTLE = 0.25
#: How long a server that accepted the connection may take to send the whole handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
MIN_SHM_SIZE = 4096
_EVENTFD_LINK = "anon_inode:[eventfd]"


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


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "an unknown kind of file"


def check_shm_fd(fd: int) -> int:
    """The size of a usable shared-memory fd; :class:`ClientError` says what is wrong."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        try:
            what += f" ({os.readlink(f'/proc/self/fd/{fd}')})"
        except OSError:
            pass
        raise ClientError(f"the server's shared memory is {what}, not a memory file")
    size = st.st_size
    if size < MIN_SHM_SIZE or size & (size - 1):
        raise ClientError(
            f"the server's shared memory has {size} bytes; a power of two of at least "
            f"{MIN_SHM_SIZE} is needed"
        )
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise ClientError("the server's shared memory is not writable (opened read-only)")
    return size


def check_eventfd(fd: int, what: str) -> None:
    """Raise :class:`ClientError` unless ``fd`` is an eventfd."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise ClientError(f"cannot inspect {what}: {exc.strerror}") from None
    if link != _EVENTFD_LINK:
        kind = _kind(os.fstat(fd).st_mode) if not link.startswith("anon_inode:") else link
        raise ClientError(f"{what} is {kind}, not an eventfd")


_counter = bytearray(8)
_counter_view = [memoryview(_counter)]


def read_vector(fd: int) -> int:
    """Consume one of our own eventfds: its count, or 0 if it was not rung. Never blocks,
    even if another holder cleared ``O_NONBLOCK`` on the shared file description."""
    try:
        os.preadv(fd, _counter_view, -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    return int.from_bytes(_counter, "little")


def vector_handler(
    fd: int, interrupt: Callable[[], object], counts: list[int] | None = None, index: int = 0
) -> Callable[[], bool]:
    """An event loop's handler for our own eventfd ``fd``: consume it as :func:`read_vector`
    does (never blocking) and call ``interrupt()`` if it had been rung; it returns whether
    it had. With ``counts``, each ring adds one to ``counts[index]`` (telemetry).
    Everything is bound once: the per-ring path is this one frame and the read."""
    preadv, views, nowait = os.preadv, [memoryview(bytearray(8))], os.RWF_NOWAIT

    def handle() -> bool:
        try:
            preadv(fd, views, -1, nowait)
        except BlockingIOError:
            return False
        interrupt()
        return True

    def handle_counted() -> bool:
        try:
            preadv(fd, views, -1, nowait)
        except BlockingIOError:
            return False
        counts[index] += 1  # type: ignore[index]
        interrupt()
        return True

    return handle if counts is None else handle_counted


def ring_eventfd(fd: int, counts: list[int] | None = None, slot: int = 0) -> bool:
    """Add 1 to a peer's eventfd; False if its counter is full (the ring is dropped, as a
    ring to a saturated counter means nothing more). Never waits: ``O_NONBLOCK`` is put
    back first if another holder cleared it. With ``counts`` (telemetry), the ring is
    counted in ``counts[slot]`` too, in the same frame."""
    if counts is not None:
        counts[slot] += 1
    if os.get_blocking(fd):
        os.set_blocking(fd, False)
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return False
    return True


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
    #: a departed peer's eventfds, closed once its leave notice has been handled (when the
    #: next event is asked for, or with the client): its last rings are delivered after the
    #: notice, and a plugin answering one rings these fds
    _departed: list[int] = field(default_factory=list)
    closed: bool = False
    #: the server's socket (where its memory log is, :mod:`peers.memreport`); "" if unknown
    socket_path: str = ""

    # -- reading --------------------------------------------------------------------------

    def _recv_nowait(self) -> tuple[int, int | None] | None:
        """One whole message if one is available now; raise on EOF or a broken message."""
        while True:
            try:
                # never more than the current message lacks: a read must not run into the
                # next message (the kernel would hand over that message's fd with it)
                data, fds, flags = wire.recv_message(
                    self.sock, wire.MESSAGE_SIZE - len(self._pending)
                )
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
        try:
            if isinstance(event, Welcome):
                check_shm_fd(event.shm_fd)
            elif isinstance(event, PeerVector):
                whose = "our own" if event.own else f"peer {event.peer_id}'s"
                check_eventfd(event.fd, f"{whose} vector {event.index}")
        except ClientError:
            assert event is not None and fd is not None
            _close_all([fd])
            raise
        if isinstance(event, PeerVector):
            if event.own:
                self.own_vectors.append(event.fd)
            else:
                self.peers.setdefault(event.peer_id, []).append(event.fd)
        elif isinstance(event, PeerLeft):
            self._departed.extend(self.peers.pop(event.peer_id, []))
        return event

    def _close_departed(self) -> None:
        if self._departed:
            _close_all(self._departed)
            self._departed.clear()

    async def next_event(self) -> PeerVector | PeerLeft:
        """The next join notice (one vector of a peer) or leave notice. The previous event
        must have been handled: a departed peer's eventfds are closed now."""
        self._close_departed()
        while True:
            value, fd = await self._recv()
            event = self._apply(value, fd)
            if isinstance(event, PeerVector | PeerLeft):
                return event

    def next_event_nowait(self) -> PeerVector | PeerLeft | None:
        """Like :meth:`next_event`, but None when nothing is pending."""
        self._close_departed()
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
        return ring_eventfd(fds[vector])

    def close(self) -> None:
        """Close the socket and every fd received."""
        if self.closed:
            return
        self.closed = True
        fds = [self.shm_fd, *self.own_vectors, *self._pending_fds, *self._departed]
        self._departed.clear()
        for vectors in self.peers.values():
            if vectors is not self.own_vectors:  # a runtime may list itself among the peers
                fds.extend(vectors)
        self.peers.clear()
        self.own_vectors.clear()
        _close_all(fds)
        self.sock.close()

    def __enter__(self) -> IvshmemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _open(path: str) -> socket.socket:
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
    return sock


async def _handshake(sock: socket.socket, vectors: int | None, settle: float) -> IvshmemClient:
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


async def connect(
    path: str,
    *,
    vectors: int | None = None,
    settle: float = DEFAULT_SETTLE,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> IvshmemClient:
    """Connect to the server at ``path`` and complete the handshake within ``timeout``.

    Returns once all our own vectors have arrived. How many there are: ``vectors`` if given
    (the server's ``-n``); otherwise the count every existing peer came with (the server
    hands everyone the same number), which is exact whenever anyone else is connected. When
    we are alone, we wait up to ``settle`` seconds for the first own vector (none come from
    a server with zero vectors) and then until the stream pauses for ``settle / 5``;
    own vectors arriving later are still recorded as they are read.

    Raises :class:`ServerUnreachable` when nothing accepts the connection, and
    :class:`ClientError` when a server accepted it but broke the protocol or did not finish
    the handshake in time.
    """
    sock = await _open(path)
    with trio.move_on_after(timeout):
        client = await _handshake(sock, vectors, settle)
        client.socket_path = path
        return client
    raise ClientError(
        f"the server at {path} accepted the connection but did not complete the handshake "
        f"within {timeout:g} s"
    )


async def connect_with_retry(
    path: str,
    *,
    vectors: int | None = None,
    timeout: float = 10.0,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    initial_delay: float = 0.01,
    max_delay: float = 0.5,
) -> IvshmemClient:
    """:func:`connect`, retrying with exponential backoff for up to ``timeout`` seconds
    while nothing listens at ``path`` yet. Once a server accepts, the handshake has its own
    ``handshake_timeout``, and its errors are not retried."""
    delay = initial_delay
    last: ServerUnreachable | None = None
    deadline = trio.current_time() + timeout
    while True:
        try:
            return await connect(path, vectors=vectors, timeout=handshake_timeout)
        except ServerUnreachable as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
            last = exc
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            break
        await trio.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)
    assert last is not None
    why = "it does not exist" if last.errno == errno.ENOENT else "nothing listens there"
    raise ServerUnreachable(
        f"no ivshmem server answered on {path} within {timeout:g} s ({why})", last.errno
    )
