"""The exit statuses every command of the project uses (``ivshmemd``, ``ivshmem-peer``,
``ivshmemctl`` and its ``up``, the benchmarks), so that scripts can rely on one meaning."""

from __future__ import annotations

from typing import Final

__all__ = [
    "EXIT_FAILED",
    "EXIT_NO_DAEMON",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_USAGE_QEMU",
    "signal_exit",
]

EXIT_OK: Final = 0
#: It ran and failed: a peer or the daemon failed, the daemon refused a request.
EXIT_FAILED: Final = 1
#: Bad command-line input (argparse's own status).
EXIT_USAGE: Final = 2
#: ``ivshmemd``: bad command-line input, with the status QEMU's ivshmem-server exits with
#: (a drop-in replacement keeps it: scripts written for QEMU's server test for 1).
EXIT_USAGE_QEMU: Final = 1
#: ``ivshmemctl``: no daemon answered.
EXIT_NO_DAEMON: Final = 3


def signal_exit(signum: int) -> int:
    """The status a shell reports for a command ended by ``signum`` (130 for SIGINT)."""
    return 128 + signum
