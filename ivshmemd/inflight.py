"""File descriptors in flight: what clients have not read yet, and the kernel's budget for it.

An fd sent over a unix socket stays "in flight" until the receiver reads the message that
carries it, even after the sender has closed its end. Linux charges every fd in flight to
the *sending user* and refuses further fd passing (``ETOOMANYREFS``) once that user has more
in flight than its ``RLIMIT_NOFILE``, unless the sender has ``CAP_SYS_RESOURCE`` or
``CAP_SYS_ADMIN``. A client that never reads (and never closes) therefore pins what it was
sent; enough of them and a non-root daemon can no longer hand an fd to anyone.

What this module provides, for a daemon without those capabilities:

* :func:`unread_messages`: how many of the messages sent on a connection the client has not
  read yet, from ``SIOCOUTQ`` (the bytes of socket buffers still queued at the receiver,
  which for a unix stream socket is a whole number of buffers, one per ``sendmsg``) divided
  by the size of one (:func:`message_truesize`, measured once at start-up).
* :class:`Ledger`: per connection, which of the still-unread messages carry an fd.
* :class:`FlightBudget`: the daemon-wide budget (``RLIMIT_NOFILE`` minus a margin for the
  user's other processes), the per-client *window* (how many messages a client may have
  unread: its socket buffer is sized to that, so the kernel itself stops a client that does
  not read from pinning more, and wakes the sender as it reads), and the total in flight.

A root daemon (or one with either capability) has no such limit: :func:`budget_for` returns
None and none of this costs anything.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "FlightBudget",
    "Ledger",
    "budget_for",
    "exempt_from_fd_limit",
    "message_truesize",
    "unread_bytes",
    "unread_messages",
]

_SIOCOUTQ = termios.TIOCOUTQ  # the same request number on Linux
_CAP_SYS_ADMIN = 21
_CAP_SYS_RESOURCE = 24
#: the largest window: about the default unix socket buffer (212992 bytes) in messages
MAX_WINDOW = 256


def exempt_from_fd_limit(status_path: str = "/proc/self/status") -> bool:
    """True if this process's effective capabilities lift the in-flight limit."""
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps >> _CAP_SYS_ADMIN & 1 or caps >> _CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return False


def message_truesize() -> int:
    """Bytes one 8-byte message with an fd occupies in a unix socket's buffers (measured)."""
    a, b = socket.socketpair()
    try:
        passed = array.array("i", [b.fileno()])
        a.sendmsg([b"\0" * 8], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
        size = _outq(a)
        _data, ancdata, _flags, _addr = b.recvmsg(8, socket.CMSG_SPACE(passed.itemsize))
        for _level, _kind, data in ancdata:  # close the fd that came back
            for fd in array.array("i", data[: len(data) - len(data) % passed.itemsize]):
                os.close(fd)
        return max(size, 1)
    finally:
        a.close()
        b.close()


def _outq(sock: socket.socket) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    return value


def unread_bytes(sock: socket.socket) -> int:
    """Bytes of socket buffers sent on ``sock`` that its reader has not read (SIOCOUTQ);
    0 if that cannot be told (a closed socket)."""
    try:
        return _outq(sock)
    except OSError:
        return 0


def unread_messages(sock: socket.socket, truesize: int) -> int:
    """How many messages sent on ``sock`` its reader has not (fully) read."""
    return -(-_outq(sock) // truesize)


@dataclass
class Ledger:
    """Per connection: a flag per sent message that may still be unread (1 if it carries
    an fd), oldest first, and how many fds those are."""

    sent: deque[int] = field(default_factory=deque)
    fds: int = 0

    def record(self, carries_fd: bool) -> None:
        self.sent.append(1 if carries_fd else 0)
        self.fds += carries_fd

    def settle(self, unread: int) -> int:
        """All but the last ``unread`` messages have been read: forget them. Returns how
        many fds that released."""
        released = 0
        sent = self.sent
        while len(sent) > unread:
            released += sent.popleft()
        self.fds -= released
        return released


@dataclass
class FlightBudget:
    """The daemon-wide in-flight budget (see the module docstring)."""

    limit: int
    window: int
    truesize: int
    total: int = 0

    def room(self) -> int:
        return self.limit - self.total

    def sndbuf(self) -> int:
        """The SO_SNDBUF value that lets the kernel queue about ``window`` messages (the
        kernel doubles what it is given)."""
        return max(1, self.window * self.truesize // 2)


def budget_for(nofile: int, n_vectors: int, *, exempt: bool | None = None) -> FlightBudget | None:
    """The budget of a daemon whose soft ``RLIMIT_NOFILE`` is ``nofile``; None if exempt.

    A margin (an eighth, at least 16) is left for the user's other processes, which are
    charged to the same account. A client's window holds at least one join notice plus the
    greeting (``n_vectors + 3``) and at most :data:`MAX_WINDOW`; within that, a sixteenth of
    the budget, so that many clients that do not read cannot take it all.
    """
    if exempt is None:
        exempt = exempt_from_fd_limit()
    if exempt:
        return None
    limit = nofile - max(16, nofile // 8)
    window = max(n_vectors + 3, min(MAX_WINDOW, limit // 16))
    return FlightBudget(limit=max(limit, window), window=window, truesize=message_truesize())
