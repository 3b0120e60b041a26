"""Start-up safety: a refused daemon changes nothing, files are never followed or clobbered,
memory is reserved or refused, sizes and log files are checked (issue 8, points 1-4, 16)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ivshmemd.shm import SHM_DIR, attach_posix_shm, unlink_posix_shm
from ivshmemd.supervise import (
    SyncDaemon,
    SyncSupervisor,
    daemon_command,
    sync_daemon_process,
    unique_name,
)
from tests.daemoncli import TIMEOUT, one_clear_line, shm_exists, stop_daemonized
from tests.daemoncli import run_daemon_cli as run_daemon
from tests.rawclient import RawClient


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = unique_name()
    yield name
    unlink_posix_shm(name)


def shm_size(name: str) -> int:
    return os.stat(f"{SHM_DIR}/{name}").st_size


# --- point 1: a refused second daemon changes nothing -----------------------------------------


async def test_second_daemon_on_the_same_socket_touches_nothing(
    start_daemon: Any, shm_name: str
) -> None:
    async with start_daemon(vectors=1, size="4M", shm_name=shm_name) as daemon:
        observer = await RawClient.connect(daemon.socket_path)
        try:
            await observer.read(4)
            segment = attach_posix_shm(shm_name)
            try:
                segment.buf[:6] = b"intact"
            finally:
                segment.close()
            result = await trio.to_thread.run_sync(
                run_daemon, "-F", "-S", daemon.socket_path, "-M", shm_name, "-l", "4K",
                "--no-control",
            )  # fmt: skip
            one_clear_line(result, f"another ivshmemd is already running on "
                                          f"{daemon.socket_path}")  # fmt: skip
            assert shm_size(shm_name) == 4 << 20  # not truncated to 4 KiB
            segment = attach_posix_shm(shm_name)
            try:
                assert bytes(segment.buf[:6]) == b"intact"
            finally:
                segment.close()
            # the live daemon never saw a client: the next thing the observer hears is a
            # real newcomer (id 1), not a phantom joining and leaving
            newcomer = await RawClient.connect(daemon.socket_path)
            try:
                assert (await newcomer.read(3))[1] == (1, False)
                assert await observer.read(1) == [(1, True)]
                # counted while the newcomer is connected (its leave, once it closes, is
                # no phantom)
                await daemon.wait_log("peer 1 joined")
                assert daemon.count("joined") == 2 and daemon.count("left") == 0
            finally:
                newcomer.close()
        finally:
            observer.close()


async def test_second_daemon_on_the_same_shm_is_refused(
    start_daemon: Any, shm_name: str, tmp_path: Path
) -> None:
    async with start_daemon(vectors=1, size="4M", shm_name=shm_name):
        other = str(tmp_path / "other.sock")
        result = await trio.to_thread.run_sync(
            run_daemon, "-F", "-S", other, "-M", shm_name, "-l", "4K", "--no-control"
        )
        one_clear_line(result, f"shm {shm_name!r} is in use by another running ivshmemd")
        assert shm_size(shm_name) == 4 << 20
        assert not os.path.exists(other)


def test_a_stale_lock_file_is_reused_and_a_planted_symlink_refused(
    tmp_path: Path, shm_name: str
) -> None:
    sock = tmp_path / "s.sock"
    Path(f"{sock}.lock").write_text("")  # left by a daemon that crashed: nobody holds it
    with sync_daemon_process(tmp_path, socket_path=str(sock), shm_name=shm_name) as daemon:
        daemon.terminate()
        assert daemon.wait_exit(TIMEOUT) == 0
    victim = tmp_path / "victim"
    victim.write_text("precious")
    other = tmp_path / "t.sock"
    Path(f"{other}.lock").symlink_to(victim)
    result = run_daemon("-F", "-S", str(other), "-M", shm_name)
    one_clear_line(result, "is a symlink")
    assert victim.read_text() == "precious"


# --- point 2: symlinks, races and other files -------------------------------------------------


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_socket_mode_and_group_never_go_through_the_public_path(
    tmp_path: Path, shm_name: str, supervisor: SyncSupervisor
) -> None:
    """No chmod/chown system call ever names the socket's public path (a symlink swapped in
    there between bind and chmod would redirect it): strace the daemon's start-up."""
    sock = tmp_path / "s.sock"
    trace = tmp_path / "trace"
    strace = ["strace", "-f", "-qq", "-e", "trace=chmod,fchmodat,chown,lchown,fchownat",
              "-o", str(trace)]  # fmt: skip
    mode = ["--socket-mode", "0666", "--socket-group", "nogroup"]
    argv = [*strace, *daemon_command(str(sock), shm_name, args=mode)]
    daemon = SyncDaemon(argv, str(sock), shm_name, 1)
    supervisor.start(daemon, notify=True, process_group=True)
    try:
        daemon.wait_ready(TIMEOUT)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
        assert os.stat(sock).st_gid == 65534
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)  # strace and the daemon it traces
        daemon.wait_exit(TIMEOUT)
    calls = trace.read_text()
    for name in ("s.sock", "s.sock.ctl", "s.sock.events"):
        assert f'/{name}"' not in calls, calls


@pytest.mark.parametrize("suffix", [".ctl", ".events"])
def test_regular_files_beside_the_socket_are_never_deleted(
    tmp_path: Path, shm_name: str, suffix: str
) -> None:
    sock = tmp_path / "s.sock"
    precious = Path(f"{sock}{suffix}")
    precious.write_text("precious")
    result = run_daemon("-F", "-S", str(sock), "-M", shm_name)
    one_clear_line(result, f"{precious} exists and is not a socket")
    assert precious.read_text() == "precious"
    assert not sock.exists()


