"""The ivshmem-server wire format: one little-endian int64 per message, at most one fd.

Every message on the unix stream socket is exactly 8 bytes, sent in one ``sendmsg`` call,
carrying zero or exactly one file descriptor in one ``SCM_RIGHTS`` control message. QEMU keeps
only the first fd of a message and its C client has room for one, so several fds are never
batched into one message. This module only encodes and decodes; it performs no I/O except the
two thin helpers at the end, which wrap a single ``sendmsg``/``recvmsg`` call.
"""

from __future__ import annotations

import array
import functools
import socket
import struct

__all__ = [
    "FDS_CMSG_SPACE",
    "MESSAGE",
    "MESSAGE_SIZE",
    "WireError",
    "decode",
    "encode",
    "recv_message",
    "send_message",
]

MESSAGE = struct.Struct("<q")
MESSAGE_SIZE = MESSAGE.size
#: Room for one fd plus slack, so a misbehaving sender's extra fds are received and closed
#: (and reported) instead of silently truncated by the kernel.
FDS_CMSG_SPACE = socket.CMSG_SPACE(16 * array.array("i").itemsize)


class WireError(Exception):
    """A message violates the wire format (wrong length, several fds, a truncated message)."""


@functools.lru_cache(maxsize=1 << 17)
def encode(value: int) -> bytes:
    """Encode one message value (a peer id, -1 for the shm message, or 0 for the version).

    Cached: the same few thousand ids are encoded over and over during joins."""
    return MESSAGE.pack(value)


def decode(data: bytes) -> int:
    """Decode one 8-byte message; anything else is a :class:`WireError`."""
    if len(data) != MESSAGE_SIZE:
        raise WireError(f"truncated message: got {len(data)} bytes, expected {MESSAGE_SIZE}")
    value: int = MESSAGE.unpack(data)[0]
    return value


def send_message(sock: socket.socket, value: int, fd: int | None) -> None:
    """Send one message (value, optional fd) in exactly one ``sendmsg`` call.

    Raises ``BlockingIOError`` on a full non-blocking socket (nothing was sent then: a unix
    stream socket either takes the whole 8-byte message or none of it).
    """
    if fd is None:
        sent = sock.sendmsg([MESSAGE.pack(value)])
    else:
        sent = sock.sendmsg(
            [MESSAGE.pack(value)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", (fd,)))],
        )
    if sent != MESSAGE_SIZE:  # pragma: no cover - unix stream sockets never split 8 bytes
        raise WireError(f"short send: {sent} of {MESSAGE_SIZE} bytes")


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def recv_message(sock: socket.socket, size: int = MESSAGE_SIZE) -> tuple[bytes, list[int], int]:
    """Receive at most one message (at most ``size`` bytes: a reader reassembling a message
    that arrived in pieces asks for the rest only): ``(data, fds, msg_flags)``.

    ``data`` may be shorter than 8 bytes at EOF or when a peer sends garbage; ``fds`` lists
    every fd that arrived with it (the caller owns and must close them). ``msg_flags`` carries
    ``MSG_CTRUNC`` if the kernel had to drop fds.
    """
    data, ancdata, flags, _addr = sock.recvmsg(size, FDS_CMSG_SPACE)
    return data, _fds_from_ancdata(ancdata), flags
