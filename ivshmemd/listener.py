"""The daemon's listening unix socket: placement, permissions, adoption.

The socket file is created through :func:`ivshmemd.sockpath.place_socket`: bound in a private
directory with exactly the requested mode and group, then linked to its path, so that
nothing is ever chmod'ed or chowned through a path another user could swap. A socket file
nobody listens on (left by a crash) is replaced; a live one, where another server listens,
makes start-up fail with a clear message, as does a path that is not a socket at all (we
never delete a user's regular file). The socket's identity (device and inode) is recorded
so that shutdown unlinks the path only while it is still ours.
"""

from __future__ import annotations

import grp
import socket
from dataclasses import dataclass

from .sockpath import SocketPathError, place_socket, unlink_if_ours

__all__ = ["DEFAULT_BACKLOG", "Listener", "ListenerError", "bind_listener", "parse_group"]

DEFAULT_BACKLOG = 1024


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
        if self.path is None:
            return False
        return unlink_if_ours(self.path, self.identity)

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


def bind_listener(
    path: str,
    mode: int = 0o600,
    group: int | None = None,
    backlog: int = DEFAULT_BACKLOG,
) -> Listener:
    """Bind and listen on ``path`` with the given file mode and group."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    def bind_and_listen(private_path: str) -> None:
        # listening before the public name exists: no client ever finds it refusing
        sock.bind(private_path)
        sock.listen(backlog)

    try:
        ident = place_socket(path, bind_and_listen, mode, group)
        sock.setblocking(False)
    except SocketPathError as exc:
        sock.close()
        raise ListenerError(str(exc)) from None
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return Listener(sock, path, ident)
