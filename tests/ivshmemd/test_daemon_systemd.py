"""The real ivshmemd under systemd's protocols: notify, socket activation, the control plane.

Each test runs the daemon as a process and talks to it as systemd, a peer and ivshmemctl
would. They are skipped until the daemon's command line wires in the module they need
(ivshmemd.sdnotify, ivshmemd.activation, ivshmemd.control), so that this file can land
before the wiring does.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

import ivshmemd.cli
from peers.testing import daemon_command, daemon_process, unique_name
from tests.rawclient import RawClient

TIMEOUT = 30.0
_CLI_SOURCE = inspect.getsource(ivshmemd.cli)
CTL = [sys.executable, "-m", "ivshmemd.ctl"]


def _wired(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        f".{module} import" not in _CLI_SOURCE and f"ivshmemd.{module}" not in _CLI_SOURCE,
        reason=f"ivshmemd.cli does not use ivshmemd.{module} yet",
    )


async def _datagrams(sock: trio.socket.SocketType, pattern: str) -> list[str]:
    """Receive notify datagrams until an assignment matches the regular expression."""
    rx = re.compile(pattern)
    lines: list[str] = []
    with trio.fail_after(TIMEOUT):
        while not any(rx.fullmatch(line) for line in lines):
            data = await sock.recv(4096)
            lines.extend(data.decode().splitlines())
    return lines


@_wired("sdnotify")
async def test_daemon_notifies_ready_status_and_stopping(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify")
    sock_path = str(tmp_path / "d.sock")
    shm_name = unique_name()
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as notify:
        await notify.bind(notify_path)
        process = await trio.lowlevel.open_process(
            daemon_command(sock_path, shm_name, 1, "64K", []),
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await _datagrams(notify, "READY=1")
            # READY=1 means listening: a peer is served at once
            client = await RawClient.connect(sock_path)
            assert await client.read(3) == [(0, False), (0, False), (-1, True)]
            # STATUS= lines give the peer count
            await _datagrams(notify, r"STATUS=.*\b1 peers?\b.*")
            client.close()
            process.send_signal(signal.SIGTERM)
            await _datagrams(notify, "STOPPING=1")
            with trio.fail_after(TIMEOUT):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert not Path(f"/dev/shm/{shm_name}").exists()


@_wired("activation")
async def test_socket_activated_daemon_serves_the_passed_socket(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    sock_path = str(tmp_path / f"act-{uuid.uuid4().hex[:6]}.sock")
    shm_name = unique_name()
    process = await trio.lowlevel.open_process(
        [
            activate,
            "-l",
            sock_path,
            "--fdname=ivshmem",
            *daemon_command(sock_path, shm_name, 2, "64K", []),
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        buffered = b""
        with trio.fail_after(TIMEOUT):
            while b"Listening on" not in buffered:
                chunk = await process.stderr.receive_some()
                assert chunk, "systemd-socket-activate exited before listening"
                buffered += chunk
        # the daemon starts on this first connection and completes the handshake on it
        client = await RawClient.connect(sock_path)
        assert await client.read(3 + 2) == [(0, False), (0, False), (-1, True)] + [(0, True)] * 2
        second = await RawClient.connect(sock_path)
        assert (await second.read(3))[:2] == [(0, False), (1, False)]
        client.close()
        second.close()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
    # the socket belongs to whoever passed it (systemd): the daemon leaves it alone
    assert Path(sock_path).exists()
    assert not Path(f"/dev/shm/{shm_name}").exists()


async def _ctl(*argv: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [*CTL, *argv], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@_wired("control")
async def test_ivshmemctl_against_the_daemon(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, vectors=2) as daemon:
        sock = daemon.socket_path
        for suffix in (".ctl", ".events"):
            assert os.stat(sock + suffix).st_mode & 0o777 == 0o600
        code, out, err = await _ctl("-S", sock, "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["peers"] == 0 and status["vectors"] == 2
        watch = await trio.lowlevel.open_process(
            [*CTL, "-S", sock, "watch", "--json", "--count", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert watch.stderr is not None and watch.stdout is not None
            with trio.fail_after(TIMEOUT):
                assert (await watch.stderr.receive_some()).startswith(b"watching events on")
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
            events: list[dict[str, object]] = []
            buffered = b""
            with trio.fail_after(TIMEOUT):
                while buffered.count(b"\n") < 4:
                    chunk = await watch.stdout.receive_some()
                    assert chunk, "watch exited early"
                    buffered += chunk
            events = [json.loads(line) for line in buffered.splitlines()]
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
        finally:
            if watch.returncode is None:
                watch.kill()
            await watch.wait()
