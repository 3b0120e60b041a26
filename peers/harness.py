"""A peer process under supervision: the one peer argv builder and the one peer harness.

Everything that runs ``ivshmem-peer`` as a child (the launcher, the pytest fixtures, the
benchmarks, the tests) builds its command with :func:`peer_command` and follows it as a
:class:`PeerProcess` (trio) or :class:`SyncPeerProcess` (blocking code): the supervised
child of :mod:`ivshmemd.supervise`, whose event stream is the peer's ``--report json``
events, plus what only a peer has: its id (from its ``running`` event) and the waits for
``running`` and ``finished``.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ivshmemd.supervise import WAIT_TIMEOUT, Child, ChildError, SyncChild

from . import report

__all__ = [
    "PeerError",
    "PeerProcess",
    "PeerRecord",
    "SyncPeerProcess",
    "peer_command",
    "peer_environment",
]

#: ``python -m peers``: what :func:`peer_command` runs (a fork server runs what follows).
PEER_MODULE: tuple[str, ...] = ("-m", "peers")


class PeerError(ChildError, AssertionError):
    """A peer did not do what was waited for (failed, died, or timed out)."""


def peer_command(
    socket_path: str,
    plugin: str,
    args: Sequence[str] = (),
    *,
    vectors: int | None = None,
    peer_args: Sequence[str] = (),
) -> list[str]:
    """The argv of a peer reporting JSON events: ``ivshmem-peer -S SOCK --report json
    [--vectors V] PEER_ARGS --plugin NAME ARGS``: ``args`` are the plugin's options,
    ``peer_args`` the peer's own (``--trio``, ``--wait 5``; see :mod:`peers.cmdline`).
    ``vectors`` gives its device exactly the daemon's vector count (unless ``peer_args``
    already says ``--vectors``)."""
    count = ["--vectors", str(vectors)] if vectors and "--vectors" not in peer_args else []
    return [sys.executable, *PEER_MODULE, "-S", socket_path, "--report", "json", *count,
            *peer_args, "--plugin", plugin, *args]  # fmt: skip


def peer_environment(
    env: Mapping[str, str] | None = None, pythonpath: Sequence[str | os.PathLike[str]] = ()
) -> dict[str, str]:
    """Our environment with ``env`` on top and ``pythonpath`` first on PYTHONPATH (where a
    test-only or third-party plugin lives)."""
    child_env = dict(os.environ)
    child_env.update(env or {})
    if pythonpath:
        paths = [os.fspath(p) for p in pythonpath]
        if child_env.get("PYTHONPATH"):
            paths.append(child_env["PYTHONPATH"])
        child_env["PYTHONPATH"] = os.pathsep.join(paths)
    return child_env


class PeerRecord:
    """What only a peer child has, for both drivers: its id and the meaning of its
    ``finished`` event. ``stderr`` is its log."""

    if TYPE_CHECKING:  # provided by the driver's record
        first_of: dict[str, dict[str, Any]]
        log: deque[str]
        silent: bool

        def describe(self) -> str: ...

    @property
    def peer_id(self) -> int | None:
        """The id the daemon gave it (from its ``running`` event), None before."""
        running = self.first_of.get(report.Running.KIND)
        return report.decode_as(running, report.Running).peer_id if running else None

    @property
    def stderr(self) -> list[str]:
        """Its stderr lines so far."""
        return list(self.log)

    def error(self, what: str, timeout: float) -> PeerError:
        why = "exited" if self.silent else f"did not within {timeout:g} s"
        return PeerError(f"expected {what}; the peer {why}: {self.describe()}")

    def finished_summary(self, event: Mapping[str, Any]) -> str | None:
        """The summary of a ``finished`` event; :class:`PeerError` if the plugin failed."""
        finished = report.decode_as(event, report.Finished)
        if not finished.ok:
            raise PeerError(f"the plugin failed: {finished.summary}: {self.describe()}")
        return finished.summary


class PeerProcess(PeerRecord, Child):
    """One peer process (trio): its events, its log, and the waits a test needs. Every
    wait's default timeout is :attr:`timeout` (the pytest fixtures set it from
    ``--ivshmem-timeout`` / ``ivshmem_timeout``)."""

    def __init__(self, argv: Sequence[str], *, timeout: float = WAIT_TIMEOUT,
                 **limits: int | None) -> None:  # fmt: skip
        super().__init__(argv, **limits)
        self.timeout = timeout

    async def wait_events(
        self, count: int, *, timeout: float | None = None, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events match ``fields``; return the first ``count``."""
        return await super().wait_events(count, timeout=timeout or self.timeout, **fields)

    async def wait_event(
        self, *, count: int = 1, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th event matching ``fields``, waiting for it if need be."""
        return await super().wait_event(count=count, timeout=timeout or self.timeout, **fields)

    async def wait_log(
        self, pattern: str, count: int = 1, timeout: float | None = None
    ) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return the first ``count``."""
        return await super().wait_log(pattern, count, timeout or self.timeout)

    async def wait_exit(self, timeout: float | None = None) -> int:
        """Wait until it has exited and its output is read; return its status."""
        return await super().wait_exit(timeout or self.timeout)

    async def wait_running(self, timeout: float | None = None) -> int:
        """Wait for the ``running`` event; return the peer id."""
        event = await self.wait_event(event=report.Running.KIND, timeout=timeout)
        return report.decode_as(event, report.Running).peer_id

    async def wait_finished(self, timeout: float | None = None) -> str | None:
        """Wait until the plugin finishes; return its summary. Raises :class:`PeerError` if
        the plugin failed, or the peer stopped or died first."""
        return self.finished_summary(
            await self.wait_event(event=report.Finished.KIND, timeout=timeout)
        )


class SyncPeerProcess(PeerRecord, SyncChild):
    """One peer process in blocking code: the same as :class:`PeerProcess` without
    ``await``."""

    def __init__(self, argv: Sequence[str], *, timeout: float = WAIT_TIMEOUT,
                 **limits: int | None) -> None:  # fmt: skip
        super().__init__(argv, **limits)
        self.timeout = timeout

    def wait_events(
        self, count: int, *, timeout: float | None = None, **fields: Any
    ) -> list[dict[str, Any]]:
        """Block until ``count`` events match ``fields``; return the first ``count``."""
        return super().wait_events(count, timeout=timeout or self.timeout, **fields)

    def wait_event(
        self, *, count: int = 1, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th event matching ``fields``, blocking for it if need be."""
        return super().wait_event(count=count, timeout=timeout or self.timeout, **fields)

    def wait_log(self, pattern: str, count: int = 1, timeout: float | None = None) -> list[str]:
        """Block until ``count`` log lines match ``pattern``; return the first ``count``."""
        return super().wait_log(pattern, count, timeout or self.timeout)

    def wait_exit(self, timeout: float | None = None) -> int:
        """Block until it has exited and its output is read; return its status."""
        return super().wait_exit(timeout or self.timeout)

    def wait_running(self, timeout: float | None = None) -> int:
        """Block until the ``running`` event; return the peer id."""
        event = self.wait_event(event=report.Running.KIND, timeout=timeout)
        return report.decode_as(event, report.Running).peer_id

    def wait_finished(self, timeout: float | None = None) -> str | None:
        """Block until the plugin finishes; return its summary (raises if it failed)."""
        return self.finished_summary(self.wait_event(event=report.Finished.KIND, timeout=timeout))
