"""Spawn ``ivshmem-peer`` processes with ``--report json`` from a trio test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0


@dataclass
class PeerProc:
    """One peer process and the JSON events it printed."""

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
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

    async def wait_event(
        self, timeout: float = TIMEOUT, count: int = 1, **match: Any
    ) -> dict[str, Any]:
        """The ``count``-th event with these fields, waiting for it if need be."""
        with trio.move_on_after(timeout):
            while True:
                found = self.matching(**match)
                if len(found) >= count:
                    return found[count - 1]
                if self.eof:
                    break
                await self.lot.park()
        raise AssertionError(f"peer never reported {count} x {match}; it reported {self.events}")

    async def wait_exit(self, timeout: float = TIMEOUT) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def peer_processes() -> AsyncIterator[Any]:
    """``async with peer_processes() as spawn: p = await spawn([...args])``; all reaped."""
    started: list[PeerProc] = []
    async with trio.open_nursery() as nursery:

        async def spawn(args: Sequence[str], stderr: Any = subprocess.DEVNULL) -> PeerProc:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "peers", "--report", "json", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
            )  # fmt: skip
            peer = PeerProc(process)
            started.append(peer)
            nursery.start_soon(peer.pump)
            return peer

        try:
            yield spawn
        finally:
            with trio.CancelScope(shield=True):
                for peer in started:
                    if peer.process.returncode is None:
                        peer.process.kill()
                    await peer.process.wait()
                nursery.cancel_scope.cancel()
