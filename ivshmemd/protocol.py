"""The ivshmem-server protocol as pure data and functions (sans-I/O).

Server side: :func:`join_messages` and :func:`leave_messages` turn registry events into the
ordered list of :class:`Delivery` runs each recipient must receive, exactly as QEMU's
ivshmem-server orders them (docs/ivshmem-protocol.md). A run that is the announcement of a
peer's vectors says whose (:attr:`Delivery.announces`), so that a queue can withdraw it if
that peer leaves before it was sent (:mod:`ivshmemd.outbox`). They are generic over the fd
*handle* type, so the same code serves the daemon (handles are reference-counted eventfds)
and the tests (handles are labels).

Client side: :class:`ClientParser` consumes ``(value, fd)`` messages strictly and turns them
into events (:class:`Welcome`, :class:`PeerVector`, :class:`PeerLeft`) by an explicit state
machine (:class:`ClientState`, :data:`CLIENT_TRANSITIONS`), raising
:class:`ProtocolError` for anything QEMU's device would reject. It owns no fds: every fd it is
handed ends up in an event or in the error's ``fds`` list, so the caller can close it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeAlias, TypeVar

__all__ = [
    "CLIENT_TRANSITIONS",
    "DEFAULT_SOCKET",
    "MAX_PEER_ID",
    "MAX_VECTORS",
    "PROTOCOL_VERSION",
    "SHM_MESSAGE_VALUE",
    "ClientParser",
    "ClientState",
    "Delivery",
    "Message",
    "PeerLeft",
    "PeerVector",
    "PeerVectors",
    "ProtocolError",
    "ServerMessage",
    "Welcome",
    "join_messages",
    "leave_messages",
]

#: Where a server listens unless told otherwise (QEMU's ivshmem-server default).
DEFAULT_SOCKET = "/tmp/ivshmem_socket"
PROTOCOL_VERSION = 0
SHM_MESSAGE_VALUE = -1
MAX_PEER_ID = 0xFFFF
MAX_VECTORS = 64

H = TypeVar("H")


@dataclass(frozen=True, slots=True)
class Message(Generic[H]):
    """One 8-byte message: a value and at most one fd handle."""

    value: int
    fd: H | None = None


@dataclass(frozen=True, slots=True)
class PeerVectors(Generic[H]):
    """A peer as the protocol sees it: its id and its receive vectors (one fd handle each).

    ``announcement`` is the message run that tells others about it (one message per vector,
    in order), built once: every later join repeats it to the newcomer.
    """

    peer_id: int
    vectors: tuple[H, ...]
    announcement: tuple[Message[H], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        run = tuple(Message(self.peer_id, fd) for fd in self.vectors)
        object.__setattr__(self, "announcement", run)


#: ``(recipient, messages, announces)``: messages for one recipient, in order; ``announces``
#: is the peer whose vectors they are when the run is that peer's announcement (one message
#: per vector), else None. (A plain tuple: joins build thousands of them.)
Delivery: TypeAlias = tuple[int, Sequence[Message[H]], int | None]
Deliveries: TypeAlias = list[Delivery[H]]

_VERSION: Message[Any] = Message(PROTOCOL_VERSION)


def join_messages(
    newcomer: PeerVectors[H], existing: Iterable[PeerVectors[H]], shm: H
) -> Deliveries[H]:
    """Messages for a join, in QEMU's send order.

    The newcomer gets the version, its id and the shm fd; then every existing peer gets one
    message per vector of the newcomer (a join notice; none at all with zero vectors); then
    the newcomer gets every existing peer's vectors in connection order, and finally its
    own. The newcomer appears several times: the notices go out before it can learn of (and
    ring) anyone, so an existing peer hears of a newcomer before the newcomer can ring it.
    """
    existing = list(existing)
    p = newcomer.peer_id
    notice = newcomer.announcement
    out: Deliveries[H] = [(p, (_VERSION, Message(p), Message(SHM_MESSAGE_VALUE, shm)), None)]
    if notice:
        out.extend([(peer.peer_id, notice, p) for peer in existing])
        out.extend([(p, peer.announcement, peer.peer_id) for peer in existing])
        out.append((p, notice, p))
    return out


def leave_messages(leaver_id: int, remaining_ids: Iterable[int]) -> Deliveries[H]:
    """Messages for a leave: every remaining peer (never the leaver) gets ``leaver_id``."""
    leave: tuple[Message[H], ...] = (Message(leaver_id),)
    return [(rid, leave, None) for rid in remaining_ids if rid != leaver_id]


class ProtocolError(Exception):
    """The server's stream broke the protocol. ``fds`` are the fds the caller must close."""

    def __init__(self, message: str, fds: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.fds = list(fds)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The handshake is done: our id and the shared-memory fd (owned by the receiver)."""

    peer_id: int
    shm_fd: int


@dataclass(frozen=True, slots=True)
class PeerVector:
    """The ``index``-th vector (eventfd) of ``peer_id``; ``own`` when it is our own."""

    peer_id: int
    index: int
    fd: int
    own: bool


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """``peer_id`` left: its vectors are gone."""

    peer_id: int


ClientEvent = Welcome | PeerVector | PeerLeft


class ClientState(enum.Enum):
    """Where a client stands in the server's stream (:data:`CLIENT_TRANSITIONS`)."""

    AWAIT_VERSION = "awaiting the protocol version"
    AWAIT_PEER_ID = "awaiting our peer id"
    AWAIT_SHM = "awaiting the shared memory"
    JOINED = "joined"


class ServerMessage(enum.Enum):
    """What a message from the server is, once its state has judged it."""

    VERSION = "the protocol version"
    PEER_ID = "our peer id"
    SHM = "the shared-memory fd"
    PEER_VECTOR = "a peer's vector"
    PEER_LEFT = "a peer's leave"


#: The client's state machine: in each state, the messages it takes and the state each one
#: leads to (as h11's ``_state.py`` keeps its transitions). A message that is none of those
#: of its state is a :class:`ProtocolError`. Once joined, the client stays joined.
CLIENT_TRANSITIONS: Final[Mapping[ClientState, Mapping[ServerMessage, ClientState]]] = {
    ClientState.AWAIT_VERSION: {ServerMessage.VERSION: ClientState.AWAIT_PEER_ID},
    ClientState.AWAIT_PEER_ID: {ServerMessage.PEER_ID: ClientState.AWAIT_SHM},
    ClientState.AWAIT_SHM: {ServerMessage.SHM: ClientState.JOINED},
    ClientState.JOINED: {
        ServerMessage.PEER_VECTOR: ClientState.JOINED,
        ServerMessage.PEER_LEFT: ClientState.JOINED,
    },
}

_Step: TypeAlias = tuple[ServerMessage, "ClientEvent | None"]


@dataclass
class ClientParser:
    """Strict client-side state machine for the server's stream (:data:`CLIENT_TRANSITIONS`).

    Feed it one decoded message at a time with :meth:`feed`. ``max_vectors`` bounds the fds
    accepted per peer (QEMU closes the extra ones with a warning; here they are an error when
    ``strict_vectors`` is set, else handed back in :attr:`extra_fds` for the caller to close).
    """

    max_vectors: int = MAX_VECTORS
    strict_vectors: bool = False
    state: ClientState = ClientState.AWAIT_VERSION
    peer_id: int | None = None
    vector_counts: dict[int, int] = field(default_factory=dict)
    extra_fds: list[int] = field(default_factory=list)

    def feed(self, value: int, fd: int | None) -> ClientEvent | None:
        """Consume one message; return the event it completes, if any."""
        state = self.state
        message, event = _STEPS[state](self, value, fd)
        self.state = CLIENT_TRANSITIONS[state][message]
        return event

    # One step per state: judge the message (raising ProtocolError), say what it is.

    def _version(self, value: int, fd: int | None) -> _Step:
        if fd is not None:
            raise ProtocolError("protocol version message carries an fd", [fd])
        if value != PROTOCOL_VERSION:
            raise ProtocolError(
                f"unsupported protocol version {value} (expected {PROTOCOL_VERSION})"
            )
        return ServerMessage.VERSION, None

    def _peer_id(self, value: int, fd: int | None) -> _Step:
        if fd is not None:
            raise ProtocolError("peer id message carries an fd", [fd])
        if not 0 <= value <= MAX_PEER_ID:
            raise ProtocolError(f"peer id {value} out of range 0..{MAX_PEER_ID}")
        self.peer_id = value
        return ServerMessage.PEER_ID, None

    def _shm(self, value: int, fd: int | None) -> _Step:
        if value != SHM_MESSAGE_VALUE:
            fds = [] if fd is None else [fd]
            raise ProtocolError(f"expected the shared-memory message (-1), got {value}", fds)
        if fd is None:
            raise ProtocolError("shared-memory message without its fd")
        assert self.peer_id is not None  # AWAIT_PEER_ID set it
        return ServerMessage.SHM, Welcome(self.peer_id, fd)

    def _joined(self, value: int, fd: int | None) -> _Step:
        fds = [] if fd is None else [fd]
        if value == SHM_MESSAGE_VALUE:
            raise ProtocolError("a second shared-memory message", fds)
        if not 0 <= value <= MAX_PEER_ID:
            raise ProtocolError(f"peer id {value} out of range 0..{MAX_PEER_ID}", fds)
        if fd is None:
            if value == self.peer_id:
                raise ProtocolError(f"leave notice for ourselves (peer {value})")
            # With zero vectors a join is never announced but its leave still is, so a leave
            # for a peer we hold no vectors of is normal.
            self.vector_counts.pop(value, None)
            return ServerMessage.PEER_LEFT, PeerLeft(value)
        index = self.vector_counts.get(value, 0)
        if index >= self.max_vectors:
            if self.strict_vectors:
                raise ProtocolError(f"peer {value} sent more than {self.max_vectors} vectors", fds)
            self.extra_fds.append(fd)
            return ServerMessage.PEER_VECTOR, None
        self.vector_counts[value] = index + 1
        return ServerMessage.PEER_VECTOR, PeerVector(value, index, fd, value == self.peer_id)


_STEPS: Final[Mapping[ClientState, Callable[[ClientParser, int, int | None], _Step]]] = {
    ClientState.AWAIT_VERSION: ClientParser._version,
    ClientState.AWAIT_PEER_ID: ClientParser._peer_id,
    ClientState.AWAIT_SHM: ClientParser._shm,
    ClientState.JOINED: ClientParser._joined,
}