def test_pid_file_temporaries_are_unpredictable(tmp_path: Path, shm_name: str) -> None:
    """Symlinks planted at every name the old ``PIDFILE.<pid>.tmp`` scheme could use next
    redirect nothing: the victim file is never written."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    pidfile = tmp_path / "d.pid"
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last + 1, last + 3000):
        os.symlink(victim, f"{pidfile}.{pid}.tmp")
    sock = str(tmp_path / "s.sock")
    result = run_daemon("-S", sock, "-M", shm_name, "-p", str(pidfile), "-l", "64K")
    try:
        assert result.returncode == 0, result.stderr
        assert victim.read_text() == "precious"
        assert not pidfile.is_symlink() and int(pidfile.read_text()) > 0
    finally:
        stop_daemonized(pidfile)


def test_a_live_pid_file_is_not_taken_over(tmp_path: Path) -> None:
    pidfile = tmp_path / "d.pid"
    names = [unique_name(), unique_name()]
    first = run_daemon("-S", str(tmp_path / "a.sock"), "-M", names[0], "-p", str(pidfile))
    try:
        assert first.returncode == 0, first.stderr
        owner = pidfile.read_text()
        second = run_daemon("-S", str(tmp_path / "b.sock"), "-M", names[1], "-p", str(pidfile))
        one_clear_line(second, f"pid file {pidfile} is held by a running daemon "
                                      f"(pid {int(owner)})")  # fmt: skip
        assert pidfile.read_text() == owner
        assert not (tmp_path / "b.sock").exists()
        assert not os.path.exists(f"/dev/shm/{names[1]}")
    finally:
        stop_daemonized(pidfile)
        for name in names:
            unlink_posix_shm(name)
    assert not pidfile.exists()


def test_a_stale_pid_file_is_replaced_and_a_symlink_refused(tmp_path: Path, shm_name: str) -> None:
    pidfile = tmp_path / "d.pid"
    pidfile.write_text("999999\n")  # its daemon is gone: nobody holds the lock
    result = run_daemon("-S", str(tmp_path / "a.sock"), "-M", shm_name, "-p", str(pidfile))
    try:
        assert result.returncode == 0, result.stderr
        assert int(pidfile.read_text()) != 999999
    finally:
        stop_daemonized(pidfile)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    pidfile.symlink_to(victim)
    result = run_daemon("-S", str(tmp_path / "b.sock"), "-M", shm_name, "-p", str(pidfile))
    one_clear_line(result, "is a symlink")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "b.sock").exists()


# --- point 3: memory is reserved, or refused clearly ------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of our own (we are root), unmounted whatever happens."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_memory_that_cannot_be_had_is_refused_at_start_up(tiny_tmpfs: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    result = run_daemon("-F", "-S", sock, "-m", str(tiny_tmpfs), "-l", "4M", "--no-control")
    one_clear_line(result, "cannot reserve 4 MiB")
    assert "--sparse" in result.stderr
    assert list(tiny_tmpfs.iterdir()) == []
    assert not os.path.exists(sock)
    # what fits is reserved: the peer can touch every page
    in_tmpfs = ["-m", str(tiny_tmpfs), "--no-control"]  # (after -M: -m wins)
    with sync_daemon_process(tmp_path, socket_path=sock, size="512K", args=in_tmpfs) as daemon:
        assert os.statvfs(tiny_tmpfs).f_bfree * os.statvfs(tiny_tmpfs).f_frsize <= 512 << 10
        daemon.terminate()
        assert daemon.wait_exit(TIMEOUT) == 0


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_sparse_opts_out_and_says_what_it_risks(tiny_tmpfs: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    sparse = ["-m", str(tiny_tmpfs), "--no-control", "--sparse"]
    with sync_daemon_process(tmp_path, socket_path=sock, size="4M", args=sparse) as daemon:
        daemon.wait_log("SIGBUS")
        daemon.terminate()
        assert daemon.wait_exit(TIMEOUT) == 0


# --- point 16: log files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/nonexistent-dir-xyz/ivshmemd.log", "cannot open log file"),
        ("{tmp}", "cannot open log file"),
        ("/proc/version", "cannot write to log file /proc/version"),
        ("{tmp}/link", "is a symlink"),
    ],
)
def test_bad_log_files_are_one_clear_line(
    tmp_path: Path, shm_name: str, target: str, message: str
) -> None:
    (tmp_path / "victim").write_text("precious")
    (tmp_path / "link").symlink_to(tmp_path / "victim")
    path = target.format(tmp=tmp_path)
    result = run_daemon("-F", "-S", str(tmp_path / "s.sock"), "-M", shm_name, "--log-file", path)
    one_clear_line(result, message)
    assert (tmp_path / "victim").read_text() == "precious"
    assert not shm_exists(shm_name)


def test_daemonized_without_dev_log_logs_to_a_file_beside_the_socket(
    tmp_path: Path, shm_name: str
) -> None:
    if os.path.exists("/dev/log"):
        pytest.skip("this machine has syslog (/dev/log)")
    sock = tmp_path / "s.sock"
    pidfile = tmp_path / "d.pid"
    result = run_daemon("-S", str(sock), "-M", shm_name, "-p", str(pidfile))
    try:
        assert result.returncode == 0, result.stderr
    finally:
        stop_daemonized(pidfile)
    log = Path(f"{sock}.log").read_text()
    assert "listening on" in log and "shut down" in log
