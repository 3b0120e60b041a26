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

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from .activation import PassedFd, adopt_unix_listener
from .daemon import PidFile, write_pidfile
from .listener import Listener, bind_listener
from .lockfile import HeldLock, LockBusy, LockError, acquire_lock, socket_lock_path
from .shm import SharedMemoryRegion, adopt_shm_fd, open_posix_shm, open_shm_in_dir
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

    def adopt_shm(self, kind: str, where: str, fd: int, size: int) -> None:
        """Step 2, after a crash: the shm systemd's fd store kept (see
        :func:`ivshmemd.shm.adopt_shm_fd`)."""
        self.shm = adopt_shm_fd(kind, where, fd, size)

    def listen(
        self,
        socket_path: str,
        mode: int,
        gid: int | None,
        passed: list[PassedFd] | None = None,
        stored: int | None = None,
    ) -> None:
        """Step 3: the socket systemd passed us (socket activation: ``passed``; or the one
        we bound before a crash, kept in the fd store: ``stored``), or our own."""
        if stored is not None:
            sock = socket.socket(fileno=stored)
            sock.setblocking(False)
            ident = None
            with contextlib.suppress(OSError):
                st = os.lstat(socket_path)
                if stat.S_ISSOCK(st.st_mode) and sock.getsockname() == socket_path:
                    ident = (st.st_dev, st.st_ino)
            self.listener = Listener(sock, socket_path if ident else None, ident)
            return
        adopted = adopt_unix_listener(passed=passed)
        if adopted is not None:
            self.listener = Listener(adopted, None)
        else:
            self.listener = bind_listener(socket_path, mode, gid)

    def write_pidfile(self, path: str) -> None:
        """Step 4 (daemon mode)."""
        self.pidfile = write_pidfile(path)

    def export(self) -> dict[str, Any]:
        """What :meth:`adopt` needs in another image of this process (fd numbers, paths,
        identities); the fds themselves are :meth:`fds`."""
        lock, shm, listener, pidfile = self.lock, self.shm, self.listener, self.pidfile
        return {
            "lock": None if lock is None else [lock.path, lock.fd, list(lock.ident), lock.created],
            "shm": None if shm is None else {
                "fd": shm.fd, "size": shm.size, "name": shm.name, "directory": shm.directory,
                "created": shm.created, "lock_fd": shm.lock_fd,
                "ident": None if shm.ident is None else list(shm.ident),
            },
            "listener": None if listener is None else [
                listener.sock.fileno(), listener.path,
                None if listener.identity is None else list(listener.identity),
            ],
            "pidfile": None if pidfile is None else [pidfile.path, pidfile.fd, list(pidfile.ident)],
        }  # fmt: skip

    def fds(self) -> list[int]:
        """Every fd held (to carry across ``execve``): the locks stay held."""
        held = []
        if self.lock is not None:
            held.append(self.lock.fd)
        if self.shm is not None:
            held.extend(fd for fd in (self.shm.fd, self.shm.lock_fd) if fd >= 0)
        if self.listener is not None:
            held.append(self.listener.sock.fileno())
        if self.pidfile is not None:
            held.append(self.pidfile.fd)
        return held

    @classmethod
    def adopt(cls, state: dict[str, Any]) -> DaemonResources:
        """The resources :meth:`export` described, already held by this process."""
        held = cls(serving=True)
        if state["lock"] is not None:
            path, fd, ident, created = state["lock"]
            held.lock = HeldLock(path, fd, (ident[0], ident[1]), created)
        shm = state["shm"]
        if shm is not None:
            ident = shm["ident"]
            held.shm = SharedMemoryRegion(
                fd=shm["fd"], size=shm["size"], name=shm["name"], directory=shm["directory"],
                created=shm["created"], lock_fd=shm["lock_fd"],
                ident=None if ident is None else (ident[0], ident[1]),
            )  # fmt: skip
        if state["listener"] is not None:
            fd, path, ident = state["listener"]
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            held.listener = Listener(sock, path, None if ident is None else (ident[0], ident[1]))
        if state["pidfile"] is not None:
            path, fd, ident = state["pidfile"]
            held.pidfile = PidFile(path, fd, (ident[0], ident[1]))
        return held

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
