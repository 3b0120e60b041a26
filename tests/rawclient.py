"""A raw protocol client for tests: records the exact stream a server sends.

It speaks no protocol logic at all (unlike ``peers.client``): it records every message as
``(value, carries_fd)`` and keeps the fds, so a test can compare streams byte for byte with
what QEMU's server sent and check that the fds are really connected eventfds.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import trio

from ivshmemd import wire
from ivshmemd.protocol import ClientParser, PeerLeft, PeerVector

READ_TIMEOUT = 20.0


@dataclass
class RawClient:
    """A connected socket and everything received on it."""

    sock: socket.socket
    stream: list[tuple[int, bool]] = field(default_factory=list)
    fds: list[tuple[int, int]] = field(default_factory=list)  # (value, fd) in arrival order
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    #: close received fds at once instead of keeping them (for tests with many peers)
    close_fds_as_they_come: bool = False

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        """Connect (blocking connect on a unix socket is immediate)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        sock.setblocking(False)
        return cls(sock)

    def _take(self, data: bytes, fds: list[int]) -> tuple[int, bool]:
        """Record one received message (keeping or closing its fd); returns it."""
        assert len(data) == wire.MESSAGE_SIZE, f"short message {data!r}"
        assert len(fds) <= 1, f"{len(fds)} fds in one message"
        message = (wire.decode(data), bool(fds))
        self.stream.append(message)
        for fd in fds:
            if self.close_fds_as_they_come:
                os.close(fd)
            else:
                self.fds.append((message[0], fd))
        return message

    async def _receive(self) -> tuple[bytes, list[int]]:
        """One message's bytes and fds, waiting for them (b"" at EOF)."""
        while True:
            try:
                data, fds, _flags = wire.recv_message(self.sock)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            return data, fds

    async def _next(self, wanted: str) -> tuple[int, bool]:
        """The next message, waiting for it; EOF fails with ``wanted`` in the message."""
        data, fds = await self._receive()
        if not data:
            raise AssertionError(f"EOF after {len(self.stream)} messages ({wanted})")
        return self._take(data, fds)

    async def read(self, count: int, timeout: float = READ_TIMEOUT) -> list[tuple[int, bool]]:
        """Read exactly ``count`` messages; fail with what arrived if they do not come."""
        got: list[tuple[int, bool]] = []
        with trio.move_on_after(timeout):
            while len(got) < count:
                got.append(await self._next(f"wanted {count}, got {got}"))
            return got
        raise AssertionError(f"timed out: got {got}, wanted {count} messages")

    async def read_until(
        self, message: tuple[int, bool], count: int = 1, timeout: float = READ_TIMEOUT
    ) -> None:
        """Read (into :attr:`stream`) until ``message`` has arrived ``count`` times."""
        seen = self.stream.count(message)
        with trio.move_on_after(timeout):
            while seen < count:
                seen += await self._next(f"waiting for {count} x {message}") == message
            return
        raise AssertionError(f"{count} x {message} never arrived in {len(self.stream)} messages")

    async def drain(self) -> None:
        """Read forever (run it as a task); waiters of :meth:`wait_for` are woken."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            while True:
                try:
                    data, fds, _flags = wire.recv_message(self.sock)
                except BlockingIOError:
                    break
                if not data:
                    raise AssertionError(f"EOF after {len(self.stream)} messages")
                self._take(data, fds)
            self.lot.unpark_all()

    async def wait_for(
        self, message: tuple[int, bool], count: int = 1, timeout: float = READ_TIMEOUT
    ) -> None:
        """With :meth:`drain` running: wait until ``message`` has arrived ``count`` times."""
        with trio.move_on_after(timeout):
            while self.stream.count(message) < count:
                await self.lot.park()
            return
        raise AssertionError(f"{count} x {message} never arrived; got {self.stream}")

    async def read_eof(self, timeout: float = READ_TIMEOUT) -> list[tuple[int, bool]]:
        """Read until the server closes; return the messages that came first."""
        got: list[tuple[int, bool]] = []
        with trio.move_on_after(timeout):
            while True:
                try:
                    data, fds = await self._receive()
                except ConnectionResetError:
                    return got
                for fd in fds:
                    os.close(fd)
                if not data:
                    return got
                got.append((wire.decode(data), bool(fds)))
        raise AssertionError(f"timed out waiting for EOF; got {got}")

    def view(self) -> dict[int, int]:
        """The peers (id -> vectors) this client knows of after its whole stream so far,
        through the strict client parser; a leave for a peer never announced fails."""
        parser, view = ClientParser(), {}
        for value, carries in self.stream:
            event = parser.feed(value, 3 if carries else None)
            if isinstance(event, PeerVector) and not event.own:
                view[event.peer_id] = view.get(event.peer_id, 0) + 1
            elif isinstance(event, PeerLeft):
                assert event.peer_id in view, f"a leave for peer {event.peer_id}, never announced"
                del view[event.peer_id]
        return view

    def vector_fds(self, peer_id: int) -> list[int]:
        """The fds received for ``peer_id``, in order (its vector 0, 1, ...)."""
        return [fd for value, fd in self.fds if value == peer_id]

    def shm_fd(self) -> int:
        """The shared-memory fd (the one sent with -1)."""
        return next(fd for value, fd in self.fds if value == -1)

    def close(self) -> None:
        """Close the socket and every received fd."""
        for _value, fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.sock.close()
