"""Child processes the daemon keeps across an in-place re-exec (:mod:`ivshmemd.handover`).

The daemon runs helpers in child processes linked to it by a unix socket pair (the control
plane, :mod:`ivshmemd.control.process`; the federation, :mod:`ivshmemd.fedproc`). An
``execve`` keeps the pid, so they stay our children: the new image adopts each one from its
entry in the state's ``children`` list::

    {"kind": "control", "pid": 1234, "link": 7, "stderr": 9, "pending": b"...", ...}

``link`` and ``stderr`` are carried fds; ``pending`` the link bytes received and not yet
handled (the next image handles them: a request is answered exactly once); anything else is
the kind's own. An entry whose ``link`` is None is a child caught starting or stopping (its
link was not carried): the new image reaps it (:func:`reap`), or it would stay a zombie.
:class:`AdoptedProcess` stands in for the :class:`trio.Process` the old image had: it waits
through a pidfd (the kernel says when the child exits; no SIGCHLD handler) and reaps with
``waitpid``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Protocol

import trio

__all__ = ["AdoptedProcess", "ChildLinkEntry", "LinkedChild"]

#: one entry of the state's ``children`` list
ChildLinkEntry = dict[str, Any]


class LinkedChild(Protocol):
    """The daemon's handle on a child process it carries across a re-exec
    (:class:`ivshmemd.control.process.ControlProcess`, :class:`ivshmemd.fedproc.
    FederationProcess`): ``name`` for messages, :meth:`hold` until its link is at a message
    boundary (and keep it so), :meth:`release` if the re-exec did not happen, :meth:`export`
    its entry (None: no process running, the next image starts one)."""

    name: str

    async def hold(self) -> None: ...

    def release(self) -> None: ...

    def export(self) -> ChildLinkEntry | None: ...


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


async def reap(pid: int, grace: float) -> None:
    """Reap a child an earlier image started and did not hand over (caught starting or
    stopping by the re-exec, or of a kind this command line no longer runs): its link closed,
    so it exits by itself; after ``grace`` seconds it is killed. Never a zombie."""
    try:
        process = AdoptedProcess(pid, None)
    except (ProcessLookupError, ChildProcessError):
        return
    with trio.move_on_after(grace):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
