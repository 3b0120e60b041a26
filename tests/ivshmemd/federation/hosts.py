"""A small real host for Federation tests: a registry with real eventfds, and waiting.

:class:`RecordingHost` is what the daemon's server will be to a
:class:`~ivshmemd.federation.Federation`: it registers remote peers (creating their
eventfds with :class:`ivshmemd.registry.Registry`), and it plays the local peers too: it
registers them, rings any peer by writing the eventfd it would have been handed, and reads
the rings that arrive on a local peer's own eventfds. Tests wait on it for conditions
(``await host.wait_for(lambda: ...)``), never on sleeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from ivshmemd.federation import Federation, FederationConfig
from ivshmemd.registry import IdAllocator, Peer, Registry, SharedFd

__all__ = [
    "WAIT",
    "LogWaiter",
    "Node",
    "RecordingHost",
    "all_see",
    "all_up",
    "federation_chain",
    "make_config",
    "start_node",
]

#: How long a test waits for a federation to do something (generous: 2 loaded cores).
WAIT = 20.0


class LogWaiter(logging.Handler):
    """Collects the federation's log lines; ``await waiter.wait_for(text)`` returns once a
    line containing ``text`` was logged (logging runs in the trio thread, so a handler can
    wake a waiting task directly)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._lot = trio.lowlevel.ParkingLot()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._lot.unpark_all()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, count: int = 1) -> str:
        with trio.fail_after(WAIT):
            while self.count(text) < count:
                await self._lot.park()
        return next(line for line in self.lines if text in line)

    def __enter__(self) -> LogWaiter:
        logger = logging.getLogger("ivshmemd.federation")
        logger.addHandler(self)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("ivshmemd.federation")
        logger.removeHandler(self)
        logger.setLevel(self._level)


@dataclass(eq=False)
class RecordingHost:
    """The server's side of the seam, for tests (see the module docstring)."""

    vectors: int
    id_range: tuple[int, int]
    registry: Registry = field(init=False)
    federation: Federation | None = None
    remote: dict[int, str] = field(default_factory=dict)
    #: ("joined" | "left", member, peer id) in the order the federation reported them
    peer_log: list[tuple[str, str, int]] = field(default_factory=list)
    #: (kind, info) of member events
    member_log: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: called with ("joined" | "left", member, peer id) before the registry changes
    observers: list[Callable[[str, str, int], None]] = field(default_factory=list)
    _lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def __post_init__(self) -> None:
        self.registry = Registry(self.vectors, 4096, IdAllocator(*self.id_range))

    # -- FederationHost ------------------------------------------------------------------

    def remote_peer_joined(self, member: str, peer_id: int, vectors: int) -> Sequence[SharedFd]:
        assert vectors == self.vectors
        for observe in self.observers:
            observe("joined", member, peer_id)
        made = self.registry.create_vectors()
        self.registry.add(Peer(peer_id, made, info={"member": member}))
        self.remote[peer_id] = member
        self.peer_log.append(("joined", member, peer_id))
        self._lot.unpark_all()
        return made

    def remote_peer_left(self, member: str, peer_id: int) -> None:
        for observe in self.observers:
            observe("left", member, peer_id)
        assert self.remote.pop(peer_id) == member
        self.registry.remove(peer_id)
        self.peer_log.append(("left", member, peer_id))
        self._lot.unpark_all()

    def member_event(self, kind: str, info: Mapping[str, Any]) -> None:
        self.member_log.append((kind, dict(info)))
        self._lot.unpark_all()

    # -- playing the local peers ---------------------------------------------------------

    def add_local(self, info: Mapping[str, Any] | None = None) -> Peer:
        """Register a local peer (with real eventfds; ``info`` as the server's, e.g. its
        ``pid``) and tell the federation."""
        peer = Peer(self.registry.reserve_id(), self.registry.create_vectors(), dict(info or {}))
        self.registry.add(peer)
        if self.federation is not None:
            self.federation.local_peer_joined(peer)
        return peer

    def remove_local(self, peer_id: int) -> None:
        """A local peer leaves (its socket closed first, as in the server)."""
        self.registry.remove(peer_id)
        if self.federation is not None:
            self.federation.local_peer_left(peer_id)

    def ring(self, peer_id: int, vector: int = 0, count: int = 1) -> None:
        """What a local peer does to ring ``peer_id``: write the eventfd it was handed."""
        peer = self.registry.get(peer_id)
        assert peer is not None, f"peer {peer_id} is not known here"
        os.eventfd_write(peer.vectors[vector].fd, count)

    async def read_ring(self, peer_id: int, vector: int = 0) -> int:
        """Wait for a ring on local peer ``peer_id``'s own eventfd; the count read."""
        peer = self.registry.get(peer_id)
        assert peer is not None and peer_id not in self.remote
        fd = peer.vectors[vector].fd
        with trio.fail_after(WAIT):
            while True:
                try:
                    return os.eventfd_read(fd)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)

    def pending_ring(self, peer_id: int, vector: int = 0) -> int:
        """The count waiting on a local peer's eventfd now (0 if none), without waiting."""
        peer = self.registry.get(peer_id)
        assert peer is not None
        try:
            return os.eventfd_read(peer.vectors[vector].fd)
        except BlockingIOError:
            return 0

    async def wait_for(self, condition: Callable[[], bool], what: str = "condition") -> None:
        """Return once ``condition()`` holds (checked at every host callback)."""
        with trio.move_on_after(WAIT) as scope:
            while not condition():
                with trio.move_on_after(0.2):  # status changes come without a callback too
                    await self._lot.park()
        if scope.cancelled_caught:
            raise AssertionError(f"timed out waiting for {what}")

    def local_ids(self) -> list[int]:
        """Ids of the local peers."""
        return [p.peer_id for p in self.registry if p.peer_id not in self.remote]

    def close(self) -> None:
        for peer in list(self.registry):
            self.registry.remove(peer.peer_id)


