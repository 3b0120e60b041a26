"""The daemon's end of the memory-log side channel (:mod:`ivshmemd.memlog`): ``SOCK.memlog``.

Our peers report the shm pages they wrote before each doorbell they ring. This module
listens for them (in the federation process, beside the replication it feeds), keeps the
union of the pages reported since the last flush, and knows which local peers report: a
flush needs a scan of the whole region while any local peer does not (a QEMU VM, any other
client, or one of ours whose report failed).

A report counts only from the peer it names: its ``hello`` names a local peer whose
connection to the daemon came from the same process (``SO_PEERCRED`` pid), so one client
cannot make the daemon skip the scan another one needs. A connection that sends anything
invalid is closed with one (rate-limited) log line; its peer is scanned for from then on.

Ordering: a peer's report is queued on its connection before it writes the doorbell's
eventfd, so whoever drains that eventfd calls :meth:`MemoryLogs.read` first and finds it
(the driver reads this channel before it relays rings: it is one of the data path's wakeups).

Resources: the listening socket file is placed and removed like the daemon's other sockets
(:func:`ivshmemd.sockpath.place_socket`, :func:`~ivshmemd.sockpath.unlink_if_ours`); every
connection is closed by :meth:`MemoryLogs.close`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ivshmemd.memlog import MAX_PACKET, Dirty, MemlogError, MemlogHello, decode
from ivshmemd.server import peer_credentials
from ivshmemd.sockpath import place_socket, unlink_if_ours

from .throttle import Throttle

__all__ = ["MAX_CONNECTIONS", "MemoryLogs"]

log = logging.getLogger(__name__)

#: Connections at most (one per local peer is the use; more are refused).
MAX_CONNECTIONS: Final = 4096
_WORD_BITS: Final = 64


@dataclass(slots=True, eq=False)
class _Connection:
    sock: socket.socket
    pid: int
    peer_id: int | None = None


class MemoryLogs:
    """``SOCK.memlog`` and its connections (see the module docstring). ``npages``: the
    region in 4 KiB pages; ``pids``: the local peers' pids, kept up to date by the driver."""

    def __init__(self, path: str, mode: int, gid: int | None, npages: int) -> None:
        self.path = path
        self.npages = npages
        self.pending = np.zeros(-(-npages // _WORD_BITS), dtype=np.uint64)
        #: local peer id -> its pid (from the daemon)
        self.pids: dict[int, int] = {}
        #: local peers that report, and their connections
        self.logged: dict[int, _Connection] = {}
        #: host-local byte ranges our peers declared (never replicated), and a callback
        self.local_ranges: set[tuple[int, int]] = set()
        self.on_local_range: Callable[[int, int], None] = lambda offset, length: None
        self.reports = 0
        self._throttle = Throttle()
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )

        def bind(private: str) -> None:
            listener.bind(private)
            listener.listen(128)

        try:
            self._ident = place_socket(path, bind, mode, gid, "memory-log socket")
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._connections: dict[int, _Connection] = {}

    def fileno(self) -> int:
        """Readable when a peer connects or reports (the data path waits on it)."""
        return self._epoll.fileno()

    def read(self) -> None:
        """Accept and read everything waiting now, without waiting."""
        for fd, _events in self._epoll.poll(0):
            if fd == self._listener.fileno():
                self._accept()
            else:
                connection = self._connections.get(fd)
                if connection is not None:
                    self._receive(connection)

    def take(self) -> npt.NDArray[np.int64]:
        """The pages reported since the last take (ascending), and forget them."""
        pending = self.pending
        nonzero = np.flatnonzero(pending)
        if nonzero.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(pending.view(np.uint8), bitorder="little")
        pending[:] = 0
        pages = np.flatnonzero(bits).astype(np.int64)
        return pages[pages < self.npages]

    def unlogged(self, local_peers: Iterable[int]) -> bool:
        """Whether any of ``local_peers`` does not report (a flush must scan for it)."""
        logged = self.logged
        return any(peer_id not in logged for peer_id in local_peers)

    def peer_left(self, peer_id: int) -> None:
        """A local peer left: its reports end with it."""
        self.pids.pop(peer_id, None)
        connection = self.logged.pop(peer_id, None)
        if connection is not None:
            self._close(connection)

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file we made."""
        for connection in list(self._connections.values()):
            self._close(connection)
        self._epoll.close()
        self._listener.close()
        unlink_if_ours(self.path, self._ident)

    # -- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._warn("out of fds", "out of fds: a memory-log connection waits")
                    return
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                sock.close()
                self._warn("full", f"memory-log connections at the limit of {MAX_CONNECTIONS}")
                continue
            sock.setblocking(False)
            pid = peer_credentials(sock)[0]
            connection = _Connection(sock, pid)
            self._connections[sock.fileno()] = connection
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _receive(self, connection: _Connection) -> None:
        sock = connection.sock
        while True:
            try:
                packet = sock.recv(MAX_PACKET + 1)
            except BlockingIOError:
                return
            except OSError:
                self._close(connection)
                return
            if not packet:
                self._close(connection)
                return
            try:
                message = decode(packet, npages=self.npages)
            except MemlogError as exc:
                self._refuse(connection, str(exc))
                return
            if isinstance(message, MemlogHello):
                if not self._hello(connection, message):
                    return
            elif connection.peer_id is None:
                self._refuse(connection, "a report before its hello")
                return
            else:
                self._mark(message)

    def _hello(self, connection: _Connection, hello: MemlogHello) -> bool:
        if connection.peer_id is not None:
            self._refuse(connection, "a second hello")
            return False
        if hello.page_size != 4096 or hello.npages != self.npages:
            self._refuse(
                connection,
                f"a bitmap of {hello.npages} pages of {hello.page_size} bytes; the region "
                f"is {self.npages} pages of 4096",
            )
            return False
        pid = self.pids.get(hello.peer_id)
        if pid is None or pid != connection.pid:
            self._refuse(connection, f"process {connection.pid} is not peer {hello.peer_id}")
            return False
        old = self.logged.pop(hello.peer_id, None)
        if old is not None:
            self._close(old)
        connection.peer_id = hello.peer_id
        self.logged[hello.peer_id] = connection
        for entry in hello.local:
            if entry not in self.local_ranges:
                self.local_ranges.add(entry)
                self.on_local_range(*entry)
        return True

    def _mark(self, dirty: Dirty) -> None:
        first = dirty.first_page // _WORD_BITS
        words = dirty.words
        self.pending[first : first + words.shape[0]] |= words
        self.reports += 1

    def _refuse(self, connection: _Connection, why: str) -> None:
        self._warn(("bad", connection.pid), f"memory log of process {connection.pid}: {why}; "
                   "closed (its writes are found by scanning)")  # fmt: skip
        self._close(connection)

    def _warn(self, key: object, text: str) -> None:
        if self._throttle.allow(key, time.monotonic()):
            log.warning("federation: %s", text)

    def _close(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._epoll.unregister(fd)
            self._connections.pop(fd, None)
        if connection.peer_id is not None and self.logged.get(connection.peer_id) is connection:
            del self.logged[connection.peer_id]
        connection.sock.close()
