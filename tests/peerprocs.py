"""Child processes that report JSON lines on stdout, run from trio tests.

:func:`peer_processes` spawns ``ivshmem-peer --report json``; :func:`json_processes` spawns
anything that prints one JSON object per line (``tests.peer_probe`` too). Every process a
test started is killed and reaped when the block ends, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0
PEER_COMMAND = (sys.executable, "-m", "peers", "--report", "json")


@dataclass
class JsonProcess:
    """One child process and the JSON events it printed so far."""

    process: trio.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    eof: bool = False

    async def pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.events.extend(json.loads(line) for line in lines if line.strip())
            self.lot.unpark_all()
        self.eof = True
        self.lot.unpark_all()

    def matching(self, **match: Any) -> list[dict[str, Any]]:
        """Every event so far with these fields."""
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

    async def wait_event(
        self, timeout: float = TIMEOUT, nth: int = 1, **match: Any
    ) -> dict[str, Any]:
        """The ``nth`` event with these fields, waiting for it if need be."""
        with trio.move_on_after(timeout):
            while True:
                found = self.matching(**match)
                if len(found) >= nth:
                    return found[nth - 1]
                if self.eof:
                    break
                await self.lot.park()
        raise AssertionError(f"never reported {nth} x {match}; reported {self.events}")

    async def send(self, line: str) -> None:
        """Write a line to the process's stdin (spawned with ``stdin=subprocess.PIPE``)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def wait_exit(self, timeout: float = TIMEOUT) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


Spawn = Callable[..., Awaitable[JsonProcess]]


@asynccontextmanager
async def json_processes(prefix: Sequence[str]) -> AsyncIterator[Spawn]:
    """``async with json_processes([...]) as spawn: p = await spawn([args])``."""
    started: list[JsonProcess] = []
    async with trio.open_nursery() as nursery:

        async def spawn(
            args: Sequence[str], stdin: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL
        ) -> JsonProcess:
            process = await trio.lowlevel.open_process(
                [*prefix, *args], stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT
            )
            child = JsonProcess(process)
            started.append(child)
            nursery.start_soon(child.pump)
            return child

        try:
            yield spawn
        finally:
            with trio.CancelScope(shield=True):
                for child in started:
                    if child.process.returncode is None:
                        child.process.kill()
                    await child.process.wait()
                nursery.cancel_scope.cancel()


def peer_processes() -> Any:
    """``async with peer_processes() as spawn: peer = await spawn(["-S", sock, ...])``."""
    return json_processes(PEER_COMMAND)
