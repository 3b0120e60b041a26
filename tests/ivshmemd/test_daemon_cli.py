"""The ivshmemd command line: QEMU's flags and validation, errors, daemon mode, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ivshmemd.shm import attach_posix_shm, unlink_posix_shm
from ivshmemd.supervise import sync_daemon_process, unique_name
from tests.daemoncli import TIMEOUT, run_daemon_cli, shm_exists, wait_pid_exit
from tests.rawclient import RawClient


@pytest.fixture
def shm_name() -> Any:
    name = unique_name()
    yield name
    unlink_posix_shm(name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "65"], "too many requested vectors (max is 64)"),
        (["-n", "abc"], "cannot parse n_vectors"),
        (["-n", "-1"], "cannot parse n_vectors"),
        (["-l", "12Q"], "invalid size"),
        (["-l", "-5"], "invalid size"),
        (["-l", "1.5"], "a fraction needs a suffix"),
        (["-l", "16E"], "too large"),
        (["-l", "8E"], "too large"),
        (["-l", "15E"], "too large"),
        (["-l", "9223372036854775808"], "too large"),
        (["--no-control", "--events", "ipc:///tmp/x"], "contradicts"),
        (["-x"], "unrecognized arguments"),
        (["--max-peers", "0"], "must be positive"),
        (["--peer-ids", "9-3"], "invalid peer id range"),
        (["--peer-ids", "0-70000"], "invalid peer id range"),
        (["--socket-mode", "999"], "invalid socket mode"),
        (["--socket-group", "no-such-group-xyz"], "unknown group"),
        (["-M", "a/b"], "may not contain '/'"),
        (["-M", ""], "empty"),
        (["-M", "x" * 300], "longer than 255"),
        (["-m", "/nonexistent-dir-xyz"], "does not exist"),
        (["-m", "/etc/hostname"], "not a directory"),
        (["-S", "/nonexistent-dir-xyz/sock"], "does not exist"),
        (["-S", "/tmp/" + "s" * 120], "socket path too long"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], message: str, tmp_path: Path) -> None:
    default_socket = ["-S", str(tmp_path / "sock")] if "-S" not in args else []
    default_shm = ["-M", unique_name()] if not {"-M", "-m"} & set(args) else []
    result = run_daemon_cli("-F", *default_socket, *default_shm, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sock").exists()
    for index, arg in enumerate(default_shm):
        if arg == "-M":
            assert not shm_exists(default_shm[index + 1])


def test_help_teaches_every_flag() -> None:
    result = run_daemon_cli("-h")
    assert result.returncode == 0
    for flag in ("--socket", "--shm-name", "--shm-dir", "--size", "--vectors", "--foreground",
                 "--pidfile", "--verbose", "--keep-shm", "--max-peers", "--send-timeout",
                 "-S PATH", "-M NAME", "-m DIR", "-l SIZE", "-n N", "examples:"):  # fmt: skip
        assert flag in result.stdout, flag


def test_live_socket_is_refused_and_stale_socket_replaced(tmp_path: Path, shm_name: str) -> None:
    path = str(tmp_path / "sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    try:
        result = run_daemon_cli("-F", "-S", path, "-M", shm_name)
        assert result.returncode == 1
        assert f"another server is already listening on {path}" in result.stderr
        assert os.path.exists(path)  # the other server's socket is left alone
        assert not shm_exists(shm_name)
    finally:
        live.close()  # now stale: the file stays, nobody listens
    assert os.path.exists(path)
    with sync_daemon_process(tmp_path, socket_path=path, shm_name=shm_name) as daemon:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()
        daemon.terminate()
        assert daemon.wait_exit(TIMEOUT) == 0
        assert not os.path.exists(path)  # removed by the daemon itself


def test_regular_file_at_socket_path_is_not_replaced(tmp_path: Path, shm_name: str) -> None:
    path = tmp_path / "sock"
    path.write_text("precious")
    result = run_daemon_cli("-F", "-S", str(path), "-M", shm_name)
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert path.read_text() == "precious"


def test_daemon_mode_returns_once_listening_and_cleans_up(tmp_path: Path, shm_name: str) -> None:
    path, pidfile = str(tmp_path / "sock"), str(tmp_path / "ivshmemd.pid")
    result: subprocess.CompletedProcess[str] | None = None
    try:
        result = run_daemon_cli("-S", path, "-M", shm_name, "-p", pidfile, "-l", "64K")
    finally:  # whatever happened, never leave a daemon behind
        failed = result is None or result.returncode != 0
        if failed and os.path.exists(pidfile) and (pid := int(Path(pidfile).read_text() or 0)):
            os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    pid = int(Path(pidfile).read_text())
    try:
        assert os.path.exists(path) and shm_exists(shm_name)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)  # listening already: the parent returned only after that
        header = client.recv(8)
        assert header == (0).to_bytes(8, "little")
        client.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_pid_exit(pid)
    assert not os.path.exists(path)
    assert not shm_exists(shm_name)
    assert not os.path.exists(pidfile)


def test_daemon_mode_reports_start_up_failure(tmp_path: Path, shm_name: str) -> None:
    path = str(tmp_path / "sock")
    result = run_daemon_cli("-S", path, "-M", shm_name, "-p", "/nonexistent-dir/x.pid")
    assert result.returncode == 1
    assert "cannot write pid file /nonexistent-dir/x.pid" in result.stderr
    assert not os.path.exists(path)
    assert not shm_exists(shm_name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
async def test_shutdown_frees_peers_and_unlinks(start_daemon: Any, signum: int) -> None:
    async with start_daemon(vectors=1) as daemon:
        first, second = await RawClient.connect(daemon.socket_path), None
        try:
            await first.read(4)
            second = await RawClient.connect(daemon.socket_path)
            await second.read(5)
            await first.read(1)
            daemon.process.send_signal(signum)
            # QEMU's order: free peer 0 (peer 1 is told), then peer 1; then EOF for both
            assert await second.read_eof() == [(0, False)]
            assert await first.read_eof() == []
            assert await daemon.process.wait() == 0
        finally:
            first.close()
            if second is not None:
                second.close()
        for leftover in ("", ".ctl", ".events", ".lock"):
            assert not os.path.exists(daemon.socket_path + leftover), leftover
        assert not shm_exists(daemon.shm_name)


def test_keep_shm_and_contents_survive_a_restart(tmp_path: Path, shm_name: str) -> None:
    path = str(tmp_path / "sock")
    keep = {"socket_path": path, "shm_name": shm_name, "size": "64K"}
    with sync_daemon_process(tmp_path, args=["--keep-shm"], **keep) as daemon:
        daemon.terminate()
        assert daemon.wait_exit(TIMEOUT) == 0
    assert shm_exists(shm_name)
    segment = attach_posix_shm(shm_name)
    try:
        segment.buf[:5] = b"hello"
    finally:
        segment.close()
    with sync_daemon_process(tmp_path, **keep) as daemon:
        segment = attach_posix_shm(shm_name)
        try:
            assert bytes(segment.buf[:5]) == b"hello"
            assert segment.size == 64 * 1024
        finally:
            segment.close()
        daemon.terminate()
        assert daemon.wait_exit(TIMEOUT) == 0
    assert not shm_exists(shm_name)


async def test_shm_dir_file_is_unlinked_at_once(start_daemon: Any, tmp_path: Path) -> None:
    shm_dir = tmp_path / "hugepages"
    shm_dir.mkdir()
    async with start_daemon(vectors=0, args=["-m", str(shm_dir), "-l", "100K"]) as daemon:
        assert list(shm_dir.iterdir()) == []
        client = await RawClient.connect(daemon.socket_path)
        try:
            await client.read(3)
            assert os.fstat(client.shm_fd()).st_size == 128 * 1024
        finally:
            client.close()


async def test_sizes_beyond_32_bits(start_daemon: Any) -> None:
    """64 GiB (sparse: more than this machine has): no 32-bit truncation anywhere."""
    async with start_daemon(vectors=0, size="64G", args=["--sparse"]) as daemon:
        client = await RawClient.connect(daemon.socket_path)
        try:
            await client.read(3)
            assert os.fstat(client.shm_fd()).st_size == 64 << 30
        finally:
            client.close()
