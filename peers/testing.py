"""Test helpers: run a real ``ivshmemd`` process inside a (trio) test, and always clean up.

:func:`daemon_process` starts the daemon through its command line in the foreground, reads
its log lines as they come (so a test can wait for "peer 3 joined" instead of sleeping), and
on exit terminates it with SIGTERM (SIGKILL if it hangs), then removes whatever it may have
left: the socket file and the POSIX shm object. Socket and shm names are unique per call.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ivshmemd.shm import unlink_posix_shm

__all__ = ["DaemonProcess", "daemon_process", "fd_count", "rss_bytes", "unique_name"]

READY_PATTERN = re.compile(r"listening on ")
DEFAULT_TIMEOUT = 20.0


def unique_name(prefix: str = "ivshmem-test") -> str:
    """A shm name no other test (or test run) uses."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def fd_count(pid: int) -> int:
    """How many fds process ``pid`` has open (from /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (from /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class DaemonProcess:
    """A running daemon: where it listens, its shm, its log so far."""

    process: trio.Process
    socket_path: str
    shm_name: str
    vectors: int
    log: list[str] = field(default_factory=list)
    _lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    _eof: bool = False

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.process.pid

    def fd_count(self) -> int:
        """The daemon's open fd count."""
        return fd_count(self.pid)

    def rss(self) -> int:
        """The daemon's resident memory in bytes."""
        return rss_bytes(self.pid)

    def count(self, pattern: str) -> int:
        """How many log lines so far match the regular expression."""
        rx = re.compile(pattern)
        return sum(1 for line in self.log if rx.search(line))

    async def wait_log(
        self, pattern: str, count: int = 1, timeout: float = DEFAULT_TIMEOUT
    ) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return the matching lines."""
        rx = re.compile(pattern)
        with trio.move_on_after(timeout):
            while True:
                matches = [line for line in self.log if rx.search(line)]
                if len(matches) >= count:
                    return matches
                if self._eof:
                    break
                await self._lot.park()
        tail = "\n".join(self.log[-20:])
        raise AssertionError(
            f"daemon log never showed {count} x /{pattern}/ (exit code "
            f"{self.process.returncode}); last lines:\n{tail}"
        )

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if lines:
                self.log.extend(line.decode(errors="replace") for line in lines)
                self._lot.unpark_all()
        if buffer:
            self.log.append(buffer.decode(errors="replace"))
        self._eof = True
        self._lot.unpark_all()

    async def terminate(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); return the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        return await self.process.wait()


def daemon_command(
    socket_path: str, shm_name: str, vectors: int, size: str, args: Sequence[str]
) -> list[str]:
    """The argv that starts a foreground daemon with these settings."""
    return [
        sys.executable, "-m", "ivshmemd", "-F", "-S", socket_path, "-M", shm_name,
        "-l", size, "-n", str(vectors), *args,
    ]  # fmt: skip


@asynccontextmanager
async def daemon_process(
    directory: str | os.PathLike[str],
    *,
    vectors: int = 1,
    size: str = "1M",
    args: Sequence[str] = (),
    shm_name: str | None = None,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    socket_path: str | None = None,
) -> AsyncIterator[DaemonProcess]:
    """Run ``ivshmemd`` in the foreground for the duration of the block.

    The socket is a unique name in ``directory`` unless ``socket_path`` is given.
    ``wrapper`` prefixes the command (e.g. ``["prlimit", "--nofile=64"]``).
    """
    socket_path = socket_path or str(Path(directory) / f"ivshmem-{uuid.uuid4().hex[:8]}.sock")
    shm_name = shm_name or unique_name()
    argv = [*wrapper, *daemon_command(socket_path, shm_name, vectors, size, args)]
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env,
        )  # fmt: skip
        daemon = DaemonProcess(process, socket_path, shm_name, vectors)
        assert process.stderr is not None
        nursery.start_soon(daemon._pump, process.stderr)
        try:
            if wait_ready:
                await daemon.wait_log(READY_PATTERN.pattern)
            yield daemon
        finally:
            with trio.CancelScope(shield=True):
                await daemon.terminate()
                nursery.cancel_scope.cancel()
                if process.stderr is not None:
                    await process.stderr.aclose()
                try:
                    os.unlink(socket_path)
                except FileNotFoundError:
                    pass
                unlink_posix_shm(shm_name)
