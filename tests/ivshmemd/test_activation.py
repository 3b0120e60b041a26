"""Socket activation, tested for real: ``systemd-socket-activate`` listens, passes the fd to a
small Python program that adopts it with :mod:`ivshmemd.activation` and serves a client."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import sys
from pathlib import Path

import pytest

from ivshmemd.activation import ActivationError, PassedFd, listen_fds, parse_listen_env
from ivshmemd.supervise import SyncChild, SyncSupervisor

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate not installed")

TIMEOUT = 30.0

# The activated program: adopt the socket, accept one client, greet it the way ivshmemd
# greets a peer (protocol version 0, then its id), and report what it saw on stdout.
CHILD = r"""
import fcntl, json, os, struct, sys
from ivshmemd.activation import ActivationError, adopt_unix_listener
try:
    sock = adopt_unix_listener()
except ActivationError as exc:
    print(f"ivshmemd: {exc}", file=sys.stderr)
    sys.exit(2)
report = {
    "adopted": sock is not None,
    "path": sock.getsockname() if sock else None,
    "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "blocking": sock.getblocking(),
}
sock.setblocking(True)
conn, _ = sock.accept()
conn.sendall(struct.pack("<q", 0) + struct.pack("<q", 7))
conn.close()
print(json.dumps(report))
"""


def start(supervisor: SyncSupervisor, *args: str) -> SyncChild:
    """Start systemd-socket-activate and wait (for its log lines) until it listens."""
    assert ACTIVATE is not None
    child = SyncChild([ACTIVATE, *args, sys.executable, "-c", CHILD])
    supervisor.start(child, events=True)
    child.wait_log("^Listening on", count=sum(1 for a in args if a.startswith("-l")))
    return child


def errors(child: SyncChild) -> str:
    return "\n".join(child.log)


def greet(path: Path) -> tuple[int, int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT)
        client.connect(str(path))
        data = b""
        while len(data) < 16:
            chunk = client.recv(16 - len(data))
            assert chunk, "activated program closed the connection early"
            data += chunk
    version, peer_id = struct.unpack("<qq", data)
    return version, peer_id


def test_adopts_the_passed_listener(tmp_path: Path, supervisor: SyncSupervisor) -> None:
    path = tmp_path / "ivshmem.sock"
    child = start(supervisor, "-l", str(path), "--fdname=ivshmem")
    assert greet(path) == (0, 7)
    assert child.wait_exit(TIMEOUT) == 0, errors(child)
    (report,) = child.events
    assert report == {
        "adopted": True,
        "path": str(path),
        "cloexec": True,
        "env_left": [],
        "blocking": False,
    }


def test_picks_the_named_socket_among_several(tmp_path: Path, supervisor: SyncSupervisor) -> None:
    other, ours = tmp_path / "other.sock", tmp_path / "ours.sock"
    child = start(supervisor, "-l", str(other), "-l", str(ours), "--fdname=metrics:ivshmem")
    assert greet(ours) == (0, 7)
    assert child.wait_exit(TIMEOUT) == 0, errors(child)
    assert child.events[0]["path"] == str(ours)


def test_unnamed_sockets_are_ambiguous(tmp_path: Path, supervisor: SyncSupervisor) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    child = start(supervisor, "-l", str(a), "-l", str(b))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(a))
        assert child.wait_exit(TIMEOUT) == 2
    assert "expected exactly one named 'ivshmem'" in errors(child)
    assert "Traceback" not in errors(child)


def test_datagram_socket_is_refused_clearly(tmp_path: Path, supervisor: SyncSupervisor) -> None:
    path = tmp_path / "dgram.sock"
    child = start(supervisor, "--datagram", "-l", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.sendto(b"wake up", str(path))
    assert child.wait_exit(TIMEOUT) == 2
    assert "is AF_UNIX SOCK_DGRAM" in errors(child)
    assert "needs an AF_UNIX SOCK_STREAM listening socket" in errors(child)
    assert "Traceback" not in errors(child)


def test_inet_socket_is_refused_clearly(supervisor: SyncSupervisor) -> None:
    # systemd-socket-activate refuses port 0: borrow a free port from the kernel.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = start(supervisor, "-l", f"127.0.0.1:{port}")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
        assert child.wait_exit(TIMEOUT) == 2
    assert "is AF_INET SOCK_STREAM" in errors(child)
    assert "Traceback" not in errors(child)


def test_parse_listen_env() -> None:
    me = os.getpid()
    assert parse_listen_env({}, me) == []
    assert parse_listen_env({"LISTEN_FDS": "2", "LISTEN_PID": str(me + 1)}, me) == []
    assert parse_listen_env(
        {"LISTEN_FDS": "2", "LISTEN_PID": str(me), "LISTEN_FDNAMES": "a:b"}, me
    ) == [PassedFd(3, "a"), PassedFd(4, "b")]
    # names that do not match the count are ignored, as sd_listen_fds_with_names does
    assert parse_listen_env({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, me) == [
        PassedFd(3, "unknown")
    ]
    for bad in ({"LISTEN_FDS": "x"}, {"LISTEN_FDS": "-1"}, {"LISTEN_FDS": "1", "LISTEN_PID": "p"}):
        with pytest.raises(ActivationError):
            parse_listen_env(bad, me)


def test_listen_fds_unsets_environment_even_when_not_for_us() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "PATH": "/bin"}
    assert listen_fds(environ=env) == []
    assert env == {"PATH": "/bin"}
    kept = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    assert listen_fds(environ=kept, unset_environment=False) == []
    assert kept == {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
