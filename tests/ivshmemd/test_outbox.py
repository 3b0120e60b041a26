"""The per-recipient outbox (pure): join/leave coalescing keeps every view right, releases
every handle exactly once, and bounds what a queue holds (issue 8, point 5)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmemd.outbox import Outbox, limits
from ivshmemd.protocol import (
    ClientParser,
    Message,
    PeerLeft,
    PeerVector,
    PeerVectors,
    join_messages,
    leave_messages,
)
from ivshmemd.registry import IdAllocator


def test_a_join_notice_still_queued_is_withdrawn_with_the_leave() -> None:
    box: Outbox[str] = Outbox()
    box.push((Message(7, "7.0"), Message(7, "7.1")), announces=7)
    assert (box.messages, box.fds) == (2, 2)
    assert box.withdraw_announcement(7) == (["7.0", "7.1"], False)  # neither is needed
    assert (box.messages, box.fds) == (0, 0)
    assert box.head() is None


def test_a_partly_sent_join_notice_keeps_its_leave() -> None:
    box: Outbox[str] = Outbox()
    box.push((Message(7, "7.0"), Message(7, "7.1")), announces=7)
    assert box.pop() == Message(7, "7.0")
    assert box.withdraw_announcement(7) == (["7.1"], True)
    assert box.withdraw_announcement(7) == ([], True)  # nothing queued: the leave is needed


def test_other_runs_keep_their_order() -> None:
    box: Outbox[str] = Outbox()
    box.push((Message(0), Message(3), Message(-1, "shm")))
    box.push((Message(1, "1.0"),), announces=1)
    box.push((Message(2, "2.0"),), announces=2)
    box.withdraw_announcement(1)
    assert [box.pop() for _ in range(len(box))] == [
        Message(0), Message(3), Message(-1, "shm"), Message(2, "2.0"),
    ]  # fmt: skip


def test_limits_grow_with_vectors_and_peers() -> None:
    assert limits(1, 4) == (3 + 2 * 5, 1 + 5)
    assert limits(0, 10).fds == 1
    assert limits(64, 4096).messages > limits(1, 4096).messages


@dataclass
class World:
    """A daemon's registry driven by the pure protocol and outboxes; recipients read a
    random amount of their queue at random times, as slow peers do."""

    n_vectors: int
    alloc: IdAllocator = field(default_factory=IdAllocator)
    order: list[int] = field(default_factory=list)
    boxes: dict[int, Outbox[str]] = field(default_factory=dict)
    parsers: dict[int, ClientParser] = field(default_factory=dict)
    views: dict[int, dict[int, int]] = field(default_factory=dict)
    refs: Counter[str] = field(default_factory=Counter)

    def vectors(self, peer_id: int) -> PeerVectors[str]:
        return PeerVectors(peer_id, tuple(f"{peer_id}.{i}" for i in range(self.n_vectors)))

    def push(self, recipient: int, messages: tuple[Message[str], ...] | list[Message[str]],
             announces: int | None) -> None:  # fmt: skip
        for message in messages:
            if message.fd is not None:
                self.refs[message.fd] += 1
        self.boxes[recipient].push(messages, announces)

    def join(self) -> None:
        peer_id = self.alloc.allocate(set(self.order))
        self.boxes[peer_id] = Outbox()
        self.parsers[peer_id] = ClientParser()
        self.views[peer_id] = {}
        existing = [self.vectors(p) for p in self.order]
        for recipient, messages, announces in join_messages(self.vectors(peer_id), existing, "shm"):
            self.push(recipient, messages, announces)
        self.order.append(peer_id)

    def leave(self, index: int) -> None:
        peer_id = self.order.pop(index % len(self.order))
        for fd in self.boxes.pop(peer_id).clear():
            self.refs[fd] -= 1
        del self.parsers[peer_id], self.views[peer_id]
        for recipient, messages, _ in leave_messages(peer_id, self.order):
            withdrawn, needed = self.boxes[recipient].withdraw_announcement(peer_id)
            for fd in withdrawn:
                self.refs[fd] -= 1
            if needed:
                self.push(recipient, messages, None)

    def read(self, recipient: int, count: int) -> None:
        box, parser, view = self.boxes[recipient], self.parsers[recipient], self.views[recipient]
        for _ in range(min(count, len(box))):
            message = box.pop()
            if message.fd is not None:
                self.refs[message.fd] -= 1
            event = parser.feed(message.value, None if message.fd is None else 1)
            if isinstance(event, PeerVector) and not event.own:
                view[event.peer_id] = view.get(event.peer_id, 0) + 1
            elif isinstance(event, PeerLeft):
                # a leave only for a peer it heard of (with vectors there are join notices)
                assert not self.n_vectors or event.peer_id in view
                view.pop(event.peer_id, None)

    def check_queues(self) -> None:
        bound = limits(self.n_vectors, 64)
        for box in self.boxes.values():
            assert not box.exceeds(bound)
            # queued fds are those of live peers only (plus the shm)
            live = {f"{p}.{i}" for p in self.order for i in range(self.n_vectors)} | {"shm"}
            assert set(self.queued_fds(box)) <= live

    @staticmethod
    def queued_fds(box: Outbox[str]) -> list[str]:
        return [m.fd for run in box._runs for m in run.messages[run.cursor :] if m.fd]


@settings(max_examples=200, deadline=None)
@given(
    n_vectors=st.integers(0, 3),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("join"), st.just(0), st.just(0)),
            st.tuples(st.just("leave"), st.integers(0, 100), st.just(0)),
            st.tuples(st.just("read"), st.integers(0, 100), st.integers(0, 8)),
        ),
        max_size=80,
    ),
)
def test_coalescing_keeps_every_view_right_and_releases_every_fd(
    n_vectors: int, ops: list[tuple[str, int, int]]
) -> None:
    world = World(n_vectors)
    for kind, a, b in ops:
        if kind == "join" or not world.order:
            world.join()
        elif kind == "leave":
            world.leave(a)
        else:
            world.read(world.order[a % len(world.order)], b)
        world.check_queues()
    for peer_id in world.order:  # everyone reads everything in the end
        world.read(peer_id, 1 << 30)
        others = {p: n_vectors for p in world.order if p != peer_id} if n_vectors else {}
        assert world.views[peer_id] == others
    assert all(count == 0 for count in world.refs.values()), "a handle not released once"