@dataclass
class Node:
    """One daemon of a test federation: its host and its Federation."""

    host: RecordingHost
    federation: Federation
    endpoint: str
    scope: trio.CancelScope
    #: set once its run() has returned (sockets closed, fds released)
    done: trio.Event

    @property
    def identity(self) -> str:
        assert self.federation.membership is not None
        return self.federation.membership.local.identity

    def members_up(self) -> set[str]:
        status = self.federation.status()
        return {m["member"] for m in status["members"] if m["state"] == "up"}


def make_config(listen: str, index: int, **overrides: Any) -> FederationConfig:
    """Config for member ``index`` (its own 1000-id range), 1 MiB shm, 2 vectors, the
    default 3 s timeout (tests of failures pass a shorter one)."""
    settings: dict[str, Any] = {
        "listen": listen,
        "id_range": (index * 1000, index * 1000 + 999),
        "shm_size": 1 << 20,
        "vectors": 2,
        "timeout": 3.0,
    }
    settings.update(overrides)
    return FederationConfig(**settings)


async def start_node(
    nursery: trio.Nursery, config: FederationConfig, region: npt.NDArray[np.uint8] | None = None
) -> Node:
    """Start a Federation with a fresh RecordingHost in ``nursery`` (``region``: its shm,
    with ``memory`` on)."""
    host = RecordingHost(config.vectors, config.id_range)
    federation = Federation(config, host, region)
    host.federation = federation
    scope = trio.CancelScope()
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            try:
                await federation.run(task_status=task_status)
            finally:
                host.close()
                done.set()

    endpoint = await nursery.start(run)
    return Node(host, federation, endpoint, scope, done)


@asynccontextmanager
async def federation_chain(
    listens: Sequence[str], **overrides: Any
) -> AsyncIterator[tuple[trio.Nursery, list[Node]]]:
    """Start one node per listening endpoint, each told only of the one before it (naming
    one member is enough); wait until every node is up with every other; cancel them all
    on exit. ``overrides`` go into every config (a callable is called with the index)."""
    async with trio.open_nursery() as nursery:
        nodes: list[Node] = []
        for index, listen in enumerate(listens):
            settings = {k: v(index) if callable(v) else v for k, v in overrides.items()}
            peers = (nodes[-1].endpoint,) if nodes else ()
            config = make_config(listen, index, peers=peers, **settings)
            nodes.append(await start_node(nursery, config))
        try:
            await all_up(nodes)
            yield nursery, nodes
        finally:
            nursery.cancel_scope.cancel()


async def all_up(nodes: Sequence[Node]) -> None:
    """Wait until every node has every other node up."""
    for node in nodes:
        others = {other.identity for other in nodes if other is not node}
        await node.host.wait_for(lambda n=node, o=others: n.members_up() == o, "members up")


async def all_see(nodes: Sequence[Node]) -> None:
    """Wait until every node holds every other node's local peers as remote peers."""
    for node in nodes:
        expected = {
            peer.peer_id: other.identity
            for other in nodes
            if other is not node
            for peer in other.host.registry
            if peer.peer_id not in other.host.remote
        }
        await node.host.wait_for(lambda n=node, e=expected: n.host.remote == e, "remote peers")


def ipc(tmp_path: Path, name: str) -> str:
    return f"ipc://{tmp_path}/{name}"
