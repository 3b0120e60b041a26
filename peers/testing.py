"""Test helpers for your own multi-process tests: a real ``ivshmemd`` for the duration of a
block, always cleaned up.

:func:`daemon_process` (trio) and :func:`sync_daemon_process` run the daemon through its
command line in the foreground under supervision (:mod:`ivshmemd.supervise`): ready once it
says ``READY=1``, its log at hand (``await daemon.wait_log("peer 3 joined")`` instead of
sleeping), and on exit SIGTERM (SIGKILL if it hangs) and the removal of whatever it may
have left, its socket and its POSIX shm. Socket and shm names are unique per call. Peer
processes: :mod:`peers.harness` and the pytest fixtures of :mod:`peers.pytest_plugin`.
"""

from __future__ import annotations

from ivshmemd.supervise import (
    DaemonProcess,
    SyncDaemon,
    daemon_command,
    daemon_process,
    fd_count,
    rss_bytes,
    sync_daemon_process,
    unique_name,
)

__all__ = [
    "DaemonProcess",
    "SyncDaemon",
    "daemon_command",
    "daemon_process",
    "fd_count",
    "rss_bytes",
    "sync_daemon_process",
    "unique_name",
]
