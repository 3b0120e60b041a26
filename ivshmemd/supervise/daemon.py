"""``ivshmemd`` itself as a supervised child: its argv, unique names, readiness, clean-up.

:func:`daemon_process` (trio) and :func:`sync_daemon_process` (blocking) run a foreground
daemon for the duration of a block: a unique socket in the caller's directory and a unique
POSIX shm name, ready once the daemon itself says ``READY=1`` on the notify socket the
supervisor owns; on the way out, however the block ends, SIGTERM (SIGKILL if it hangs),
reaped, and whatever it may have left removed (its socket, its shm). The log stays at hand
(``daemon.log``, ``await daemon.wait_log("peer 3 joined")``) for the tests and for failure
messages.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from ..shm import unlink_posix_shm
from .async_children import Child, open_supervisor
from .spawn import WAIT_TIMEOUT, fd_count, rss_bytes
from .sync_children import SyncChild, sync_supervisor

__all__ = [
    "DaemonProcess",
    "SyncDaemon",
    "daemon_command",
    "daemon_process",
    "sync_daemon_process",
    "unique_name",
]

DEFAULT_SIZE = "1M"


def unique_name(prefix: str = "ivshmem-test") -> str:
    """A shm (or file) name no other run uses."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def daemon_command(
    socket_path: str,
    shm_name: str,
    vectors: int = 1,
    size: str | int | None = DEFAULT_SIZE,
    args: Sequence[str] = (),
) -> list[str]:
    """The argv of a foreground daemon with these settings (``size`` None: the daemon's
    default; ``args``: more options)."""
    size_option = ["-l", str(size)] if size is not None else []
    return [sys.executable, "-m", "ivshmemd", "-F", "-S", socket_path, "-M", shm_name,
            *size_option, "-n", str(vectors), *args]  # fmt: skip


class _DaemonFacts:
    """Where a daemon child listens and what it owns (shared by both drivers)."""

    pid: int
    returncode: int | None
    socket_path: str
    shm_name: str
    vectors: int

    def _set_facts(self, socket_path: str, shm_name: str, vectors: int) -> None:
        self.socket_path = socket_path
        self.shm_name = shm_name
        self.vectors = vectors

    def fd_count(self) -> int:
        """The daemon's open fd count."""
        return fd_count(self.pid)

    def rss(self) -> int:
        """The daemon's resident memory in bytes."""
        return rss_bytes(self.pid)

    def remove_leftovers(self) -> None:
        """Remove the socket and the shm a daemon that did not exit cleanly may have left
        (one that did has removed them itself, or kept its shm on purpose: ``--keep-shm``)."""
        if self.returncode == 0:
            return
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        unlink_posix_shm(self.shm_name)


class DaemonProcess(_DaemonFacts, Child):
    """A running daemon (trio): ``socket_path``, ``shm_name``, ``vectors``, its ``log``."""

    def __init__(self, argv: Sequence[str], socket_path: str, shm_name: str, vectors: int) -> None:
        Child.__init__(self, argv)
        self._set_facts(socket_path, shm_name, vectors)


class SyncDaemon(_DaemonFacts, SyncChild):
    """A running daemon (blocking code): the same as :class:`DaemonProcess`."""

    def __init__(self, argv: Sequence[str], socket_path: str, shm_name: str, vectors: int) -> None:
        SyncChild.__init__(self, argv)
        self._set_facts(socket_path, shm_name, vectors)


def _plan(
    directory: str | os.PathLike[str],
    socket_path: str | None,
    shm_name: str | None,
    vectors: int,
    size: str | int,
    args: Sequence[str],
    wrapper: Sequence[str],
) -> tuple[list[str], str, str]:
    socket_path = socket_path or str(Path(directory) / f"ivshmem-{uuid.uuid4().hex[:8]}.sock")
    shm_name = shm_name or unique_name()
    argv = [*wrapper, *daemon_command(socket_path, shm_name, vectors, size, args)]
    return argv, socket_path, shm_name


@asynccontextmanager
async def daemon_process(
    directory: str | os.PathLike[str],
    *,
    vectors: int = 1,
    size: str | int = DEFAULT_SIZE,
    args: Sequence[str] = (),
    shm_name: str | None = None,
    wait_ready: bool = True,
    env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
    socket_path: str | None = None,
    timeout: float = WAIT_TIMEOUT,
) -> AsyncIterator[DaemonProcess]:
    """Run ``ivshmemd`` in the foreground for the duration of the block (trio).

    The socket is a unique name in ``directory`` unless ``socket_path`` is given; the shm
    name is unique unless ``shm_name`` is. ``wrapper`` prefixes the command (e.g.
    ``["prlimit", "--nofile=64"]``); ``env`` is its whole environment.
    """
    argv, socket_path, shm_name = _plan(
        directory, socket_path, shm_name, vectors, size, args, wrapper
    )
    async with open_supervisor() as supervisor:
        daemon = DaemonProcess(argv, socket_path, shm_name, vectors)
        try:
            await supervisor.start(daemon, env=env, notify=True)
            if wait_ready:
                await daemon.wait_ready(timeout)
            yield daemon
        finally:
            await supervisor.aclose()
            daemon.remove_leftovers()


@contextmanager
def sync_daemon_process(
    directory: str | os.PathLike[str],
    *,
    vectors: int = 1,
    size: str | int = DEFAULT_SIZE,
    args: Sequence[str] = (),
    shm_name: str | None = None,
    env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
    socket_path: str | None = None,
    timeout: float = WAIT_TIMEOUT,
) -> Iterator[SyncDaemon]:
    """Run ``ivshmemd`` for the duration of the block (blocking code); the same as
    :func:`daemon_process`, ready when the block starts."""
    argv, socket_path, shm_name = _plan(
        directory, socket_path, shm_name, vectors, size, args, wrapper
    )
    with sync_supervisor() as supervisor:
        daemon = SyncDaemon(argv, socket_path, shm_name, vectors)
        try:
            supervisor.start(daemon, env=env, notify=True)
            daemon.wait_ready(timeout)
            yield daemon
        finally:
            supervisor.close()
            daemon.remove_leftovers()
