"""Access control on the daemon's socket: file mode, group, and SO_PEERCRED allow-lists.

Tests run as root, so refusals are proven two ways: an allow-list that does not name root,
and a client that really runs under another uid (a forked child that drops to ``nobody``).
A refused client gets no fd at all: the daemon closes the connection before sending
anything, and logs why.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

import trio

from tests.rawclient import RawClient

NOBODY = 65534


def connect_as(uid: int, gid: int, path: str) -> tuple[str, int, int]:
    """Fork a child that drops to uid/gid, connects and reports (outcome, messages, fds)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, just report and _exit
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            try:
                sock.connect(path)
            except PermissionError:
                os.write(write_end, b"denied 0 0")
                os._exit(0)
            messages = fds = 0
            while True:
                data, ancdata, _flags, _addr = sock.recvmsg(8, socket.CMSG_SPACE(4))
                if not data:
                    break
                messages += 1
                fds += len(ancdata)
                if messages == 4:  # version, id, shm, own vector: admitted
                    break
            os.write(write_end, f"{'admitted' if messages else 'closed'} {messages} {fds}".encode())
        except BaseException as exc:  # report anything else to the parent
            os.write(write_end, f"error {type(exc).__name__} {exc}".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        answer = report.read().decode()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    outcome, messages, fds = answer.split()
    return outcome, int(messages), int(fds)


async def test_socket_mode_defaults_to_0600(start_daemon: Any) -> None:
    async with start_daemon(vectors=1) as daemon:
        assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600


async def test_socket_mode_and_group(start_daemon: Any) -> None:
    args = ["--socket-mode", "0660", "--socket-group", "nogroup"]
    async with start_daemon(vectors=1, args=args) as daemon:
        st = os.stat(daemon.socket_path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == NOBODY


async def test_another_uid_cannot_open_a_0600_socket(start_daemon: Any, world_dir: str) -> None:
    async with start_daemon(vectors=1, socket_path=f"{world_dir}/sock") as daemon:
        outcome = await trio.to_thread.run_sync(connect_as, NOBODY, NOBODY, daemon.socket_path)
        assert outcome == ("denied", 0, 0)
        assert daemon.count("joined") == 0


async def test_allow_uid_refuses_others_and_admits_the_listed(
    start_daemon: Any, world_dir: str
) -> None:
    args = ["--socket-mode", "0666", "--allow-uid", str(NOBODY)]
    async with start_daemon(vectors=1, args=args, socket_path=f"{world_dir}/sock") as daemon:
        # root is not on the list: refused, no fd at all
        refused = await RawClient.connect(daemon.socket_path)
        try:
            assert await refused.read_eof() == []
            assert refused.fds == []
        finally:
            refused.close()
        line = (await daemon.wait_log("refused"))[0]
        assert "uid 0" in line and "not allowed" in line
        # a real client running as nobody is admitted: version, id, shm fd, own vector
        outcome = await trio.to_thread.run_sync(connect_as, NOBODY, NOBODY, daemon.socket_path)
        assert outcome == ("admitted", 4, 2)


async def test_allow_gid_admits_members(start_daemon: Any, world_dir: str) -> None:
    args = ["--socket-mode", "0666", "--allow-gid", "nogroup"]
    async with start_daemon(vectors=1, args=args, socket_path=f"{world_dir}/sock") as daemon:
        outcome = await trio.to_thread.run_sync(connect_as, NOBODY, NOBODY, daemon.socket_path)
        assert outcome == ("admitted", 4, 2)
        refused = await trio.to_thread.run_sync(connect_as, 1000, 1000, daemon.socket_path)
        assert refused == ("closed", 0, 0)
        assert "uid 1000 gid 1000 is not allowed" in (await daemon.wait_log("refused"))[0]
