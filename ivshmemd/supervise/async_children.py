"""Supervised children in trio code: :class:`Child` and the :class:`Supervisor` that starts
them in a nursery and stops them when it closes."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from .record import ChildError, ChildRecord
from .spawn import NOTIFY_DATAGRAM_MAX, STOP_GRACE, WAIT_TIMEOUT, Launch

__all__ = ["Child", "Supervisor", "open_supervisor"]

T = TypeVar("T")
C = TypeVar("C", bound="Child")


class Child(ChildRecord):
    """A supervised child process in trio code (see the module docstring)."""

    def __init__(self, argv: Sequence[str], **limits: int | None) -> None:
        super().__init__(argv, **limits)
        self.process: trio.Process | None = None  # None: adopted (someone else reaps it)
        self._changed = trio.lowlevel.ParkingLot()
        self._stdin: trio.abc.SendStream | None = None
        self._exited = trio.Event()

    # -- plumbing (the supervisor's) ----------------------------------------------------------

    def _news(self) -> None:
        self._changed.unpark_all()

    async def _pump(self, stream: trio.abc.ReceiveStream, feed: Callable[[bytes], None]) -> None:
        try:
            async for chunk in stream:
                feed(bytes(chunk))
                self._news()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            feed(b"")
            self.streams_closed()
            self._news()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _pump_notify(self, sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                self.feed_notify(await sock.recv(NOTIFY_DATAGRAM_MAX))
                self._news()

    def set_exited(self, returncode: int) -> None:
        super().set_exited(returncode)
        self._exited.set()
        self._news()

    # -- waiting ----------------------------------------------------------------------------

    async def wait_for(self, condition: Callable[[], T | None], what: str, timeout: float) -> T:
        """Wait until ``condition()`` returns something other than None; return it. Raises
        (:meth:`ChildRecord.error`) if the child ends first or ``timeout`` passes."""
        with trio.move_on_after(timeout):
            while True:
                result = condition()
                if result is not None:
                    return result
                if self.silent:
                    break
                await self._changed.park()
        raise self.error(what, timeout)

    async def wait_ready(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait for its ``READY=1``."""
        await self.wait_for(self._ready_found, "READY=1", timeout)

    async def wait_events(
        self, count: int, *, timeout: float = WAIT_TIMEOUT, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events match ``fields``; return the first ``count``."""
        return await self.wait_for(
            lambda: self._events_found(count, fields), f"{count} event(s) matching {fields}",
            timeout,
        )  # fmt: skip

    async def wait_event(
        self, *, count: int = 1, timeout: float = WAIT_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th event matching ``fields``, waiting for it if need be."""
        return (await self.wait_events(count, timeout=timeout, **fields))[-1]

    async def wait_log(
        self, pattern: str, count: int = 1, timeout: float = WAIT_TIMEOUT
    ) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return the first ``count``."""
        return await self.wait_for(
            lambda: self._log_found(pattern, count), f"{count} x /{pattern}/ in the log", timeout
        )

    async def wait_exit(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Wait until it has exited and its output is read; return its status."""
        return await self.wait_for(
            lambda: self.returncode if self.silent else None, "its exit", timeout
        )

    # -- acting -----------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Signal it unless it is known to have exited (so its pid cannot be reused)."""
        if not self.alive:
            return
        self.signals_sent.add(signum)
        try:
            if self.process is not None:
                self.process.send_signal(signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    async def send_line(self, line: str) -> None:
        """A line on its stdin (started with ``stdin=True``)."""
        if self._stdin is None:
            raise ChildError(f"no stdin pipe to {self.argv[:3]}")
        await self._stdin.send_all(line.encode() + b"\n")

    async def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit status.
        ``grace=0`` kills at once."""
        if self.alive and grace > 0:
            self.terminate()
            with trio.move_on_after(grace):
                await self._exited.wait()
        if self.alive:
            self.kill()
            with trio.move_on_after(STOP_GRACE):
                await self._exited.wait()
            self.set_exited(-signal.SIGKILL)  # no news after SIGKILL: take it as dead
        assert self.returncode is not None
        return self.returncode


class Supervisor:
    """Starts children as tasks of a nursery and stops those still running when closed
    (:func:`open_supervisor`)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.children: list[Child] = []

    async def start(self, child: C, launch: Launch | None = None, **options: Any) -> C:
        """Start ``child`` (its argv is ``child.argv``) as ``launch`` (or the
        :class:`~ivshmemd.supervise.spawn.Launch` made of ``options``) says; return it."""
        launch = launch or Launch(**options)
        with launch.opening() as (notify, popen_options):
            process = await trio.lowlevel.open_process(child.argv, **popen_options)
        child.process = process
        child.pid = process.pid
        child._stdin = process.stdin
        self._watch(child, process.stdout, process.stderr, notify)
        self._nursery.start_soon(self._reap, child, process)
        return child

    def adopt(
        self,
        child: C,
        pid: int,
        stdout: trio.abc.ReceiveStream | None,
        stderr: trio.abc.ReceiveStream | None,
    ) -> C:
        """Supervise a child someone else started and reaps (a fork server's): its output is
        read here, its exit is reported with :meth:`Child.set_exited`."""
        child.pid = pid
        self._watch(child, stdout, stderr, None)
        return child

    def _watch(
        self,
        child: Child,
        stdout: trio.abc.ReceiveStream | None,
        stderr: trio.abc.ReceiveStream | None,
        notify: socket.socket | None,
    ) -> None:
        self.children.append(child)
        streams = [(s, f) for s, f in ((stdout, child.feed_events), (stderr, child.feed_log)) if s]
        child.streams_opened(len(streams))
        for stream, feed in streams:
            self._nursery.start_soon(child._pump, stream, feed)
        if notify is not None:
            self._nursery.start_soon(self._notifications, child, notify)

    async def _notifications(self, child: Child, sock: socket.socket) -> None:
        with trio.CancelScope() as scope:
            self._nursery.start_soon(self._cancel_when_silent, child, scope)
            await child._pump_notify(trio.socket.from_stdlib_socket(sock))

    @staticmethod
    async def _cancel_when_silent(child: Child, scope: trio.CancelScope) -> None:
        while not child.silent:
            await child._changed.park()
        scope.cancel()

    @staticmethod
    async def _reap(child: Child, process: trio.Process) -> None:
        child.set_exited(await process.wait())
        if child._stdin is not None:
            with trio.CancelScope(shield=True):
                await child._stdin.aclose()

    async def aclose(self, grace: float = STOP_GRACE) -> None:
        """Stop every child still running (concurrently) and reap it."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for child in self.children:
                    if child.alive:
                        nursery.start_soon(child.stop, grace)


@asynccontextmanager
async def open_supervisor() -> AsyncIterator[Supervisor]:
    """``async with open_supervisor() as sup: child = await sup.start(Child(argv))``; every
    child is stopped and reaped when the block ends, however it ends."""
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery)
        try:
            yield supervisor
        finally:
            await supervisor.aclose()
            nursery.cancel_scope.cancel()
