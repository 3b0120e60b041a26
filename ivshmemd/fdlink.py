"""A link between the daemon and a helper process of its own: msgpack messages with fds.

The federation runs in a process of its own (:mod:`ivshmemd.federation.process`), so that
libzmq never runs in the daemon, and it needs eventfds from the daemon (and gives it none
back: the daemon's registry makes every eventfd). The link is one ``SOCK_SEQPACKET`` unix
socket pair: every message is one packet (no framing to get wrong), a msgpack array whose
first element names it, with the fds that go with it attached in one ``SCM_RIGHTS`` control
message, so that a message and its fds arrive together or not at all.

Sending never blocks: :meth:`FdLink.send` hands the packet to the kernel at once when
nothing is queued before it (the common case: the link's buffer holds thousands of these
small messages), else queues it with duplicates of its fds (the caller keeps ownership of
its own), and the owner's sender task (:meth:`FdLink.flush`) passes them on as the other
side reads. The queue is bounded: past :data:`MAX_QUEUED` messages the other side is stuck,
and :class:`LinkError` says so (the daemon then restarts that process).

Receiving: :meth:`FdLink.receive_nowait` returns ``(message, fds)`` (the caller owns the
fds), ``None`` when nothing is waiting, and raises :class:`LinkClosed` at EOF. A packet
that is not a msgpack array starting with a string, or whose fds the kernel had to drop
(``MSG_CTRUNC``: out of fds), raises :class:`LinkError` after closing what arrived.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import msgpack
import trio

__all__ = ["MAX_LINK_FDS", "MAX_QUEUED", "FdLink", "LinkClosed", "LinkError", "link_pair"]

#: fds one message may carry (a peer's vectors, at most ivshmem's 64, and the shm)
MAX_LINK_FDS: Final = 65
#: largest message (a federation status with its members fits many times over)
MAX_PACKET: Final = 1 << 20
#: messages queued for a side that does not read before it is declared stuck
MAX_QUEUED: Final = 1 << 16
_BUFFER: Final = 4 << 20
_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_LINK_FDS * array.array("i").itemsize)


class LinkError(Exception):
    """The link cannot go on (a malformed packet, lost fds, a side that does not read)."""


class LinkClosed(LinkError):
    """The other side closed the link (or died)."""


def link_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of close-on-exec ``SOCK_SEQPACKET`` sockets with large buffers."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for sock in (ours, theirs):
        for option, forced in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, _BUFFER)
            except OSError:  # not privileged: as much as the system allows
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
    return ours, theirs


def _pack(message: Sequence[Any]) -> bytes:
    data: bytes = msgpack.packb(list(message), use_bin_type=True)
    if len(data) > MAX_PACKET:
        raise LinkError(f"link message {message[0]!r} of {len(data)} bytes is too large")
    return data


class FdLink:
    """One end of a link (see the module docstring). Not thread-safe: one trio thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._queue: deque[tuple[bytes, list[int]]] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending ---------------------------------------------------------------------------

    def send(self, *message: Any, fds: Sequence[int] = ()) -> None:
        """Send one message with ``fds`` (still the caller's), now or after those queued."""
        if self.closed:
            raise LinkClosed("the link is closed")
        data = _pack(message)
        if not self._queue and self._try_send(data, fds):
            return
        if len(self._queue) >= MAX_QUEUED:
            raise LinkError(f"the other side has not read {MAX_QUEUED} messages")
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError:
            for fd in copies:
                os.close(fd)
            raise
        self._queue.append((data, copies))
        self._lot.unpark_all()

    def _try_send(self, data: bytes, fds: Sequence[int]) -> bool:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg((data,), ancillary)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise LinkClosed(f"the link broke: {exc.strerror}") from None
        return True

    @property
    def queued(self) -> int:
        """Messages waiting for the other side to read."""
        return len(self._queue)

    async def flush(self) -> None:
        """Pass queued messages on as the other side reads them; runs until cancelled (the
        owner runs it as a task beside its reader)."""
        queue = self._queue
        while True:
            if not queue:
                await self._lot.park()
                continue
            data, fds = queue[0]
            if self._try_send(data, fds):
                queue.popleft()
                for fd in fds:
                    os.close(fd)
            else:
                await trio.lowlevel.wait_writable(self.sock)

    # -- receiving -------------------------------------------------------------------------

    def receive_nowait(self) -> tuple[list[Any], list[int]] | None:
        """One message and its fds (now the caller's), or None if nothing is waiting."""
        try:
            data, ancdata, flags, _addr = self.sock.recvmsg(MAX_PACKET, _CMSG_SPACE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise LinkClosed(f"the link broke: {exc.strerror}") from None
        fds: list[int] = []
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(raw) - len(raw) % array.array("i").itemsize
                fds.extend(array.array("i", raw[:usable]))
        if not data and not fds:
            raise LinkClosed("the other side closed the link")
        problem = None
        if flags & socket.MSG_CTRUNC:
            problem = "fds were lost on the way (out of file descriptors?)"
        elif flags & socket.MSG_TRUNC:
            problem = "a message was too large"
        message: Any = None
        if problem is None:
            try:
                message = msgpack.unpackb(data, raw=False)
            except Exception as exc:
                problem = f"not msgpack: {exc}"
            if problem is None and not (
                isinstance(message, list) and message and isinstance(message[0], str)
            ):
                problem = "not an array starting with its name"
        if problem is not None:
            for fd in fds:
                os.close(fd)
            raise LinkError(f"bad link message: {problem}")
        return message, fds

    async def receive(self) -> tuple[list[Any], list[int]]:
        """The next message and its fds, waiting for it."""
        while True:
            got = self.receive_nowait()
            if got is not None:
                return got
            await trio.lowlevel.wait_readable(self.sock)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (the other side sees EOF) and drop what was queued. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for _data, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        with contextlib.suppress(RuntimeError):  # outside trio nobody can be waiting on it
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
