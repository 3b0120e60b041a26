"""Running the ``ivshmemd`` command to completion in tests: start-up errors, daemon mode
(``-p PIDFILE`` without ``-F``: the command returns once the daemon listens, and the daemon
is no child of ours). A plain helper module for the daemon's command-line tests; daemons a
test keeps running in the foreground go through :mod:`ivshmemd.supervise` instead."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from ivshmemd.shm import SHM_DIR

__all__ = ["TIMEOUT", "one_clear_line", "run_daemon_cli", "shm_exists", "stop_daemonized",
           "wait_pid_exit"]  # fmt: skip

TIMEOUT = 20.0


def run_daemon_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``ivshmemd ARGS...`` run to its end (daemon mode returns once the daemon listens)."""
    return subprocess.run(
        [sys.executable, "-m", "ivshmemd", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 1 with ``message``, and nothing like a traceback."""
    assert result.returncode == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr


def shm_exists(name: str) -> bool:
    """Whether the POSIX shm object ``name`` exists."""
    return os.path.exists(f"{SHM_DIR}/{name}")


def wait_pid_exit(pid: int) -> None:
    """Block until a process that is not our child exits (pidfd readiness, no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], TIMEOUT)
        assert ready, f"pid {pid} did not exit"
    finally:
        os.close(pidfd)


def stop_daemonized(pidfile: Path) -> None:
    """SIGTERM the daemon a pid file names, if there is one, and wait until it is gone."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_pid_exit(pid)
