"""The accounting of fds in flight (ivshmemd.inflight), on real sockets."""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

from ivshmemd.inflight import (
    MAX_WINDOW,
    Ledger,
    budget_for,
    exempt_from_fd_limit,
    message_truesize,
    unread_messages,
)


def send_fd(sock: socket.socket, fd: int | None) -> None:
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([b"\0" * 8], anc)


def test_unread_messages_follow_what_the_reader_reads() -> None:
    truesize = message_truesize()
    a, b = socket.socketpair()
    efd = os.eventfd(0)
    ledger = Ledger()
    try:
        for carries in (True, False, True, True):
            send_fd(a, efd if carries else None)
            ledger.record(carries)
        assert unread_messages(a, truesize) == 4 and ledger.fds == 3
        for _ in range(2):  # the reader takes two messages (and closes their fds)
            _data, anc, _flags, _addr = b.recvmsg(8, socket.CMSG_SPACE(4))
            for _level, _kind, data in anc:
                os.close(int.from_bytes(data[:4], "little"))
        assert unread_messages(a, truesize) == 2
        assert ledger.settle(unread_messages(a, truesize)) == 1  # the first had an fd
        assert ledger.fds == 2
    finally:
        a.close()
        b.close()  # closes the fds still in flight to it
        os.close(efd)


def test_the_budget_leaves_a_margin_and_sizes_windows() -> None:
    assert budget_for(1 << 20, 4, exempt=True) is None
    small = budget_for(1024, 16, exempt=False)
    assert small is not None
    assert small.limit == 1024 - 128 and small.window == 56
    assert small.sndbuf() * 2 >= small.window * small.truesize
    assert budget_for(1 << 20, 1, exempt=False).window == MAX_WINDOW  # type: ignore[union-attr]
    tiny = budget_for(64, 64, exempt=False)
    assert tiny is not None and tiny.window == 67  # a whole join notice always fits


def test_capabilities_are_read_from_proc(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert exempt_from_fd_limit(str(status)) is False
    status.write_text("CapEff:\t0000000001000000\n")  # CAP_SYS_RESOURCE
    assert exempt_from_fd_limit(str(status)) is True
    status.write_text("CapEff:\t0000000000200000\n")  # CAP_SYS_ADMIN
    assert exempt_from_fd_limit(str(status)) is True
    assert exempt_from_fd_limit(str(tmp_path / "missing")) is False
