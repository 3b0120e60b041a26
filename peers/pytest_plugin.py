"""pytest fixtures: a real ``ivshmemd`` and real peer processes inside your own tests.

The plugin is registered as the ``pytest11`` entry point ``ivshmem``, so installing this
project makes the fixtures available to every test session (``pytest -p no:ivshmem`` turns
them off). They are for trio tests (pytest-trio, ``trio_mode = true`` or
``@pytest.mark.trio``):

``ivshmem_daemon``
    A factory of async context managers: ``async with ivshmem_daemon(vectors=2) as daemon``
    runs ``ivshmemd`` in the foreground on a unique socket under the test's ``tmp_path`` and
    a unique shm name, waits until it listens, and on exit stops it (SIGTERM, SIGKILL if it
    hangs) and removes the socket and the shm, whatever happened in the block. ``daemon`` is
    a :class:`ivshmemd.supervise.DaemonProcess`: ``socket_path``, ``shm_name``, ``pid``,
    ``log``, ``await daemon.wait_log("peer 3 left")``. Keyword arguments: ``vectors``
    (default 1), ``size`` (default ``"1M"``), ``args`` (more ``ivshmemd`` options).

``ivshmem_peers``
    A spawner: ``peer = await ivshmem_peers(daemon, plugin="ping", args=["--count", "100"])``
    starts ``ivshmem-peer --report json`` against that daemon and returns a
    :class:`PeerProcess` once the peer reports it is running (so ``peer.peer_id`` is known).
    Every peer the test spawned is stopped and reaped when the test ends (SIGTERM, then
    SIGKILL after a grace period), pass or fail. ``env=`` adds environment variables and
    ``pythonpath=`` directories (e.g. where a test-only plugin lives).

A :class:`PeerProcess` records every JSON event the peer prints (``peer.events``) and its
stderr (``peer.stderr``). Wait for what you expect instead of sleeping:
``await peer.wait_event(event="peer-left", peer_id=3)`` (any fields, ``count=`` for the n-th
match), ``await peer.wait_finished()`` (the plugin's summary; raises if the plugin failed or
the peer died), ``await peer.wait_exit()``; signal it with ``peer.terminate()`` or
``peer.kill()``. Plugins report their own events with ``guest.report(event="...", ...)``,
and those arrive here too. A multi-process test then reads::

    async def test_ping_between_two_peers(ivshmem_daemon, ivshmem_peers):
        async with ivshmem_daemon(vectors=1) as daemon:
            first = await ivshmem_peers(daemon, plugin="ping", args=["--count", "200"])
            second = await ivshmem_peers(daemon, plugin="ping", args=["--count", "200"])
            server = first if first.peer_id < second.peer_id else second
            summary = await server.wait_finished()
            assert summary.startswith("ping: 200 round trips")

Every wait has a timeout (``DEFAULT_TIMEOUT`` seconds) and fails with the peer's events and
stderr in the message rather than hanging the test run.

Plain (synchronous) tests get the same with blocking calls: ``ivshmem_daemon_sync`` (``with
ivshmem_daemon_sync(vectors=2) as daemon``) and ``ivshmem_peers_sync`` (``peer =
ivshmem_peers_sync(daemon, plugin="ping")``, then ``peer.wait_finished()`` without
``await``); their output is read by threads, and the same clean-up guarantees hold.

The processes are supervised children (:mod:`ivshmemd.supervise`); a peer is a
:class:`peers.harness.PeerProcess`, built by the one peer argv builder,
:func:`peers.harness.peer_command`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from typing import Any, Final, TypedDict, Unpack

import pytest

from ivshmemd.supervise import (
    STOP_GRACE,
    WAIT_TIMEOUT,
    DaemonProcess,
    Supervisor,
    SyncDaemon,
    SyncSupervisor,
    daemon_process,
    open_supervisor,
    sync_daemon_process,
    sync_supervisor,
)

from .harness import (
    PeerError,
    PeerProcess,
    PeerRecord,
    SyncPeerProcess,
    peer_command,
    peer_environment,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "STOP_GRACE",
    "DaemonFactory",
    "PeerError",
    "PeerOptions",
    "PeerProcess",
    "PeerRecord",
    "PeerSpawner",
    "SyncDaemon",
    "SyncPeerProcess",
    "SyncPeerSpawner",
    "ivshmem_daemon",
    "ivshmem_daemon_sync",
    "ivshmem_peers",
    "ivshmem_peers_sync",
    "peer_command",
    "peer_launch",
    "sync_daemon_process",
]

#: Seconds any wait may take before the test fails with what the peer said so far.
DEFAULT_TIMEOUT: Final = WAIT_TIMEOUT

Daemon = DaemonProcess | SyncDaemon | str
#: The ``ivshmem_daemon`` fixture: ``async with ivshmem_daemon(vectors=2) as daemon``.
DaemonFactory = Callable[..., AbstractAsyncContextManager[DaemonProcess]]


class PeerOptions(TypedDict, total=False):
    """Keyword options of the peer spawners: ``env`` adds environment variables,
    ``pythonpath`` directories (where a test-only plugin lives); ``wait_running=False``
    returns at once instead of when the peer runs; ``timeout`` bounds that wait."""

    env: dict[str, str] | None
    pythonpath: Sequence[str | os.PathLike[str]]
    wait_running: bool
    timeout: float


def peer_launch(
    daemon: Daemon,
    plugin: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    pythonpath: Sequence[str | os.PathLike[str]] = (),
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a peer of ``daemon`` (a daemon or a socket path): its
    device gets the daemon's vector count, ``pythonpath`` goes first on PYTHONPATH."""
    if isinstance(daemon, str):
        argv = peer_command(daemon, plugin, args)
    else:
        argv = peer_command(daemon.socket_path, plugin, args, vectors=daemon.vectors)
    return argv, peer_environment(env, pythonpath)


