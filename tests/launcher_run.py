"""Running the real launcher (``ivshmemctl up``) in tests: a process whose stdout and stderr
lines a test waits for, killed if the test fails half way; and the check that it left
nothing behind. A plain helper module for the launcher tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"
TIMEOUT = 60.0


async def run_command(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, stdin=subprocess.DEVNULL,
                                      **kwargs)  # fmt: skip


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR), env.get("PYTHONPATH")]))
    return env


def launcher_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "peers.launcher", "up", *args]


class LauncherRun:
    """A running launcher whose stdout and stderr lines we can wait for."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._open = 2

    async def pump(self, stream: trio.abc.ReceiveStream, into: list[str]) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            into.extend(line.decode() for line in lines)
            self._lot.unpark_all()
        if buffer:
            into.append(buffer.decode())
        self._open -= 1
        self._lot.unpark_all()

    async def wait_line(self, into: list[str], pattern: str) -> re.Match[str]:
        rx = re.compile(pattern)
        with trio.move_on_after(TIMEOUT):
            while True:
                for line in into:
                    if found := rx.search(line):
                        return found
                if not self._open:
                    break
                await self._lot.park()
        raise AssertionError(f"no line /{pattern}/; stdout {self.out}, stderr {self.err}")

    async def wait(self) -> int:
        with trio.fail_after(TIMEOUT):
            while self._open:
                await self._lot.park()
            return await self.process.wait()


@asynccontextmanager
async def launcher(*args: str) -> AsyncIterator[LauncherRun]:
    """Run the launcher; kill it (and so its pipes) if the test fails half way."""
    process = await trio.lowlevel.open_process(
        launcher_argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=launcher_env(),
    )  # fmt: skip
    run = LauncherRun(process)
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(run.pump, process.stdout, run.out)
        nursery.start_soon(run.pump, process.stderr, run.err)
        try:
            yield run
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGINT)  # it stops its children itself
                    with trio.move_on_after(TIMEOUT):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def no_leftovers(run: LauncherRun) -> None:
    """The daemon and every peer are gone, and so are the socket directory and the shm."""
    daemon = re.search(
        r"daemon \(pid (\d+)\) listening on (\S+) \(shm ([^,]+),", "\n".join(run.err)
    )
    assert daemon, run.err
    pids = [int(daemon.group(1))]
    pids += [
        int(m.group(1))
        for line in run.err
        if (m := re.search(r"(?:running|fork server) \(pid (\d+)\)", line))
    ]
    assert all(gone(pid) for pid in pids), pids
    socket_path = Path(daemon.group(2))
    assert not socket_path.exists()
    assert not socket_path.parent.exists()  # the private directory
    assert not Path("/dev/shm", daemon.group(3)).exists()
