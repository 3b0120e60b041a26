"""What a daemon holds while it runs, taken in a safe order and given back cleanly.

Order of acquisition (each step only once the one before succeeded):

1. the liveness lock ``SOCKET.lock`` (:mod:`ivshmemd.lockfile`): a daemon already serving
   this socket is detected here, before anything else is touched, without connecting to it;
2. the shared memory (:mod:`ivshmemd.shm`), itself locked against a daemon on another socket;
3. the listening socket, adopted from systemd or bound (:mod:`ivshmemd.listener`);
4. after daemonizing, the pid file (:mod:`ivshmemd.daemon`), locked too.

:meth:`DaemonResources.release` gives back what was taken, in reverse order: the socket file
and pid file are removed only while their paths still name ours, and the ``-M`` object is
unlinked only if it is still ours and either the daemon served (QEMU's behaviour at shutdown,
unless ``--keep-shm``) or this daemon created it during a start-up that then failed. A
refused start therefore leaves every file as it found it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .activation import adopt_unix_listener
from .daemon import PidFile, write_pidfile
from .listener import Listener, bind_listener
from .lockfile import HeldLock, LockBusy, LockError, acquire_lock, socket_lock_path
from .shm import SharedMemoryRegion, open_posix_shm, open_shm_in_dir
from .sockpath import SocketPathError, check_socket_path

__all__ = ["DaemonResources", "StartupError"]


class StartupError(Exception):
    """A resource cannot be had (the message says why, in one line)."""


@dataclass
class DaemonResources:
    """The lock, shm, listener and pid file of one daemon (see the module docstring)."""

    lock: HeldLock | None = None
    shm: SharedMemoryRegion | None = None
    listener: Listener | None = None
    pidfile: PidFile | None = None
    serving: bool = False

    def take_lock(self, socket_path: str) -> None:
        """Step 1: the liveness lock beside the socket."""
        try:
            check_socket_path(socket_path)
        except SocketPathError as exc:
            raise StartupError(str(exc)) from None
        path = socket_lock_path(socket_path)
        try:
            self.lock = acquire_lock(path, "lock file")
        except LockBusy:
            raise StartupError(
                f"another ivshmemd is already running on {socket_path} (it holds {path})"
            ) from None
        except LockError as exc:
            raise StartupError(str(exc)) from None

    def open_shm(self, kind: str, where: str, size: int, *, sparse: bool) -> None:
        """Step 2: ``kind`` "posix" (``-M where``) or "dir" (``-m where``)."""
        if kind == "dir":
            self.shm = open_shm_in_dir(where, size, sparse=sparse)
        else:
            self.shm = open_posix_shm(where, size, sparse=sparse)

    def listen(self, socket_path: str, mode: int, gid: int | None) -> None:
        """Step 3: the socket systemd passed us, or our own."""
        adopted = adopt_unix_listener()
        if adopted is not None:
            self.listener = Listener(adopted, None)
        else:
            self.listener = bind_listener(socket_path, mode, gid)

    def write_pidfile(self, path: str) -> None:
        """Step 4 (daemon mode)."""
        self.pidfile = write_pidfile(path)

    def release(self, *, keep_shm: bool) -> None:
        """Give everything back, in reverse order (see the module docstring)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.shm is not None:
            unlink = (self.serving and not keep_shm) or (not self.serving and self.shm.created)
            if unlink:
                self.shm.unlink_if_ours()
            self.shm.close()
            self.shm = None
        if self.pidfile is not None:
            self.pidfile.remove()
            self.pidfile = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
