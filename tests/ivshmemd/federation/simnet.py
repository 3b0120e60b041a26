"""An in-memory network of :class:`Membership` state machines, for sans-I/O tests.

Each node is a state machine with its own endpoint. Actions are carried out as the daemon's
driver would: ``Dial`` opens a link to an endpoint, ``Send`` queues a frame on it (frames of
one link arrive in order, as over one zmq connection), ``Reset`` discards a link's frames
not yet delivered, ``RemoteJoined``/``RemoteLeft`` update the node's view of remote peers
(checked like a registry would: no double join, no leave of an unknown peer), ``Deliver``
records a ring. Time is explicit (:meth:`SimNet.advance`). A test can kill or restart a node,
cut and heal the link between two nodes (frames sent meanwhile are lost, as with a reset
connection), or drop frames chosen by a predicate.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ivshmemd.federation.membership import (
    Action,
    Close,
    Deliver,
    Dial,
    LocalMember,
    MemberEvent,
    Membership,
    MemberState,
    RemoteJoined,
    RemoteLeft,
    Reset,
    Send,
)
from ivshmemd.federation.schema import decode_frame

__all__ = ["SimNet", "SimNode"]


@dataclass(eq=False)
class SimNode:
    """One daemon: its state machine and what its host saw."""

    name: str
    endpoint: str
    machine: Membership
    #: remote peers as the host holds them: peer id -> member
    remote: dict[int, str] = field(default_factory=dict)
    rings: list[tuple[int, int, int]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    joins: int = 0
    leaves: int = 0
    #: link -> (endpoint, routing id)
    links: dict[int, tuple[str, bytes]] = field(default_factory=dict)

    def up(self) -> set[str]:
        return {i for i, m in self.machine.members.items() if m.state is MemberState.UP}


@dataclass
class _Frame:
    source: SimNode
    link: int
    target: str
    origin: bytes
    data: bytes


class SimNet:
    """Nodes, links and an ordered queue of frames in flight."""

    def __init__(self, seed: int = 0, timeout: float = 3.0) -> None:
        self.now = 0.0
        self.timeout = timeout
        self.nodes: dict[str, SimNode] = {}
        self.flight: deque[_Frame] = deque()
        self.cuts: set[frozenset[str]] = set()
        self.drop: Callable[[SimNode, SimNode, bytes], bool] | None = None
        self.rng = random.Random(seed)
        self.delivered = 0

    # -- nodes ---------------------------------------------------------------------------

    def add(
        self,
        name: str,
        index: int,
        *,
        seeds: tuple[str, ...] = (),
        shm_size: int = 1 << 20,
        vectors: int = 1,
        id_range: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> SimNode:
        endpoint = f"ipc://sim/{name}"
        lo, hi = id_range or (index * 100, index * 100 + 99)
        local = LocalMember(
            name,
            uuid.UUID(int=self.rng.getrandbits(128)).hex,
            endpoint,
            (lo, hi),
            shm_size,
            vectors,
        )
        machine = Membership(
            local, seeds=seeds, timeout=self.timeout, rng=random.Random(self.rng.random()), **kwargs
        )
        node = SimNode(name, endpoint, machine)
        self.nodes[endpoint] = node
        self.apply(node, machine.start(self.now))
        return node

    def kill(self, node: SimNode) -> None:
        """The process dies: it is gone, frames to it are lost."""
        del self.nodes[node.endpoint]
        self.flight = deque(f for f in self.flight if f.target != node.endpoint)

    def restart(self, node: SimNode, *, seeds: tuple[str, ...] = (), **kwargs: Any) -> SimNode:
        """A new process at the same endpoint, with the same identity and id range."""
        if node.endpoint in self.nodes:
            self.kill(node)
        local = node.machine.local
        fresh = LocalMember(
            local.identity,
            uuid.UUID(int=self.rng.getrandbits(128)).hex,
            local.endpoint,
            local.id_range,
            local.shm_size,
            local.vectors,
        )
        machine = Membership(
            fresh, seeds=seeds, timeout=self.timeout, rng=random.Random(self.rng.random()), **kwargs
        )
        new = SimNode(node.name, node.endpoint, machine)
        self.nodes[node.endpoint] = new
        self.apply(new, machine.start(self.now))
        return new

    def cut(self, a: SimNode, b: SimNode) -> None:
        self.cuts.add(frozenset((a.endpoint, b.endpoint)))
        self.flight = deque(
            f for f in self.flight if frozenset((f.source.endpoint, f.target)) not in self.cuts
        )

    def heal(self, a: SimNode, b: SimNode) -> None:
        self.cuts.discard(frozenset((a.endpoint, b.endpoint)))

    # -- actions ---------------------------------------------------------------------------

    def apply(self, node: SimNode, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Dial):
                node.links[action.link] = (action.endpoint, action.routing_id)
            elif isinstance(action, Close):  # linger 0: what it had not sent is gone
                node.links.pop(action.link, None)
                self.flight = deque(
                    f for f in self.flight if not (f.source is node and f.link == action.link)
                )
            elif isinstance(action, Reset):
                pass  # every Send is in flight at once here: nothing waits in an outbox
            elif isinstance(action, Send):
                endpoint, origin = node.links[action.link]
                if frozenset((node.endpoint, endpoint)) in self.cuts:
                    continue
                self.flight.append(_Frame(node, action.link, endpoint, origin, action.data))
            elif isinstance(action, RemoteJoined):
                assert action.peer_id not in node.remote, f"{node.name}: {action} twice"
                node.remote[action.peer_id] = action.member
                node.joins += 1
            elif isinstance(action, RemoteLeft):
                assert node.remote.get(action.peer_id) == action.member, f"{node.name}: {action}"
                del node.remote[action.peer_id]
                node.leaves += 1
            elif isinstance(action, Deliver):
                node.rings.append((action.peer_id, action.vector, action.count))
            elif isinstance(action, MemberEvent):
                node.events.append((action.kind, action.info))

    # -- running ---------------------------------------------------------------------------

    def run(self, limit: int = 100_000) -> None:
        """Deliver frames until none is in flight."""
        for _ in range(limit):
            if not self.flight:
                return
            frame = self.flight.popleft()
            target = self.nodes.get(frame.target)
            if target is None or frame.source.endpoint not in self.nodes:
                continue  # sent to (or by) a dead process
            if self.drop is not None and self.drop(frame.source, target, frame.data):
                continue
            self.delivered += 1
            self.apply(target, target.machine.receive(self.now, frame.origin, frame.data))
        raise AssertionError("the network never went quiet")

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Let time pass in ticks (delivering frames between them)."""
        step = step or self.timeout / 10
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for node in list(self.nodes.values()):
                self.apply(node, node.machine.tick(self.now))
            self.run()

    def settle(self) -> None:
        """Run until quiet, with a few heartbeats for stragglers."""
        self.run()
        self.advance(self.timeout)

    # -- views -----------------------------------------------------------------------------

    def consistent(self) -> bool:
        """Every live node holds exactly the other live nodes' local peers."""
        for node in self.nodes.values():
            expected = {
                peer_id: other.machine.local.identity
                for other in self.nodes.values()
                if other is not node
                for peer_id in other.machine.local_peers
            }
            if node.remote != expected:
                return False
        return True


def kinds(data: bytes) -> str:
    """A frame's kind name (for drop predicates)."""
    return type(decode_frame(data)[1]).__name__
