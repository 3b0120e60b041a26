"""Child processes the daemon keeps across an in-place re-exec (:mod:`ivshmemd.handover`).

The daemon runs helpers in child processes linked to it by a unix socket pair (the control
plane, :mod:`ivshmemd.control.process`; a federation process would be another). An ``execve``
keeps the pid, so they stay our children: the new image adopts each one from its entry in
the state's ``children`` list::

    {"kind": "control", "pid": 1234, "link": 7, "stderr": 9, "pending": b"...", ...}

``link`` and ``stderr`` are carried fds; ``pending`` the link bytes received and not yet
handled (the next image handles them: a request is answered exactly once); anything else is
the kind's own. :class:`AdoptedProcess` stands in for the :class:`trio.Process` the old image
had: it waits through a pidfd (the kernel says when the child exits; no SIGCHLD handler) and
reaps with ``waitpid``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import trio

__all__ = ["AdoptedProcess", "ChildLinkEntry"]

#: one entry of the state's ``children`` list
ChildLinkEntry = dict[str, Any]


class AdoptedProcess:
    """A child started by an earlier image of this process: ``pid``, ``stderr`` (a stream
    of its stderr pipe, or None), :meth:`wait`, :meth:`kill`, ``returncode``."""

    def __init__(self, pid: int, stderr_fd: int | None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)
        self.stderr = None if stderr_fd is None else trio.lowlevel.FdStream(stderr_fd)

    async def wait(self) -> int:
        """Wait until the child exits and reap it; its exit code (negative: a signal)."""
        if self.returncode is None:
            assert self._pidfd is not None
            await trio.lowlevel.wait_readable(self._pidfd)
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            self._close()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL (through the pidfd: never another process that reused the pid)."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _close(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
