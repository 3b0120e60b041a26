"""Starting a child process the supervised way (the notify socket we own, the options both
drivers pass to ``Popen``), the supervisor's constants, and the /proc figures of a process."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from ..sdnotify import NOTIFY_SOCKET_ENV

__all__ = [
    "NOTIFY_DATAGRAM_MAX",
    "READ_CHUNK",
    "STOP_GRACE",
    "WAIT_TIMEOUT",
    "Launch",
    "cpu_seconds",
    "fd_count",
    "rss_bytes",
]

#: Seconds any wait may take before it fails with what the child said so far.
WAIT_TIMEOUT: Final = 30.0
#: Seconds a child gets to exit after SIGTERM before SIGKILL.
STOP_GRACE: Final = 10.0
#: Largest notify datagram read (sd_notify messages are a few short lines).
NOTIFY_DATAGRAM_MAX: Final = 4096
#: Bytes read from a pipe at a time.
READ_CHUNK: Final = 1 << 16

_NOTIFY_PREFIX: Final = "ivshmem-supervise"


@dataclass(frozen=True)
class Launch:
    """How to start a child (see ``Supervisor.start``): ``events`` pipes its stdout as an
    event stream (else /dev/null), ``notify`` gives it a notify socket of ours, ``stdin`` a
    pipe (else /dev/null), ``process_group`` makes it a group leader (a terminal's Ctrl-C
    does not reach it); ``env`` is its whole environment (default: ours)."""

    env: Mapping[str, str] | None = None
    notify: bool = False
    events: bool = False
    stdin: bool = False
    process_group: bool = False
    pass_fds: Sequence[int] = ()
    cwd: str | os.PathLike[str] | None = None

    @contextmanager
    def opening(self) -> Iterator[tuple[socket.socket | None, dict[str, Any]]]:
        """The notify socket (or None) and the ``Popen`` options, for the block that starts
        the process; the socket is closed should the start fail."""
        notify = self.notify_socket()
        try:
            yield notify, self.popen_options(notify)
        except BaseException:
            if notify is not None:
                notify.close()
            raise

    def notify_socket(self) -> socket.socket | None:
        """With ``notify``: a datagram socket bound in the abstract namespace (no file to
        remove) for the child's ``$NOTIFY_SOCKET``."""
        if not self.notify:
            return None
        name = f"{_NOTIFY_PREFIX}-{os.getpid()}-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(b"\0" + name.encode())
        except BaseException:
            sock.close()
            raise
        return sock

    def popen_options(self, notify: socket.socket | None) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.Popen`` and ``trio.lowlevel.open_process``:
        stderr is always a pipe (the log); ``$NOTIFY_SOCKET`` is ours or unset, never the
        caller's own systemd socket."""
        env = dict(os.environ if self.env is None else self.env)
        env.pop(NOTIFY_SOCKET_ENV, None)
        if notify is not None:
            env[NOTIFY_SOCKET_ENV] = "@" + notify.getsockname()[1:].decode()
        return {
            "stdin": subprocess.PIPE if self.stdin else subprocess.DEVNULL,
            "stdout": subprocess.PIPE if self.events else subprocess.DEVNULL,
            "stderr": subprocess.PIPE,
            "env": env,
            "process_group": 0 if self.process_group else None,
            "pass_fds": tuple(self.pass_fds),
            "cwd": self.cwd,
        }


def fd_count(pid: int) -> int:
    """How many fds process ``pid`` has open (from /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (from /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (from /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
