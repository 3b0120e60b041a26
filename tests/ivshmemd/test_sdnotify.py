"""sd_notify client tests against a real AF_UNIX datagram socket playing systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivshmemd.sdnotify import NOTIFY_SOCKET_ENV, SystemdNotifier, notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield sock, path
    finally:
        sock.close()


def fields(datagram: bytes) -> list[str]:
    assert datagram.endswith(b"\n")
    return datagram.decode().splitlines()


def test_ready_status_stopping_over_path_socket(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv(NOTIFY_SOCKET_ENV, path)
    with SystemdNotifier() as notifier:
        assert notifier.enabled
        assert notifier.ready("serving, 0 peers")
        assert fields(sock.recv(4096)) == ["READY=1", "STATUS=serving, 0 peers"]
        assert notifier.status("3 peers\nconnected")
        assert fields(sock.recv(4096)) == ["STATUS=3 peers connected"]
        assert notifier.mainpid(os.getpid())
        assert fields(sock.recv(4096)) == [f"MAINPID={os.getpid()}"]
        assert notifier.stopping()
        assert fields(sock.recv(4096)) == ["STOPPING=1"]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ivshmem-test-notify-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        monkeypatch.setenv(NOTIFY_SOCKET_ENV, "@" + name)
        assert notify({"READY": 1})
        assert fields(sock.recv(4096)) == ["READY=1"]


def test_credentials_of_the_sender_are_ours(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd attributes a notification by the sender's pid (SCM_CREDENTIALS): a child
    process notifying is seen with its own pid, which is why MAINPID= exists."""
    sock, path = listener
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    monkeypatch.setenv(NOTIFY_SOCKET_ENV, path)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from ivshmemd.sdnotify import notify; "
            "assert notify({'READY': 1}); print(os.getpid())",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert fields(data) == ["READY=1"]
    level, kind, creds = ancdata[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    assert int.from_bytes(creds[:4], sys.byteorder) == int(child.stdout)


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NOTIFY_SOCKET_ENV, raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notify({"STOPPING": 1}) is False


def test_undeliverable_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled
    assert notifier.ready() is False
    assert SystemdNotifier("vsock:2:1234").enabled is False


def test_bad_field_names_are_refused(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    with SystemdNotifier(path) as notifier, pytest.raises(ValueError):
        notifier.send({"READY=1\nSTATUS": "x"})
