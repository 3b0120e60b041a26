"""Proper daemonization: double fork, setsid, pid file, and a start-up handshake.

The original process waits on a pipe until the daemon says it is serving (or why it failed),
so ``ivshmemd`` without ``-F`` returns only once the socket is listening and the pid file is
written, with a non-zero exit and the daemon's error message if start-up failed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["daemonize", "write_pidfile"]

_OK = b"ok"


def write_pidfile(path: str) -> None:
    """Write our pid to ``path`` atomically (a temporary file renamed into place)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as out:
        out.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def daemonize(log_fd: int | None = None) -> Callable[[str | None], None]:
    """Detach; return ``report(error)`` for the daemon to call once: ``None`` means ready.

    In the original process this function never returns: it exits 0 once the daemon reports
    ready, or 1 with the reported error (or a generic one if the daemon died silently).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        os.close(read_end)
        os.waitpid(first, 0)
        answer = b"".join(chunks)
        if answer == _OK:
            os._exit(0)
        message = answer.decode(errors="replace") or "the daemon exited during start-up"
        print(f"ivshmemd: {message}", file=sys.stderr)
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log_fd if log_fd is not None else devnull, 2)
    os.close(devnull)
    reported = False

    def report(error: str | None) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        try:
            os.write(write_end, _OK if error is None else error.encode())
        except OSError:
            pass
        os.close(write_end)

    return report
