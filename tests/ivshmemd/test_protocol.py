"""Unit tests of the sans-I/O protocol, the id allocator and the strict client parser."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmemd.protocol import (
    CLIENT_TRANSITIONS,
    ClientParser,
    ClientState,
    Delivery,
    Message,
    PeerLeft,
    PeerVector,
    PeerVectors,
    ProtocolError,
    ServerMessage,
    Welcome,
    join_messages,
    leave_messages,
)
from ivshmemd.registry import IdAllocator, RegistryFull


def _vecs(peer_id: int, n: int) -> PeerVectors[str]:
    return PeerVectors(peer_id, tuple(f"{peer_id}.{i}" for i in range(n)))


def test_join_message_order_for_newcomer_and_existing() -> None:
    a, b, c = _vecs(0, 2), _vecs(1, 2), _vecs(2, 2)
    outbox = join_messages(c, [a, b], "shm")
    # QEMU's order across recipients: greeting, the notices to the others, then the rest
    assert [recipient for recipient, _, _ in outbox] == [2, 0, 1, 2, 2, 2]
    # each announcement says whose vectors it carries (so a queue can withdraw it)
    assert [announces for _, _, announces in outbox] == [None, 2, 2, 0, 1, 2]
    merged: dict[int, list[Message[str]]] = {}
    for recipient, messages, _announces in outbox:
        merged.setdefault(recipient, []).extend(messages)
    assert merged[2] == [
        Message(0),
        Message(2),
        Message(-1, "shm"),
        Message(0, "0.0"),
        Message(0, "0.1"),
        Message(1, "1.0"),
        Message(1, "1.1"),
        Message(2, "2.0"),
        Message(2, "2.1"),
    ]
    assert merged[0] == [Message(2, "2.0"), Message(2, "2.1")]
    assert merged[1] == [Message(2, "2.0"), Message(2, "2.1")]


def test_join_with_zero_vectors_tells_nobody() -> None:
    outbox = join_messages(_vecs(1, 0), [_vecs(0, 0)], "shm")
    assert outbox == [(1, (Message(0), Message(1), Message(-1, "shm")), None)]


def test_leave_goes_to_every_remaining_peer_but_never_the_leaver() -> None:
    assert leave_messages(3, [0, 3, 5]) == [(0, (Message(3),), None), (5, (Message(3),), None)]
    assert leave_messages(3, []) == []


def test_ids_move_forward_and_are_not_reused_at_once() -> None:
    alloc = IdAllocator()
    in_use: set[int] = set()
    for expected in (0, 1, 2):
        in_use.add(alloc.allocate(in_use))
        assert expected in in_use
    in_use.discard(1)
    assert alloc.allocate(in_use) == 3


def test_ids_wrap_and_skip_ids_in_use() -> None:
    alloc = IdAllocator()
    alloc.next_id = 0xFFFE
    in_use = {0xFFFF, 0, 2}
    assert alloc.allocate(in_use) == 0xFFFE
    in_use.add(0xFFFE)
    assert alloc.allocate(in_use) == 1  # 0xFFFF and 0 are taken: wrap and skip
    in_use.add(1)
    assert alloc.allocate(in_use) == 3


def test_id_range_full_and_custom_range() -> None:
    alloc = IdAllocator(10, 12)
    in_use: set[int] = set()
    for _ in range(3):
        in_use.add(alloc.allocate(in_use))
    assert in_use == {10, 11, 12}
    with pytest.raises(RegistryFull):
        alloc.allocate(in_use)
    with pytest.raises(ValueError, match="invalid peer id range"):
        IdAllocator(5, 70000)


# -- the client parser -------------------------------------------------------------------


def test_parser_accepts_a_valid_stream() -> None:
    parser = ClientParser()
    assert parser.feed(0, None) is None
    assert parser.feed(7, None) is None
    assert parser.feed(-1, 100) == Welcome(7, 100)
    assert parser.feed(3, 101) == PeerVector(3, 0, 101, own=False)
    assert parser.feed(3, 102) == PeerVector(3, 1, 102, own=False)
    assert parser.feed(7, 103) == PeerVector(7, 0, 103, own=True)
    assert parser.feed(3, None) == PeerLeft(3)
    assert parser.feed(9, None) == PeerLeft(9)  # a zero-vector peer we never heard of


@pytest.mark.parametrize(
    ("stream", "error", "fds_back"),
    [
        ([(1, None)], "unsupported protocol version 1", []),
        ([(0, 5)], "version message carries an fd", [5]),
        ([(0, None), (70000, None)], "out of range", []),
        ([(0, None), (1, 5)], "peer id message carries an fd", [5]),
        ([(0, None), (1, None), (-1, None)], "without its fd", []),
        ([(0, None), (1, None), (2, 5)], "expected the shared-memory message", [5]),
        ([(0, None), (1, None), (-1, 5), (-1, 6)], "a second shared-memory message", [6]),
        ([(0, None), (1, None), (-1, 5), (1, None)], "leave notice for ourselves", []),
        ([(0, None), (1, None), (-1, 5), (-7, 6)], "out of range", [6]),
    ],
)
def test_parser_rejects_broken_streams(
    stream: list[tuple[int, int | None]], error: str, fds_back: list[int]
) -> None:
    parser = ClientParser()
    with pytest.raises(ProtocolError, match=error) as info:
        for value, fd in stream:
            parser.feed(value, fd)
    assert info.value.fds == fds_back


def test_parser_bounds_vectors_per_peer() -> None:
    parser = ClientParser(max_vectors=1)
    for value, fd in [(0, None), (1, None), (-1, 5), (2, 6)]:
        parser.feed(value, fd)
    assert parser.feed(2, 7) is None
    assert parser.extra_fds == [7]
    strict = ClientParser(max_vectors=1, strict_vectors=True)
    for value, fd in [(0, None), (1, None), (-1, 5), (2, 6)]:
        strict.feed(value, fd)
    with pytest.raises(ProtocolError, match="more than 1 vectors"):
        strict.feed(2, 7)


#: One message of each kind, as the server sends it to peer 7.
EXAMPLE: dict[ServerMessage, tuple[int, int | None]] = {
    ServerMessage.VERSION: (0, None),
    ServerMessage.PEER_ID: (7, None),
    ServerMessage.SHM: (-1, 100),
    ServerMessage.PEER_VECTOR: (3, 101),
    ServerMessage.PEER_LEFT: (3, None),
}
#: Messages of one kind that a state reads, by their value, as a kind it takes.
READ_AS: dict[tuple[ClientState, ServerMessage], ServerMessage] = {
    (ClientState.AWAIT_PEER_ID, ServerMessage.VERSION): ServerMessage.PEER_ID,
    (ClientState.AWAIT_PEER_ID, ServerMessage.PEER_LEFT): ServerMessage.PEER_ID,
    (ClientState.JOINED, ServerMessage.VERSION): ServerMessage.PEER_LEFT,
}


def _paths() -> dict[ClientState, list[ServerMessage]]:
    """The shortest message path from the start to each state, through the table."""
    paths = {ClientState.AWAIT_VERSION: []}
    frontier = [ClientState.AWAIT_VERSION]
    while frontier:
        state = frontier.pop(0)
        for message, target in CLIENT_TRANSITIONS[state].items():
            if target not in paths:
                paths[target] = [*paths[state], message]
                frontier.append(target)
    return paths


def _parser_in(state: ClientState) -> ClientParser:
    parser = ClientParser()
    for message in _paths()[state]:
        parser.feed(*EXAMPLE[message])
    assert parser.state is state
    return parser


def test_the_client_state_table_is_walked_edge_by_edge() -> None:
    """Every state is reachable; each message a state takes leads where the table says;
    any other is refused and leaves the state as it was."""
    assert set(_paths()) == set(ClientState) == set(CLIENT_TRANSITIONS)
    walked = refused = 0
    for state in ClientState:
        for message in ServerMessage:
            parser = _parser_in(state)
            taken = READ_AS.get((state, message), message)
            if taken in CLIENT_TRANSITIONS[state]:
                parser.feed(*EXAMPLE[message])
                assert parser.state is CLIENT_TRANSITIONS[state][taken], (state, message)
                walked += 1
            else:
                with pytest.raises(ProtocolError):
                    parser.feed(*EXAMPLE[message])
                assert parser.state is state
                refused += 1
    assert walked == sum(map(len, CLIENT_TRANSITIONS.values())) + len(READ_AS)
    assert refused == len(ClientState) * len(ServerMessage) - walked
    assert CLIENT_TRANSITIONS[ClientState.JOINED].keys() == {
        ServerMessage.PEER_VECTOR,
        ServerMessage.PEER_LEFT,
    }  # once joined, the client stays joined


# -- a model of the whole system: registry + protocol + every client's view --------------


@dataclass
class World:
    """The daemon's registry driven by the pure protocol, with a parser per connected peer."""

    n_vectors: int
    alloc: IdAllocator = field(default_factory=IdAllocator)
    order: list[int] = field(default_factory=list)
    views: dict[int, ClientParser] = field(default_factory=dict)
    own: dict[int, int] = field(default_factory=dict)
    heard: dict[int, dict[int, list[str]]] = field(default_factory=dict)

    def deliver(self, outbox: list[Delivery[str]]) -> None:
        for recipient, messages, _announces in outbox:
            parser = self.views[recipient]
            for message in messages:
                fd = None if message.fd is None else hash(message.fd) & 0xFFFF
                event = parser.feed(message.value, fd)
                view = self.heard.setdefault(recipient, {})
                if isinstance(event, PeerVector):
                    if event.own:
                        self.own[recipient] = self.own.get(recipient, 0) + 1
                    else:
                        view.setdefault(event.peer_id, []).append(str(message.fd))
                elif isinstance(event, PeerLeft):
                    view.pop(event.peer_id, None)

    def join(self) -> int:
        peer_id = self.alloc.allocate(set(self.order))
        existing = [_vecs(p, self.n_vectors) for p in self.order]
        self.views[peer_id] = ClientParser()
        self.deliver(join_messages(_vecs(peer_id, self.n_vectors), existing, "shm"))
        self.order.append(peer_id)
        return peer_id

    def leave(self, index: int) -> None:
        peer_id = self.order.pop(index % len(self.order))
        del self.views[peer_id]
        self.heard.pop(peer_id, None)
        self.deliver(leave_messages(peer_id, self.order))

    def check(self) -> None:
        for peer_id in self.order:
            view = self.heard.get(peer_id, {})
            others = [p for p in self.order if p != peer_id]
            if self.n_vectors:
                assert sorted(view) == sorted(others)
                for other in others:
                    assert view[other] == [f"{other}.{i}" for i in range(self.n_vectors)]
            else:
                assert view == {}
            assert self.own.get(peer_id, 0) == self.n_vectors
            assert self.views[peer_id].peer_id == peer_id


@settings(max_examples=150, deadline=None)
@given(
    n_vectors=st.integers(0, 3),
    ops=st.lists(st.one_of(st.just(None), st.integers(0, 1000)), max_size=60),
)
def test_every_view_equals_the_registry(n_vectors: int, ops: list[int | None]) -> None:
    """Random joins (None) and leaves (index): each remaining peer's view == the registry."""
    world = World(n_vectors)
    for op in ops:
        if op is None or not world.order:
            world.join()
        else:
            world.leave(op)
        world.check()
    assert len(set(world.order)) == len(world.order)
