"""A small pyzmq <-> trio adapter: await zmq sends and receives without blocking the loop.

pyzmq ships integrations for asyncio, tornado and gevent, not for trio. This module fills the
gap with the primitive that libzmq offers every event loop: ``ZMQ_FD``, a file descriptor that
becomes readable when the socket's state *may* have changed, plus ``ZMQ_EVENTS``, which says
what the socket can do right now.

How it works, and why it is correct:

- ``ZMQ_FD`` is edge-triggered in spirit: it signals that something happened inside libzmq
  (a command arrived from an I/O thread), not that a message is waiting. Reading
  ``ZMQ_EVENTS`` processes those commands and clears the signal. Any send or receive can also
  consume the signal. So after every operation, and before every wait, we ask ``ZMQ_EVENTS``
  and only wait on the fd when the socket really cannot do what we want. Waiting without that
  check can sleep forever with a message sitting in the queue.
- Every operation is tried first with ``NOBLOCK``; on ``zmq.Again`` we check ``ZMQ_EVENTS``
  and then park in :func:`trio.lowlevel.wait_readable` on the fd. There is no polling loop
  and no thread: an idle socket costs nothing.
- Cancellation is clean: we are only ever cancelled while parked (nothing consumed yet), or
  at the checkpoint before the first attempt. Once a message is received or sent we finish
  with a cancel-shielded checkpoint, so a received message is never lost to a cancel.
- One task per socket: a zmq socket is not thread-safe and trio refuses two tasks waiting on
  one fd. A second concurrent operation raises :class:`trio.BusyResourceError` at once.
- :meth:`TrioSocket.close` sets ``LINGER`` to 0 so that closing never blocks on unsent
  messages to a peer that is gone, and tells trio the fd is going away.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import trio
import zmq

from .closing import Closing

__all__ = ["TrioSocket"]

log = logging.getLogger(__name__)


class TrioSocket(Closing):
    """A pyzmq socket driven from trio: async multipart send/receive, one task at a time.

    The wrapped socket must not be used directly while the wrapper is in use. Options
    (subscriptions, high-water marks, bind/connect) may be set on :attr:`socket` before the
    first await.
    """

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._fd = int(sock.getsockopt(zmq.FD))
        self._busy = False

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The wrapped pyzmq socket (for options, bind and connect)."""
        return self._sock

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    # -- waiting --------------------------------------------------------------------------

    def _ready(self, flag: int) -> bool:
        """Ask ZMQ_EVENTS whether the socket can do ``flag`` now (this also re-arms ZMQ_FD)."""
        return bool(int(self._sock.getsockopt(zmq.EVENTS)) & flag)

    async def _wait(self, flag: int) -> None:
        """Park until ``ZMQ_EVENTS`` has ``flag``; edge-triggered-safe, no busy loop."""
        while not self._ready(flag):
            await trio.lowlevel.wait_readable(self._fd)

    def _enter(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(
                "another task is already using this zmq socket (one task per socket)"
            )
        if self._sock.closed:
            raise trio.ClosedResourceError("zmq socket is closed")
        self._busy = True

    # -- receive --------------------------------------------------------------------------

    async def recv_multipart(self) -> list[bytes]:
        """Receive one whole multipart message as a list of bytes."""
        frames = await self.recv_frames()
        return [frame.bytes for frame in frames]

    async def recv_frames(self) -> list[zmq.Frame]:
        """Receive one whole multipart message as zmq Frames (with metadata such as
        ``frame.get("Peer-Address")``)."""
        self._enter()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    frames: list[zmq.Frame] = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    await self._wait(zmq.POLLIN)
                    continue
                break
        finally:
            self._busy = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return frames

    async def wait_readable(self) -> None:
        """Return once a message can be received, without receiving it.

        Also lets libzmq process its pending commands (new connections, subscriptions), which
        a socket that is only ever sent on would otherwise only do when next used.
        """
        self._enter()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._wait(zmq.POLLIN)
        finally:
            self._busy = False

    # -- send -----------------------------------------------------------------------------

    async def send_multipart(self, parts: Sequence[bytes | zmq.Frame | memoryview]) -> None:
        """Send one multipart message, waiting (without blocking trio) while the socket is
        at its high-water mark. Multipart messages are atomic: either all parts are queued
        or none."""
        if not parts:
            raise ValueError("a zmq message needs at least one part")
        self._enter()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    self._sock.send_multipart(parts, zmq.NOBLOCK)
                except zmq.Again:
                    await self._wait(zmq.POLLOUT)
                    continue
                break
        finally:
            self._busy = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    def try_send_multipart(self, parts: Sequence[bytes | zmq.Frame | memoryview]) -> bool:
        """Queue a message if the socket can take it now; False if it would block.

        Synchronous on purpose: for fire-and-forget sockets (PUB) a caller that must never
        wait uses this and counts the drop instead.
        """
        if self._busy:
            raise trio.BusyResourceError("another task is using this zmq socket")
        try:
            self._sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def try_recv_multipart(self) -> list[bytes] | None:
        """Receive a message if one is queued now, else None (never waits)."""
        if self._busy:
            raise trio.BusyResourceError("another task is using this zmq socket")
        try:
            parts: list[bytes] = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return parts

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close with LINGER 0 (never block on undeliverable messages). Idempotent."""
        if self._sock.closed:
            return
        # Outside trio.run (RuntimeError) nobody can be waiting on the fd.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._fd)
        self._sock.close(linger=0)
