"""Liveness locks: how one ivshmemd tells that another is alive without talking to it.

A live daemon holds an exclusive ``flock`` on ``SOCKET.lock`` beside its socket for as long
as it runs; the kernel drops the lock when the process dies, however it dies, so a lock that
can be taken means nobody is serving that socket. A second daemon takes the lock *before*
it touches any shared memory or socket file, and a refused one leaves everything as it was.
Deciding liveness this way never connects to the live daemon (a probe connection would be a
phantom peer joining and leaving for everyone else).

Files in world-writable directories are opened with ``O_NOFOLLOW`` (a planted symlink is
refused, never followed), must be regular files owned by our effective uid (a file another
user made could be held locked by them forever), and are re-checked after locking: if the
path was unlinked or replaced while we waited, the lock is on a dead inode and we try again.
A lock file is removed at the end only by the daemon that created it, and only while the
path still names the inode it locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

__all__ = ["HeldLock", "LockBusy", "LockError", "acquire_lock", "socket_lock_path"]

_ATTEMPTS = 8


class LockError(Exception):
    """The lock file cannot be used (a symlink, not a regular file, another owner, ...)."""


class LockBusy(LockError):
    """Another live process holds the lock."""


def socket_lock_path(socket_path: str) -> str:
    """The lock file of the daemon serving ``socket_path``."""
    return socket_path + ".lock"


def identity(st: os.stat_result) -> tuple[int, int]:
    """(device, inode): what a path must still name for it to be "ours"."""
    return st.st_dev, st.st_ino


def still_names(path: str, ident: tuple[int, int]) -> bool:
    """True if ``path`` (not followed) is the inode ``ident``."""
    try:
        return identity(os.lstat(path)) == ident
    except OSError:
        return False


def open_regular_nofollow(path: str, flags: int, mode: int, what: str) -> tuple[int, bool]:
    """Open (creating if ``O_CREAT`` is in ``flags``) a regular file that is ours, never
    through a symlink; returns ``(fd, created)``. Raises :class:`LockError`."""
    created = False
    base = flags | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if flags & os.O_CREAT:
            try:
                fd = os.open(path, base | os.O_EXCL, mode)
                created = True
            except FileExistsError:
                fd = os.open(path, base & ~os.O_CREAT)
        else:
            fd = os.open(path, base)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockError(f"{what} {path} is a symlink; refusing to follow it") from None
        raise LockError(f"cannot open {what} {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})"
    if problem is not None:
        os.close(fd)
        raise LockError(f"{what} {path} {problem}; refusing to use it")
    return fd, created


@dataclass
class HeldLock:
    """An exclusive flock on ``path`` that this process holds until :meth:`release`."""

    path: str
    fd: int
    ident: tuple[int, int]
    created: bool

    def release(self) -> None:
        """Remove the file if we created it and it is still ours, then drop the lock."""
        if self.fd < 0:
            return
        if self.created and still_names(self.path, self.ident):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1


def acquire_lock(path: str, what: str = "lock file") -> HeldLock:
    """Take an exclusive, non-blocking flock on ``path`` (created 0600 if missing).

    Raises :class:`LockBusy` if a live process holds it, :class:`LockError` otherwise.
    """
    for _ in range(_ATTEMPTS):
        fd, created = open_regular_nofollow(path, os.O_RDWR | os.O_CREAT, 0o600, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"{what} {path} is held by a running process") from None
        except OSError as exc:
            os.close(fd)
            raise LockError(f"cannot lock {what} {path}: {exc.strerror}") from None
        ident = identity(os.fstat(fd))
        if still_names(path, ident):
            return HeldLock(path, fd, ident, created)
        os.close(fd)  # unlinked or replaced while we locked it: try the new one
    raise LockError(f"{what} {path} keeps changing under us; refusing to start")
