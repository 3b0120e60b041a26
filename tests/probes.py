"""Run ``tests.peer_probe`` client processes from a trio test and read their JSON events."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 20.0


@dataclass
class Probe:
    """One client process and the events it printed so far."""

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
            self.events.extend(json.loads(line) for line in lines if line)
            self.lot.unpark_all()
        self.eof = True
        self.lot.unpark_all()

    async def wait_for(self, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first event with these fields (waiting for it to be printed)."""
        with trio.move_on_after(timeout):
            while True:
                for event in self.events:
                    if all(event.get(k) == v for k, v in match.items()):
                        return event
                if self.eof:
                    break
                await self.lot.park()
        raise AssertionError(f"probe never printed {match}; it printed {self.events}")

    def matching(self, **match: Any) -> list[dict[str, Any]]:
        """All events so far with these fields."""
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

    @property
    def peer_id(self) -> int:
        return int(self.matching(event="welcome")[0]["id"])

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")


@asynccontextmanager
async def probes(socket_path: str, vectors: int) -> AsyncIterator[Any]:
    """``async with probes(path, n) as spawn: p = await spawn()`` (all killed on exit)."""
    started: list[Probe] = []
    async with trio.open_nursery() as nursery:

        async def spawn() -> Probe:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.peer_probe", socket_path, str(vectors)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
            )  # fmt: skip
            probe = Probe(process)
            started.append(probe)
            nursery.start_soon(probe.pump)
            await probe.wait_for(event="welcome")
            return probe

        try:
            yield spawn
        finally:
            with trio.CancelScope(shield=True):
                for probe in started:
                    if probe.process.returncode is None:
                        probe.process.kill()
                    await probe.process.wait()
                nursery.cancel_scope.cancel()
