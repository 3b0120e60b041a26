"""The two event loops that drive a :class:`~peers.runtime.PeerMachine`.

* :func:`run_trio`: the default, a trio task per own vector eventfd plus one for the
  server's notices; composable with other trio code.
* :func:`run_blocking`: the fast path for latency-critical plugins: one ``poll`` over our
  eventfds, the server socket and a signal wake-up pipe, and nothing else between an
  eventfd becoming readable and the plugin's interrupt handler. SIGTERM/SIGINT still stop
  it cleanly: their handlers only set a flag, and the wake-up fd ends the ``poll``.

Both return when the plugin finishes, a signal arrives, or the server goes away (which they
raise as :class:`~peers.client.ServerGone`).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from ivshmemd.errors import unwrap
from ivshmemd.telemetry import KNOCK_SIGNAL

from .client import ClientError
from .runtime import PeerMachine

__all__ = ["Stopped", "run_blocking", "run_trio"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A signal asked the peer to stop (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _drain_server(machine: PeerMachine) -> None:
    client = machine.client
    while (event := client.next_event_nowait()) is not None:
        machine.on_server_event(event)


def _nothing() -> None:
    return None


async def run_trio(machine: PeerMachine, on_ready: Callable[[], None] = _nothing) -> None:
    """Run until the plugin is done; raise :class:`Stopped` on SIGTERM/SIGINT.

    ``on_ready`` is called once signals are handled, just before the plugin starts.
    """
    finished = trio.Event()
    stopped_by: list[int] = []

    async def watch_vector(vector: int, fd: int) -> None:
        on_vector = machine.on_vector
        while True:
            await trio.lowlevel.wait_readable(fd)
            on_vector(vector)
            if machine.done:
                finished.set()
                return

    async def watch_server(nursery: trio.Nursery) -> None:
        client, own_fds = machine.client, machine.own_fds
        watched = 0
        while True:
            # own vectors can still arrive after the handshake: watch each as it comes
            while watched < len(own_fds):
                nursery.start_soon(watch_vector, watched, own_fds[watched])
                watched += 1
            machine.on_server_event(await client.next_event())
            if machine.done:
                finished.set()
                return

    async def watch_signals(task_status: Any) -> None:
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                stopped_by.append(signum)
                finished.set()
                return

    try:
        await _supervise(machine, finished, watch_signals, watch_vector, watch_server, on_ready)
    except BaseExceptionGroup as group:  # a lost server is one clear error, not a group
        lost, _rest = group.split(ClientError)
        if lost is not None:
            raise unwrap(lost) from None
        raise
    if stopped_by and not machine.done:
        raise Stopped(stopped_by[0])


async def _supervise(
    machine: PeerMachine,
    finished: trio.Event,
    watch_signals: Callable[[Any], Awaitable[None]],
    watch_vector: Callable[[int, int], Awaitable[None]],
    watch_server: Callable[[trio.Nursery], Awaitable[None]],
    on_ready: Callable[[], None],
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_started, watch_signals)
        on_ready()
        _drain_server(machine)
        machine.start()
        nursery.start_soon(watch_server, nursery)
        nursery.start_soon(_watch_knocks, machine)
        if not machine.done:
            await finished.wait()
        nursery.cancel_scope.cancel()


async def _watch_knocks(machine: PeerMachine) -> None:
    """Connect the telemetry once someone watches (now, or at the control process's knock),
    then answer its ticks (see :class:`peers.telemetry.TelemetryLink`)."""
    if machine.telemetry_endpoints is None:
        return
    if not machine.watched_at_start():
        with trio.open_signal_receiver(KNOCK_SIGNAL) as knocks:
            async for _ in knocks:
                break
    link = machine.start_telemetry()
    if link is None:
        return
    while True:
        await trio.lowlevel.wait_readable(link.fd)
        link.on_readable()


async def _started(
    task: Callable[[Any], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    await task(task_status)


@contextmanager
def _signal_wakeup() -> Iterator[tuple[int, list[int], list[int]]]:
    """Signal handlers that only record the signal (a stop, or the telemetry's knock), and
    a pipe that wakes poll."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    caught: list[int] = []
    knocked: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        caught.append(signum)

    def knock(signum: int, _frame: object) -> None:
        knocked.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    previous[KNOCK_SIGNAL] = signal.signal(KNOCK_SIGNAL, knock)
    old_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield read_end, caught, knocked
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, old in previous.items():
            signal.signal(sig, old)
        os.close(read_end)
        os.close(write_end)


def run_blocking(
    machine: PeerMachine, on_ready: Callable[[], None] = _nothing, spin_us: float = 0.0
) -> None:
    """The fast path: a plain epoll loop. Raise :class:`Stopped` on SIGTERM/SIGINT.

    With ``spin_us``, after each interrupt it polls its own eventfds (non-blocking reads) for
    up to that long before sleeping in ``poll``: the next ring of a ping-pong usually
    comes within microseconds, and catching it awake saves the wake-up latency of a sleeping
    process, at the price of a busy core during the spin (bounded; off by default).
    """
    with _signal_wakeup() as (wake_fd, caught, knocked):
        # poll(2), not epoll: for these few fds its wait-and-wake is cheaper per ring
        poller = select.poll()
        on_ready()
        server_fd = machine.client.sock.fileno()
        poller.register(server_fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        _drain_server(machine)
        machine.start()
        own_fds = machine.own_fds  # grows if own vectors arrive after the handshake
        watched = 0
        poll, on_vector = poller.poll, machine.on_vector
        # fd -> what its readiness means: a vector's handler (consume, interrupt), or None
        handler_of: dict[int, Callable[[], bool] | None] = {server_fd: None, wake_fd: None}

        def watch_telemetry() -> None:  # someone watches: the link's ticks, a report each
            link = machine.start_telemetry()
            if link is not None and link.fd not in handler_of:
                poller.register(link.fd, select.POLLIN)
                handler_of[link.fd] = link.on_readable

        if machine.watched_at_start():
            watch_telemetry()
        spin_ns = int(spin_us * 1000)
        clock = time.perf_counter_ns
        while machine.outcome is None and not caught:
            if spin_ns:
                deadline = clock() + spin_ns
                while clock() < deadline:
                    if any([on_vector(v) for v in range(watched)]):
                        deadline = clock() + spin_ns
                        if machine.outcome is not None:
                            break
                if machine.outcome is not None:
                    break
            while watched < len(own_fds):
                poller.register(own_fds[watched], select.POLLIN)
                handler_of[own_fds[watched]] = machine.vector_handler(watched)
                watched += 1
            for fd, _mask in poll():
                handler = handler_of[fd]
                if handler is not None:
                    handler()
                elif fd == server_fd:
                    _drain_server(machine)  # may raise ServerGone
                else:
                    try:
                        while os.read(wake_fd, 64):
                            pass
                    except BlockingIOError:
                        pass
                    if knocked:
                        knocked.clear()
                        watch_telemetry()
                if machine.outcome is not None:
                    break
        if caught and not machine.done:
            raise Stopped(caught[0])