class PeerSpawner:
    """What the ``ivshmem_peers`` fixture gives: call it to start a peer.

    Use it only inside one test; the fixture stops every peer it started when the test ends.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self.peers: list[PeerProcess] = []

    async def __call__(
        self, daemon: DaemonProcess | str, plugin: str, args: Sequence[str] = (),
        **options: Unpack[PeerOptions],
    ) -> PeerProcess:  # fmt: skip
        """Start a peer running ``plugin`` (with its ``args``) against ``daemon`` (or a
        socket path). Returns once it is running (its ``peer_id`` known), unless
        ``wait_running=False``; raises :class:`PeerError` if it exits before that."""
        argv, env = peer_launch(
            daemon, plugin, args, options.get("env"), options.get("pythonpath", ())
        )
        peer = await self._supervisor.start(PeerProcess(argv), env=env, events=True)
        self.peers.append(peer)
        if options.get("wait_running", True):
            await peer.wait_running(options.get("timeout", DEFAULT_TIMEOUT))
        return peer


class SyncPeerSpawner:
    """What the ``ivshmem_peers_sync`` fixture gives: call it to start a peer (blocking)."""

    def __init__(self, supervisor: SyncSupervisor) -> None:
        self._supervisor = supervisor
        self.peers: list[SyncPeerProcess] = []

    def __call__(
        self, daemon: Daemon, plugin: str, args: Sequence[str] = (), **options: Unpack[PeerOptions]
    ) -> SyncPeerProcess:
        """Start a peer, as :meth:`PeerSpawner.__call__` does."""
        argv, env = peer_launch(
            daemon, plugin, args, options.get("env"), options.get("pythonpath", ())
        )
        peer = self._supervisor.start(SyncPeerProcess(argv), env=env, events=True)
        self.peers.append(peer)
        if options.get("wait_running", True):
            peer.wait_running(options.get("timeout", DEFAULT_TIMEOUT))
        return peer


@pytest.fixture
def ivshmem_daemon(tmp_path: Path) -> DaemonFactory:
    """Factory: ``async with ivshmem_daemon(vectors=2, size="1M", args=[...]) as daemon``
    runs a real ``ivshmemd`` under ``tmp_path`` and always cleans it up."""

    def start(**kwargs: Any) -> AbstractAsyncContextManager[DaemonProcess]:
        return daemon_process(tmp_path, **kwargs)

    return start


@pytest.fixture
async def ivshmem_peers() -> AsyncIterator[PeerSpawner]:
    """Spawner: ``peer = await ivshmem_peers(daemon, plugin="ping", args=[...])``; every peer
    is stopped (SIGTERM, then SIGKILL) and reaped when the test ends."""
    async with open_supervisor() as supervisor:
        yield PeerSpawner(supervisor)


@pytest.fixture
def ivshmem_daemon_sync(tmp_path: Path) -> Callable[..., AbstractContextManager[SyncDaemon]]:
    """Factory for plain tests: ``with ivshmem_daemon_sync(vectors=2) as daemon``."""

    def start(**kwargs: Any) -> AbstractContextManager[SyncDaemon]:
        return sync_daemon_process(tmp_path, **kwargs)

    return start


@pytest.fixture
def ivshmem_peers_sync() -> Iterator[SyncPeerSpawner]:
    """Spawner for plain tests: ``peer = ivshmem_peers_sync(daemon, plugin="ping")``; every
    peer is stopped and reaped when the test ends."""
    with sync_supervisor() as supervisor:
        yield SyncPeerSpawner(supervisor)
