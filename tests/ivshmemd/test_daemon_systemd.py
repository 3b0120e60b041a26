"""The real ivshmemd under systemd's protocols: notify, socket activation, the control plane.

Each test runs the daemon as a process and talks to it as systemd, a peer and ivshmemctl
would. They are skipped until the daemon's command line wires in the module they need
(ivshmemd.sdnotify, ivshmemd.activation, ivshmemd.control.server), so that this file can land
before the wiring does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import trio

from ivshmemd.supervise import Child, daemon_command, daemon_process, open_supervisor, unique_name
from peers.pytest_plugin import DaemonFactory
from tests.rawclient import RawClient

TIMEOUT = 30.0
CTL = [sys.executable, "-m", "ivshmemd.ctl"]


async def test_daemon_notifies_ready_status_and_stopping(start_daemon: DaemonFactory) -> None:
    # the daemon fixture is the notify socket's owner, as systemd would be; it waits for
    # READY=1 before the block starts
    async with start_daemon(vectors=1, size="64K") as daemon:
        assert daemon.notified["READY"] == "1"
        # READY=1 means listening: a peer is served at once
        client = await RawClient.connect(daemon.socket_path)
        assert await client.read(3) == [(0, False), (0, False), (-1, True)]
        # STATUS= lines give the peer count
        one_peer = re.compile(r".*\b1 peers?\b.*")
        await daemon.wait_for(
            lambda: one_peer.fullmatch(daemon.notified.get("STATUS", "")), "1 peer", TIMEOUT
        )
        client.close()
        daemon.terminate()
        assert await daemon.wait_exit(TIMEOUT) == 0
        assert daemon.notified.get("STOPPING") == "1"
    assert not Path(f"/dev/shm/{daemon.shm_name}").exists()


async def test_socket_activated_daemon_serves_the_passed_socket(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    sock_path = str(tmp_path / f"act-{uuid.uuid4().hex[:6]}.sock")
    shm_name = unique_name()
    argv = [activate, "-l", sock_path, "--fdname=ivshmem",
            *daemon_command(sock_path, shm_name, 2, "64K")]  # fmt: skip
    async with open_supervisor() as supervisor:
        activator = await supervisor.start(Child(argv))
        await activator.wait_log("Listening on", timeout=TIMEOUT)
        # the daemon starts on this first connection and completes the handshake on it
        client = await RawClient.connect(sock_path)
        assert await client.read(3 + 2) == [(0, False), (0, False), (-1, True)] + [(0, True)] * 2
        second = await RawClient.connect(sock_path)
        assert (await second.read(3))[:2] == [(0, False), (1, False)]
        client.close()
        second.close()
        activator.terminate()
        assert await activator.wait_exit(TIMEOUT) == 0
    # the socket belongs to whoever passed it (systemd): the daemon leaves it alone
    assert Path(sock_path).exists()
    assert not Path(f"/dev/shm/{shm_name}").exists()


async def _ctl(*argv: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [*CTL, *argv], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_ivshmemctl_against_the_daemon(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, vectors=2) as daemon:
        sock = daemon.socket_path
        for suffix in (".ctl", ".events"):
            assert os.stat(sock + suffix).st_mode & 0o777 == 0o600
        code, out, err = await _ctl("-S", sock, "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["peers"] == 0 and status["vectors"] == 2
        async with open_supervisor() as supervisor:
            watch = Child([*CTL, "-S", sock, "watch", "--json", "--count", "4"])
            await supervisor.start(watch, events=True)
            await watch.wait_log("^watching events on", timeout=TIMEOUT)
            first = await RawClient.connect(sock)
            await first.read(3 + 2)
            second = await RawClient.connect(sock)
            await second.read(3 + 2 + 2)
            assert await first.read(2) == [(1, True)] * 2  # the join notice
            code, out, _ = await _ctl("-S", sock, "peers", "--json")
            peers = json.loads(out)
            assert [p["id"] for p in peers] == [0, 1]
            assert all(p["pid"] == os.getpid() and p["uid"] == os.getuid() for p in peers)
            code, out, err = await _ctl("-S", sock, "kick", "1")
            assert (code, out) == (0, "peer 1 kicked\n"), err
            assert await first.read(1) == [(1, False)]  # the others are told
            first.close()
            events = await watch.wait_events(4, timeout=TIMEOUT)
            assert [e["seq"] for e in events] == [1, 2, 3, 4]
            assert [(e["event"], e["peer_id"]) for e in events] == [
                ("peer-joined", 0),
                ("peer-joined", 1),
                ("peer-left", 1),
                ("peer-left", 0),
            ]
            second.close()
            code, out, _ = await _ctl("-S", sock, "stats", "--json")
            stats = json.loads(out)
            assert stats["joins"] == 2 and stats["leaves"] == 2
