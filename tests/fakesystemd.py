"""Playing systemd's part for the crash-survival tests (a plain module, not a test).

:class:`FakeSystemd` owns a ``NOTIFY_SOCKET`` datagram socket and does what systemd does
with what arrives there (sd_notify(3), the fd store): it records ``READY=1`` and the other
fields, keeps the fds of ``FDSTORE=1`` messages under their ``FDNAME=`` (a duplicate, as
systemd does: they stay open whatever the daemon does), closes every fd of a name on
``FDSTOREREMOVE=1``, and starts a daemon with its store passed back the way systemd does:
fds 3, 4, ... with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` (the daemon's own pid:
this module, run as a script, is the small exec wrapper that moves the fds into place, sets
``LISTEN_PID`` to its pid and ``execve``s the daemon, which keeps that pid).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

MAX_FDS_PER_MESSAGE = 253


class FakeSystemd:
    """A notify socket and an fd store (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.store: list[tuple[str, int]] = []
        self.messages: list[dict[str, str]] = []
        self.lot = trio.lowlevel.ParkingLot()

    def environment(self, limit: int = 4096) -> dict[str, str]:
        """What systemd (254+) puts in a service's environment for this."""
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(limit)}

    async def run(self) -> None:
        """Receive messages forever (a task)."""
        space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            while True:
                try:
                    data, ancillary, _flags, _addr = self.sock.recvmsg(4096, space)
                except BlockingIOError:
                    break
                fds = array.array("i")
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._handle(data, list(fds))
            self.lot.unpark_all()

    def _handle(self, data: bytes, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            self.store.extend((name, fd) for fd in fds)
            return
        for fd in fds:  # fds without FDSTORE=1: systemd closes them
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            for _stored, fd in [item for item in self.store if item[0] == name]:
                os.close(fd)
            self.store = [item for item in self.store if item[0] != name]

    def count(self, **fields: str) -> int:
        """How many messages had all these fields."""
        return sum(all(m.get(k) == v for k, v in fields.items()) for m in self.messages)

    async def wait(self, count: int = 1, timeout: float = 30.0, **fields: str) -> None:
        """Wait until ``count`` messages had these fields (e.g. ``READY="1"``)."""
        with trio.fail_after(timeout):
            while self.count(**fields) < count:
                await self.lot.park()

    def names(self) -> list[str]:
        """The names in the store, in the order stored."""
        return [name for name, _fd in self.store]

    def command(self, argv: Sequence[str]) -> tuple[list[str], list[int]]:
        """The argv that starts ``argv`` with the store passed back, and the fds to pass
        (``pass_fds``) for it."""
        fds = [fd for _name, fd in self.store]
        names = ":".join(name for name, _fd in self.store)
        wrapper = [sys.executable, __file__, names, *map(str, fds), "--", *argv]
        return wrapper, fds

    def close(self) -> None:
        for _name, fd in self.store:
            os.close(fd)
        self.store = []
        self.sock.close()


def _exec_with_listen_fds(args: list[str]) -> None:
    """``fakesystemd.py NAMES FD... -- ARGV``: move the fds to 3, 4, ..., set the LISTEN_*
    variables for this pid, exec ARGV (the pid stays)."""
    split = args.index("--")
    names, fds, argv = args[0], [int(fd) for fd in args[1:split]], args[split + 1 :]
    floor = max([3 + len(fds), *fds]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]  # clear of the targets
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    _exec_with_listen_fds(sys.argv[1:])
