"""Run ``tests.peer_probe`` client processes from a trio test (see :mod:`tests.peerprocs`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from .peerprocs import JsonProcess, json_processes


def probe_id(probe: JsonProcess) -> int:
    """The peer id a probe was given (from its welcome line)."""
    return int(probe.matching(event="welcome")[0]["id"])


@asynccontextmanager
async def probes(
    socket_path: str, vectors: int
) -> AsyncIterator[Callable[[], Awaitable[JsonProcess]]]:
    """``async with probes(path, n) as spawn: p = await spawn()`` (all killed on exit)."""
    prefix = [sys.executable, "-m", "tests.peer_probe", socket_path, str(vectors)]
    async with json_processes(prefix) as spawn_json:

        async def spawn() -> JsonProcess:
            probe = await spawn_json([], stdin=subprocess.PIPE)
            await probe.wait_event(event="welcome")
            return probe

        yield spawn
