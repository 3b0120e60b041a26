"""Proper daemonization: double fork, setsid, a locked pid file, and a start-up handshake.

The original process waits on a pipe until the daemon says it is serving (or why it failed),
so ``ivshmemd`` without ``-F`` returns only once the socket is listening and the pid file is
written, with a non-zero exit and the daemon's error message if start-up failed.

The pid file is written safely in any directory: its content goes to a temporary file with
an unpredictable name (``mkstemp``: ``O_CREAT | O_EXCL``, never through a symlink), which is
locked (``flock``) and then linked or renamed into place, so the path always holds a
complete pid. The daemon holds that lock while it runs: a second daemon given the same pid
file sees it locked and refuses to start instead of taking it over, and a pid file left by
a dead daemon (unlocked) is replaced. At shutdown the file is removed only while the path
still names the file this daemon wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from .lockfile import LockError, identity, open_regular_nofollow, still_names

__all__ = ["PidFile", "PidFileError", "daemonize", "write_pidfile"]

_OK = b"ok"
_ATTEMPTS = 8


class PidFileError(Exception):
    """The pid file cannot be written (the message says why)."""


@dataclass
class PidFile:
    """The pid file this process wrote and holds locked."""

    path: str
    fd: int
    ident: tuple[int, int]

    def remove(self) -> None:
        """Unlink the file if the path still names ours, then drop the lock."""
        if self.fd < 0:
            return
        if still_names(self.path, self.ident):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
    return ""


def _replace_if_stale(tmp: str, path: str) -> bool:
    """If ``path`` holds an unlocked (stale) pid file, rename ``tmp`` over it; False if
    the path changed meanwhile. Raises PidFileError if a live process holds it."""
    try:
        old, _created = open_regular_nofollow(path, os.O_RDONLY, 0, "pid file")
    except LockError as exc:
        raise PidFileError(str(exc)) from None
    try:
        try:
            fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PidFileError(
                f"pid file {path} is held by a running daemon{_holder(old)}"
            ) from None
        if not still_names(path, identity(os.fstat(old))):
            return False
        os.rename(tmp, path)  # atomic; we hold the old file's lock meanwhile
        return True
    finally:
        os.close(old)


def write_pidfile(path: str) -> PidFile:
    """Write our pid to ``path`` (see the module docstring); raises :class:`PidFileError`."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    except OSError as exc:
        raise PidFileError(f"cannot write pid file {path}: {exc.strerror}") from None
    placed = False
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for _ in range(_ATTEMPTS):
            try:
                os.link(tmp, path)
                placed = True
                break
            except FileExistsError:
                if _replace_if_stale(tmp, path):
                    placed = True
                    break
        if not placed:
            raise PidFileError(f"pid file {path} keeps changing under us")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # after link(): the second name goes
        return PidFile(path, fd, identity(os.fstat(fd)))
    except OSError as exc:
        raise PidFileError(f"cannot write pid file {path}: {exc.strerror}") from None
    finally:
        if not placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.close(fd)


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
