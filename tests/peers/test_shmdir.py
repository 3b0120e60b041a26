"""The shared-memory directory: regions that never overlap, partners both sides agree on,
and entries reclaimed once their owner has gone.

Every "peer" is a real process (``shmdir_peer.py``) holding its own record locks on one
memfd, as peers hold them on the daemon's shm; killing one is a peer leaving. The directory
is driven the way the runtime drives it; no daemon is needed for its own rules.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ivshmemd.supervise import Child, Supervisor, open_supervisor
from peers.shmdir import DIRECTORY_SIZE, PAGE_SIZE, ShmDirectory, ShmDirectoryError

HELPER = Path(__file__).with_name("shmdir_peer.py")
SIZE = 1 << 20


class DirPeer:
    """One helper process: send it a command, get its answer."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.asked: dict[str, int] = {}

    async def ask(self, command: str) -> Any:
        await self.child.send_line(command)
        verb = command.split()[0]
        self.asked[verb] = self.asked.get(verb, 0) + 1
        event = await self.child.wait_event(count=self.asked[verb], command=verb)
        return event["result"]

    async def leave(self) -> None:
        self.child.kill()
        assert await self.child.wait_exit() == -signal.SIGKILL


Start = Callable[[int], Awaitable[DirPeer]]


@pytest.fixture
def memfd() -> Any:
    fd = os.memfd_create("shmdir-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
async def start(memfd: int) -> AsyncIterator[Start]:
    async with open_supervisor() as supervisor:

        async def spawn(peer_id: int, supervisor: Supervisor = supervisor) -> DirPeer:
            os.set_inheritable(memfd, True)
            argv = [sys.executable, str(HELPER), str(memfd), str(SIZE), str(peer_id)]
            child = await supervisor.start(Child(argv), events=True, stdin=True, pass_fds=(memfd,))
            await child.wait_event(ready=peer_id)
            return DirPeer(child)

        yield spawn


def overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return a["offset"] < b["offset"] + b["size"] and b["offset"] < a["offset"] + a["size"]


async def test_regions_are_disjoint_page_aligned_and_below_the_directory(start: Start) -> None:
    a, b = await start(0), await start(1)
    first = await a.ask("allocate table 5000")
    second = await b.ask("allocate queue 100")
    assert first == {"name": "table", "offset": 0, "size": 2 * PAGE_SIZE, "owner": 0}
    assert second["offset"] % PAGE_SIZE == 0 and second["size"] == PAGE_SIZE
    assert not overlap(first, second)
    assert second["offset"] + second["size"] <= SIZE - DIRECTORY_SIZE
    assert await a.ask("lookup queue") == second  # one directory, seen by every peer
    taken = await b.ask("allocate table 4096")
    assert taken == {"error": "region 'table' is held by peer 0 (8192 bytes at 0x0)"}
    too_big = await b.ask(f"allocate huge {SIZE}")
    assert "no room for region 'huge'" in too_big["error"]
    assert "ivshmemd -l" in too_big["error"]
    assert await a.ask("free queue") is False  # not ours
    assert await b.ask("free queue") is True
    assert await a.ask("lookup queue") is None


async def test_a_peer_that_leaves_gives_its_regions_back(start: Start) -> None:
    a = await start(0)
    held = await a.ask("allocate scratch 65536")
    await a.leave()
    # A new peer with the same id (ids are reused) does not inherit them: owners are tokens.
    again = await start(0)
    assert await again.ask("lookup scratch") is None
    assert await again.ask("allocate other 65536") == {**held, "name": "other"}


async def test_partners_agree_on_one_pair_and_each_pair_has_its_own_region(
    start: Start,
) -> None:
    a, b, c, d = [await start(peer_id) for peer_id in (4, 9, 2, 7)]
    assert await a.ask("seek ring 8192") is None  # nobody waits yet: it waits
    assert await a.ask("seek ring 8192") is None  # asking again keeps its place
    claim = await b.ask("seek ring 8192")
    assert claim["partner"] == 4 and claim["leader"] is False
    assert await a.ask("claimed ring") == {
        "key": "ring",
        "partner": 9,
        "leader": True,
        "region": claim["region"],
    }
    assert await c.ask("seek ring 8192") is None  # pairs are never shared
    second = await d.ask("seek ring 8192")
    assert second["partner"] == 2 and second["leader"] is False
    assert not overlap(claim["region"], second["region"])
    assert await c.ask("seek ping 0") is None  # another key: another queue, no region
    entries = await c.ask("entries")
    assert sorted((e["kind"], e["name"]) for e in entries) == [
        (2, "ping"),
        (3, "ring"),
        (3, "ring"),
    ]


async def test_a_waiting_peer_that_leaves_is_not_claimed(start: Start) -> None:
    a, b = await start(0), await start(1)
    assert await a.ask("seek hello 4096") is None
    await a.leave()
    assert await b.ask("seek hello 4096") is None  # waits, instead of pairing with the dead


async def test_a_partner_that_left_before_it_was_noticed_is_forgotten(start: Start) -> None:
    a, b, c = await start(0), await start(1), await start(2)
    assert await a.ask("seek hello 4096") is None
    claim = await b.ask("seek hello 4096")
    await b.leave()
    assert await a.ask("claimed hello") is None  # back to waiting, region kept
    again = await c.ask("seek hello 4096")
    assert again["partner"] == 0 and again["region"] == claim["region"]


async def test_the_directory_takes_only_the_last_page(memfd: int, start: Start) -> None:
    with mmap.mmap(memfd, SIZE) as memory:
        memory[:] = b"\xa5" * SIZE  # a guest's data, and garbage where the directory goes
        a = await start(0)
        assert (await a.ask("allocate x 4096"))["offset"] == 0
        assert memory[PAGE_SIZE : SIZE - DIRECTORY_SIZE] == b"\xa5" * (
            SIZE - DIRECTORY_SIZE - PAGE_SIZE
        )
        assert memory[SIZE - DIRECTORY_SIZE : SIZE - DIRECTORY_SIZE + 8] == b"IVSHDIR1"


def test_a_shared_memory_too_small_for_the_directory_says_so() -> None:
    fd = os.memfd_create("shmdir-small", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        memory = bytearray(4096)
        directory = ShmDirectory(
            fd,
            4096,
            lambda o, n: bytes(memory[o : o + n]),
            lambda o, d: memory.__setitem__(slice(o, o + len(d)), d),
            0,
        )
        with pytest.raises(ShmDirectoryError, match=r"too small .* at least 8192 bytes"):
            directory.allocate("x", 1)
    finally:
        os.close(fd)


def test_names_are_checked() -> None:
    fd = os.memfd_create("shmdir-names", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        memory = bytearray(SIZE)
        directory = ShmDirectory(
            fd,
            SIZE,
            lambda o, n: bytes(memory[o : o + n]),
            lambda o, d: memory.__setitem__(slice(o, o + len(d)), d),
            0,
        )
        for bad in ("", "x" * 25):
            with pytest.raises(ShmDirectoryError, match="bad region name"):
                directory.allocate(bad, 1)
        assert json.dumps(directory.entries()) == "[]"
    finally:
        os.close(fd)
