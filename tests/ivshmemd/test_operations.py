"""Operating a daemon: signals, tcp control with CURVE, start-up errors in one line
(issue 8, points 9, 11 and 15)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from ivshmemd.curve import keygen
from ivshmemd.shm import unlink_posix_shm
from ivshmemd.supervise import Child, open_supervisor, unique_name
from tests.daemoncli import one_clear_line, run_daemon_cli, shm_exists
from tests.rawclient import RawClient

TIMEOUT = 30.0
CTL = [sys.executable, "-m", "ivshmemd.ctl"]


async def ctl(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CTL, "--timeout", "5", *argv], capture_stdout=True, capture_stderr=True, check=False
    )


def run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return run_daemon_cli("-F", *args)


async def watch_sees_one_event(daemon: Any, argv: list[str]) -> None:
    """``ivshmemctl ARGV watch --count 1`` says it is watching; a peer joins; it exits 0."""
    async with open_supervisor() as supervisor:
        watch = await supervisor.start(Child([*CTL, *argv, "--count", "1"]), events=True)
        await watch.wait_log("watching events", timeout=TIMEOUT)
        client = await RawClient.connect(daemon.socket_path)
        try:
            await client.read(4)
            assert await watch.wait_exit(TIMEOUT) == 0, watch.describe()
        finally:
            client.close()


# --- signals (point 15) --------------------------------------------------------------------


async def test_sighup_reopens_the_log_file(start_daemon: Any, tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    async with start_daemon(vectors=1, args=["--log-file", str(log)]) as daemon:
        assert "listening on" in log.read_text()  # written before it said READY=1
        log.rename(tmp_path / "d.log.1")  # what logrotate does
        daemon.process.send_signal(signal.SIGHUP)
        with trio.fail_after(TIMEOUT):
            while not log.exists() or "reopened" not in log.read_text():
                await trio.sleep(0.05)
        client = await RawClient.connect(daemon.socket_path)
        try:
            await client.read(4)
        finally:
            client.close()
        with trio.fail_after(TIMEOUT):
            while "peer 0 joined" not in log.read_text():
                await trio.sleep(0.05)
        assert "peer 0 joined" not in (tmp_path / "d.log.1").read_text()


async def test_sigusr1_logs_the_state(start_daemon: Any) -> None:
    async with start_daemon(vectors=2) as daemon:
        client = await RawClient.connect(daemon.socket_path)
        try:
            await client.read(5)
            daemon.process.send_signal(signal.SIGUSR1)
            lines = await daemon.wait_log("state: ", count=5)
            assert "1 peer (ids 0)" in lines[0]
            assert "control plane process: pid" in lines[-1]
            assert daemon.process.returncode is None
        finally:
            client.close()


# --- tcp control only with CURVE (point 9) ------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """CURVE certificates (``keygen``): the daemon's, an allowed client's, and a stranger's."""
    directory = tmp_path / "keys"
    clients = tmp_path / "clients"
    clients.mkdir()
    paths = {}
    for name in ("server", "alice", "mallory"):
        public, secret = keygen(directory, name)
        paths[name], paths[f"{name}_secret"] = str(public), str(secret)
    Path(paths["alice"]).rename(clients / "alice.key")
    paths["alice"] = str(clients / "alice.key")
    paths["clients"] = str(clients)
    return paths


def test_tcp_control_without_keys_is_refused_in_one_line(tmp_path: Path) -> None:
    name = unique_name()
    result = run_daemon("-S", str(tmp_path / "s.sock"), "-M", name, "--control",
                        "tcp://127.0.0.1:5555")  # fmt: skip
    one_clear_line(result, "serves tcp only with CURVE")
    assert not shm_exists(name)


async def test_tcp_control_serves_only_the_authorised_keys(
    start_daemon: Any, keys: dict[str, str]
) -> None:
    curve = ["--curve-secret-key", keys["server_secret"], "--curve-clients", keys["clients"]]
    args = ["--control", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*", *curve]
    async with start_daemon(vectors=1, args=args) as daemon:
        line = (await daemon.wait_log("control plane on tcp://"))[0]
        control, events = re.findall(r"tcp://127\.0\.0\.1:\d+", line)
        alice = ["--curve-key", keys["alice_secret"], "--curve-server-key", keys["server"]]
        status = await ctl("--control", control, *alice, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["peers"] == 0
        mallory = ["--curve-key", keys["mallory_secret"], "--curve-server-key", keys["server"]]
        refused = await ctl("--control", control, *mallory, "peers")
        assert refused.returncode == 1
        assert b"refused the connection" in refused.stderr
        bare = await ctl("--control", control, "peers")
        assert bare.returncode == 3
        assert b"only with CURVE" in bare.stderr and b"Traceback" not in bare.stderr
        # the event stream too
        await watch_sees_one_event(daemon, ["--control", control, *alice, "watch", "--events",
                                            events])  # fmt: skip


# --- start-up errors in one line (point 11) -----------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("tcp://256.1.1.1:1", "cannot bind tcp://256.1.1.1:1"),
        ("ipc:///tmp/" + "x" * 120 + ".ctl", "longer than 107 bytes"),
    ],
)
def test_control_set_up_errors_are_one_line(
    tmp_path: Path, keys: dict[str, str], endpoint: str, message: str
) -> None:
    name = unique_name()
    try:
        result = run_daemon(
            "-S", str(tmp_path / "s.sock"), "-M", name, "--control", endpoint,
            "--events", "ipc://" + str(tmp_path / "e"), "--curve-secret-key",
            keys["server_secret"], "--curve-clients", keys["clients"],
        )  # fmt: skip
        one_clear_line(result, message)
    finally:
        unlink_posix_shm(name)
    assert not (tmp_path / "s.sock").exists()


async def test_events_alone_moves_only_the_event_stream(start_daemon: Any, tmp_path: Path) -> None:
    events = f"ipc://{tmp_path}/elsewhere.events"
    async with start_daemon(vectors=1, args=["--events", events]) as daemon:
        line = (await daemon.wait_log("control plane on"))[0]
        assert f"ipc://{daemon.socket_path}.ctl" in line and events in line
        assert (await ctl("-S", daemon.socket_path, "status")).returncode == 0
        await watch_sees_one_event(daemon, ["-S", daemon.socket_path, "watch", "--events", events])
