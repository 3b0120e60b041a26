"""Helpers for the upgrade and crash-survival tests (a plain module, not a test): asking the
control plane for the peer table, ringing a client's vector through another's fd, waiting
for an upgrade to finish by the daemon's own log line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from ivshmemd.supervise import DaemonProcess
from tests.rawclient import RawClient

UPGRADED = "upgraded in place"


def peer_table(socket_path: str) -> list[dict[str, Any]]:
    """``ivshmemctl peers --json`` for the daemon on ``socket_path``."""
    result = ctl(socket_path, "--json", "peers")
    assert result.returncode == 0, result.stderr
    table: list[dict[str, Any]] = json.loads(result.stdout)
    return table


async def upgrade(daemon: DaemonProcess, count: int) -> str:
    """SIGUSR2, then wait for the ``count``-th "upgraded in place" line (the new image
    serves); the pid must not have changed (the supervisor would see its child exit)."""
    pid = daemon.pid
    daemon.process.send_signal(signal.SIGUSR2)
    lines = await daemon.wait_log(UPGRADED, count=count)
    assert daemon.process.returncode is None and daemon.pid == pid
    return lines[-1]


def ring_reaches(sender: RawClient, receiver: RawClient, receiver_id: int, vector: int) -> None:
    """Ring ``receiver``'s ``vector`` through the fd ``sender`` was given for it, and read
    it back from the receiver's own eventfd."""
    os.eventfd_write(sender.vector_fds(receiver_id)[vector], 1)
    own = receiver.vector_fds(receiver_id)[vector]
    assert os.eventfd_read(own) == 1


async def no_eof(client: RawClient) -> None:
    """Read forever; an EOF fails the test (run it as a task)."""
    await client.drain()


async def read_greeting(client: RawClient, vectors: int) -> int:
    """Read a newcomer's whole greeting, however many peers it lists (they may come and go
    meanwhile: the greeting is queued at once, and it ends with the newcomer's own vectors);
    returns its id."""
    await client.read(3)
    own = client.stream[1][0]
    while client.stream.count((own, True)) < vectors:
        await client.read(1)
    return own


def ctl(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ivshmemctl -S SOCKET ARGS...`` run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "ivshmemd.ctl", "-S", socket_path, "--timeout", "20", *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
