"""The daemon's listening unix socket: stale-path handling, permissions, adoption.

A socket file nobody listens on (left by a crash) is replaced; a live one, where another
server answers, makes start-up fail with a clear message, as does a path that is not a
socket at all (we never delete a user's regular file). The socket's identity (device and
inode) is recorded so that shutdown unlinks the path only while it is still ours.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from dataclasses import dataclass

__all__ = ["DEFAULT_BACKLOG", "Listener", "ListenerError", "bind_listener", "parse_group"]

DEFAULT_BACKLOG = 1024
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class ListenerError(Exception):
    """The socket path cannot be used (the message says why)."""


@dataclass
class Listener:
    """A listening unix stream socket and the path it is bound to (None when adopted)."""

    sock: socket.socket
    path: str | None
    identity: tuple[int, int] | None = None

    def unlink_if_ours(self) -> bool:
        """Remove the socket file if it is still the one we bound."""
        if self.path is None or self.identity is None:
            return False
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != self.identity:
            return False
        os.unlink(self.path)
        return True

    def close(self) -> None:
        """Close the socket and unlink our path."""
        self.unlink_if_ours()
        self.sock.close()


def parse_group(group: str) -> int:
    """A group name or numeric gid -> gid."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenerError(f"unknown group {group!r}") from None


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
        return
    except OSError as exc:
        if exc.errno in (errno.ENOENT,):
            return
        raise ListenerError(f"cannot check existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"another server is already listening on {path}")


def bind_listener(
    path: str,
    mode: int = 0o600,
    group: int | None = None,
    backlog: int = DEFAULT_BACKLOG,
) -> Listener:
    """Bind and listen on ``path`` with the given file mode and group."""
    if not path:
        raise ListenerError("the socket path is empty")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ListenerError(
            f"socket path too long ({len(os.fsencode(path))} bytes, the limit is {_SUN_PATH_MAX})"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ListenerError(f"cannot create socket {path}: directory {parent} does not exist")
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener: Listener | None = None
    try:
        # Bind under a restrictive umask so the socket is never briefly more open than asked.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        st = os.lstat(path)
        listener = Listener(sock, path, (st.st_dev, st.st_ino))
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        if listener is not None:
            listener.unlink_if_ours()
        sock.close()
        raise ListenerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return listener
