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
    socket_path: str, plugin: str, args: Sequence[str] = (), *, vectors: int | None = None
) -> list[str]:
    """The argv of a peer reporting JSON events: ``ivshmem-peer -S SOCK --plugin NAME
    --report json [--vectors V] ARGS``. ``vectors`` gives its device exactly the daemon's
    vector count (unless ``args`` already says ``--vectors``)."""
    count = ["--vectors", str(vectors)] if vectors and "--vectors" not in args else []
    return [sys.executable, *PEER_MODULE, "-S", socket_path, "--plugin", plugin,
            "--report", "json", *count, *args]  # fmt: skip


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
    """One peer process (trio): its events, its log, and the waits a test needs."""

    async def wait_running(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Wait for the ``running`` event; return the peer id."""
        event = await self.wait_event(event=report.Running.KIND, timeout=timeout)
        return report.decode_as(event, report.Running).peer_id

    async def wait_finished(self, timeout: float = WAIT_TIMEOUT) -> str | None:
        """Wait until the plugin finishes; return its summary. Raises :class:`PeerError` if
        the plugin failed, or the peer stopped or died first."""
        return self.finished_summary(
            await self.wait_event(event=report.Finished.KIND, timeout=timeout)
        )


class SyncPeerProcess(PeerRecord, SyncChild):
    """One peer process in blocking code: the same as :class:`PeerProcess` without
    ``await``."""

    def wait_running(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Block until the ``running`` event; return the peer id."""
        event = self.wait_event(event=report.Running.KIND, timeout=timeout)
        return report.decode_as(event, report.Running).peer_id

    def wait_finished(self, timeout: float = WAIT_TIMEOUT) -> str | None:
        """Block until the plugin finishes; return its summary (raises if it failed)."""
        return self.finished_summary(self.wait_event(event=report.Finished.KIND, timeout=timeout))
