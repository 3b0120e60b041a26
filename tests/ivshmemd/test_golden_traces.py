"""Replay the scenarios recorded from QEMU's own ivshmem-server and require identical streams.

The oracle is ../shared/testdata/qemu-ivshmem-server-traces.json (see the README beside it).
Each step is replayed against a real ``ivshmemd`` process with raw clients; how many messages
each step must produce comes from the protocol document (not from the trace), and the content
of what arrived is then compared with the trace message by message. A final barrier (a
sentinel joins and leaves) proves that nothing else was sent in between.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ivshmemd.shm import MIN_SHM_SIZE
from ivshmemd.supervise import DaemonProcess
from ivshmemd.supervise.fabric import fabric_process
from tests.rawclient import RawClient

TRACES_PATH = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "testdata"
    / ("qemu-ivshmem-server-traces.json")
)


def _load() -> dict[str, Any]:
    if not TRACES_PATH.exists():
        pytest.fail(f"the oracle {TRACES_PATH} is missing (../shared must sit beside the repo)")
    data: dict[str, Any] = json.loads(TRACES_PATH.read_text())
    return data


TRACES = _load() if TRACES_PATH.exists() else {}


def _as_stream(recorded: list[list[Any]]) -> list[tuple[int, bool]]:
    return [(int(value), bool(fd)) for value, fd in recorded]


@pytest.fixture(params=["alone", "federated"])
def golden_daemon(request: pytest.FixtureRequest, start_daemon: Any, tmp_path: Path) -> Any:
    """A daemon alone, or host 0 of a federation of two (with no peers on host 1): its
    local peers' ids and message order must be QEMU's either way."""
    if request.param == "alone":
        return start_daemon

    @asynccontextmanager
    async def start(vectors: int = 1) -> AsyncIterator[DaemonProcess]:
        async with fabric_process(tmp_path, 2, vectors=vectors) as daemons:
            yield daemons[0]

    return start


class Replay:
    """Drives raw clients through named steps, reading what the protocol says must arrive."""

    def __init__(self, socket_path: str, vectors: int) -> None:
        self.socket_path = socket_path
        self.vectors = vectors
        self.live: dict[str, RawClient] = {}
        self.all: dict[str, RawClient] = {}
        self.ids: dict[str, int] = {}

    async def join(self, name: str) -> None:
        client = await RawClient.connect(self.socket_path)
        others = list(self.live.values())
        head = await client.read(3)
        self.ids[name] = head[1][0]
        await client.read(self.vectors * (len(others) + 1))
        for other in others:
            await other.read(self.vectors)
        self.live[name] = client
        self.all[name] = client

    async def leave(self, name: str, how: str = "close") -> None:
        client = self.live.pop(name)
        if how == "close":
            client.sock.close()
        else:  # the client writes: any data means it is gone
            client.sock.send(b"x" * int(how))
        for other in self.live.values():
            await other.read(1)

    async def barrier(self) -> None:
        """A sentinel joins and leaves: afterwards every stream is complete."""
        sentinel = "__barrier__"
        await self.join(sentinel)
        await self.leave(sentinel)
        sid = self.ids.pop(sentinel)
        tail = [(sid, True)] * self.vectors + [(sid, False)]
        for client in self.live.values():
            assert client.stream[-len(tail) :] == tail
            del client.stream[-len(tail) :]

    def close(self) -> None:
        for client in self.all.values():
            client.close()


async def _run_steps(replay: Replay, steps: str) -> None:
    for step in (s.strip() for s in steps.split(";")):
        if m := re.fullmatch(r"(\w) joins", step):
            await replay.join(m[1])
        elif m := re.fullmatch(r"(\w) leaves", step):
            await replay.leave(m[1])
        elif m := re.fullmatch(r"(\w) writes (\d+) bytes", step):
            await replay.leave(m[1], how=m[2])
        else:
            raise AssertionError(f"unknown step {step!r}")
    await replay.barrier()


@pytest.mark.parametrize(
    ("scenario", "vectors"),
    [("join_leave_2_vectors", 2), ("zero_vectors", 0), ("client_writes_is_dropped", 1)],
)
async def test_streams_match_qemu(golden_daemon: Any, scenario: str, vectors: int) -> None:
    trace = TRACES[scenario]
    async with golden_daemon(vectors=vectors) as daemon:
        replay = Replay(daemon.socket_path, vectors)
        try:
            await _run_steps(replay, trace["steps"])
            for name, expected in trace["streams"].items():
                assert replay.all[name].stream == _as_stream(expected), name
            if "ids" in trace:
                assert replay.ids == trace["ids"]
        finally:
            replay.close()


async def test_vector_fds_connect_as_in_qemu(start_daemon: Any) -> None:
    """The n-th fd a peer got for D is D's own vector n (checked by ringing through it)."""
    trace = TRACES["join_leave_2_vectors"]
    assert all(trace["vector_fds_connect"].values())
    async with start_daemon(vectors=2) as daemon:
        replay = Replay(daemon.socket_path, 2)
        try:
            await _run_steps(replay, trace["steps"])
            c, d = replay.all["C"], replay.all["D"]
            c_id, d_id = replay.ids["C"], replay.ids["D"]
            # C rings D's vector 1 -> D's own vector 1 (and only it) fires
            os.eventfd_write(c.vector_fds(d_id)[1], 1)
            d_own = d.vector_fds(d_id)
            assert os.eventfd_read(d_own[1]) == 1
            with pytest.raises(BlockingIOError):
                os.eventfd_read(d_own[0])
            # D rings C's vector 0 -> C's own vector 0
            os.eventfd_write(d.vector_fds(c_id)[0], 1)
            c_own = c.vector_fds(c_id)
            assert os.eventfd_read(c_own[0]) == 1
            with pytest.raises(BlockingIOError):
                os.eventfd_read(c_own[1])
        finally:
            replay.close()


async def test_id_allocation_matches_qemu(golden_daemon: Any) -> None:
    """3 join; the 2nd leaves; one joins; all leave; one joins -> QEMU's ids."""
    async with golden_daemon(vectors=1) as daemon:
        replay = Replay(daemon.socket_path, 1)
        try:
            for name in "abc":
                await replay.join(name)
            await replay.leave("b")
            await replay.join("d")
            for name in "acd":
                await replay.leave(name)
            await replay.join("e")
            got = [replay.ids[n] for n in "abcde"]
            assert got == TRACES["id_allocation"]["ids"]
        finally:
            replay.close()


@pytest.mark.parametrize("size_arg", sorted(TRACES.get("size_rounding", {}), key=len))
async def test_size_rounding_matches_qemu(start_daemon: Any, size_arg: str) -> None:
    expected = max(TRACES["size_rounding"][size_arg], MIN_SHM_SIZE)
    async with start_daemon(vectors=0, size=size_arg) as daemon:
        client = await RawClient.connect(daemon.socket_path)
        try:
            await client.read(3)
            assert os.fstat(client.shm_fd()).st_size == expected
        finally:
            client.close()
