"""What each signal does to a running daemon.

==========  =================================================================================
SIGTERM,    clean shutdown: every peer freed in connection order (the others are told), the
SIGINT,     control plane stopped, the socket, its ``.ctl``/``.events`` and ``.lock`` files
SIGQUIT     removed, the ``-M`` shm unlinked unless ``--keep-shm``, the pid file removed
SIGHUP      reopen the log file (``--log-file``, or the fallback file), as logrotate expects
            after renaming it; with stderr or syslog there is nothing to reopen (logged)
SIGUSR1     write the daemon's state to the log: peers, fds, fds in flight, queues, counters,
            the control plane process
SIGUSR2     upgrade in place: re-execute whatever ``ivshmemd`` is installed now, same pid,
            keeping every peer, queue and the control plane (:mod:`ivshmemd.upgrade`); if
            the new executable fails its check, one line says why and the daemon serves on
==========  =================================================================================
"""

from __future__ import annotations

import signal

__all__ = ["HANDLED", "STOP", "UPGRADE", "describe", "name"]

STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
UPGRADE = signal.SIGUSR2
HANDLED = (*STOP, signal.SIGHUP, signal.SIGUSR1, UPGRADE)


def name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe() -> str:
    """The table above, for ``--help``."""
    return (
        "  SIGTERM, SIGINT, SIGQUIT: clean shutdown (peers freed, the others told; socket and\n"
        "    control files removed; -M shm unlinked unless --keep-shm)\n"
        "  SIGHUP: reopen the log file (for logrotate)\n"
        "  SIGUSR1: write the daemon's state (peers, fds, queues, counters) to the log\n"
        "  SIGUSR2: upgrade in place (same pid, every peer kept); if the new executable\n"
        "    fails its check (ivshmemd --check-upgrade), the daemon says why and serves on\n"
    )
