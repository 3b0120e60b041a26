"""Putting a unix socket file at a path without races, and removing only our own.

Used for the daemon's socket and for the control plane's ipc endpoints (``SOCK.ctl``,
``SOCK.events``), which often live in world-writable directories such as ``/tmp``:

* **No path races on the mode or the group.** The socket is bound inside a private 0700
  directory made beside the target (reached through ``/proc/self/fd/N``, so the bind path
  stays short whatever the directory), under a umask that gives it exactly the requested
  mode, and chowned there, where nobody else can swap the file. Only then is it hard-linked
  to its public name. Nothing is ever chmod'ed or chowned through the public path, so a
  symlink swapped in there can redirect nothing.
* **Only a stale socket is ever replaced.** ``link()`` never replaces anything, so a file
  that appears at the path while we start makes start-up fail instead of being deleted. A
  socket already at the path is removed only when nobody listens on it (a crash leftover);
  a live one, or anything that is not a socket, is refused. Whether anyone listens is read
  from ``/proc/net/unix`` (the kernel's table of bound sockets), so deciding it never
  connects to a live server as a client would.
* **Removal checks identity.** :func:`unlink_if_ours` removes the path only while it still
  names the inode we bound.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator

from .lockfile import identity, still_names

__all__ = [
    "SUN_PATH_MAX",
    "SocketPathError",
    "check_socket_path",
    "clear_stale_socket",
    "ipc_path",
    "is_listening",
    "place_socket",
    "unlink_if_ours",
]

#: sizeof(sockaddr_un.sun_path) - 1 on Linux
SUN_PATH_MAX = 107
_UNIX_TABLE = "/proc/net/unix"
_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


class SocketPathError(Exception):
    """The socket path cannot be used (the message says why)."""


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint; None for abstract or non-ipc ones."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    if path.startswith("@"):
        return None
    return path


def check_socket_path(path: str) -> None:
    """Length and parent directory checks, with the messages users need."""
    if not path:
        raise SocketPathError("the socket path is empty")
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise SocketPathError(
            f"socket path too long ({size} bytes, the limit is {SUN_PATH_MAX}): {path}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SocketPathError(f"cannot create socket {path}: directory {parent} does not exist")


def is_listening(path: str) -> bool:
    """Whether some process has a listening unix socket bound to ``path``.

    Read from ``/proc/net/unix`` (the kernel's table of bound sockets) first: a server that
    bound ``path`` itself, QEMU's ivshmem-server for one, is found there without connecting
    to it. That table names a socket by the path it was *bound* at, though, and
    :func:`place_socket` binds in a private directory before linking the public name, so a
    socket placed that way (a live daemon's control or federation socket) is not listed
    under ``path``: for a socket file the table does not name, a connection attempt decides
    (refused: a stale file). A live ``ivshmemd``'s main socket never gets that far: its
    liveness lock refuses a second daemon first. A socket whose file was since unlinked
    still counts: refusing is the safe side. Only the connection attempt is made where the
    table cannot be read.
    """
    wanted = os.path.abspath(path)
    try:
        with open(_UNIX_TABLE, "rb") as table:
            next(table, None)  # header
            for line in table:
                fields = line.split(maxsplit=7)
                if len(fields) < 8:
                    continue
                bound = os.fsdecode(fields[7].rstrip(b"\n"))
                if bound == wanted and int(fields[3], 16) & _ACCEPTCON:
                    return True
    except OSError:
        pass
    return _connect_probe(path)


def _connect_probe(path: str) -> bool:
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def clear_stale_socket(path: str, what: str = "socket") -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse anything else there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    if is_listening(path):
        raise SocketPathError(f"another server is already listening on {path}")
    if still_names(path, identity(st)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def place_socket(
    path: str,
    bind: Callable[[str], object],
    mode: int = 0o600,
    gid: int | None = None,
    what: str = "socket",
) -> tuple[int, int]:
    """Bind (and listen) with ``bind(private_path)``, then give the socket its public name.

    Returns the socket file's identity (device, inode) for :func:`unlink_if_ours`. Raises
    :class:`SocketPathError` (and leaves nothing behind) if the path cannot be used; an
    ``OSError`` from ``bind`` propagates after cleanup.
    """
    check_socket_path(path)
    clear_stale_socket(path, what)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        private = tempfile.mkdtemp(prefix=".ivshmemd-", dir=parent)
    except OSError as exc:
        raise SocketPathError(f"cannot create {what} in {parent}: {exc.strerror}") from None
    dir_fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    name = "s"
    try:
        with _umask(0o777 & ~mode):
            bind(f"/proc/self/fd/{dir_fd}/{name}")
        if gid is not None:
            os.chown(name, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
        ident = identity(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
        try:
            os.link(name, path, src_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise SocketPathError(
                f"{path} appeared while the {what} was being created; refusing to replace it"
            ) from None
        except OSError as exc:
            raise SocketPathError(f"cannot create {what} {path}: {exc.strerror}") from None
        return ident
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        os.close(dir_fd)
        os.rmdir(private)


def unlink_if_ours(path: str, ident: tuple[int, int] | None) -> bool:
    """Remove ``path`` if it still names the socket we created; True if removed."""
    if ident is None or not still_names(path, ident):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
