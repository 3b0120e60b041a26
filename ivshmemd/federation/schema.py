"""The daemon-to-daemon frames of a federation: frozen dataclasses, msgpack on the wire.

Every frame is one zmq message holding one msgpack array::

    [SCHEMA_VERSION, kind, seq, field, field, ...]

``kind`` is a :class:`Kind`; ``seq`` is the frame's place in its sender's ordered stream to
this receiver (see :mod:`ivshmemd.federation.membership`: a session hello has seq 0 and every
later frame of the session counts up from 1; frames sent outside a session carry 0). The
fields follow in the order the dataclass declares them.

Decoding is strict, because a member is another machine: :func:`decode_frame` accepts only
a frame of at most :data:`MAX_FRAME_BYTES` bytes, that is msgpack, an array, of our schema
version, of a known kind, with exactly that kind's fields, each of the exact type (a bool is
not an int) and within its range. Anything else raises :class:`FrameError` with a message
that says what was wrong; the caller logs it and drops the member that sent it.

Room left for what comes next:

- Kinds :data:`RESERVED_KINDS` (32..63) belong to part 2 of the federation, memory
  replication (:mod:`ivshmemd.federation.replica`): :class:`Diff` (32), :class:`After` (33)
  and :class:`RegionRequest` (34). A kind in the range this daemon does not know is refused
  with a message that says so, rather than as garbage.
- Every frame already carries its stream sequence number, rings included, so part 2 can
  order a ring after the memory diff it publishes (same stream, lower seq) without a new
  field. A new field for rings would be a new schema version.
- The limits: :data:`MAX_FRAME_BYTES` for every frame but a :class:`Diff`, which may fill a
  zmq message up to :data:`HARD_MAX_FRAME_BYTES` (a diff is cut into parts that fit,
  :data:`DIFF_PART_BYTES`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

import msgpack
import numpy as np

__all__ = [
    "DIFF_PART_BYTES",
    "HARD_MAX_FRAME_BYTES",
    "MAX_DEPS",
    "MAX_ENDPOINT_LEN",
    "MAX_FRAME_BYTES",
    "MAX_GOSSIP_ENTRIES",
    "MAX_IDENTITY_LEN",
    "MAX_REASON_LEN",
    "MAX_RING_COUNT",
    "RESERVED_KINDS",
    "SCHEMA_VERSION",
    "After",
    "Bye",
    "Diff",
    "Frame",
    "FrameError",
    "Gossip",
    "GossipEntry",
    "Hello",
    "HelloAck",
    "Kind",
    "PeerJoined",
    "PeerLeft",
    "Ping",
    "Pong",
    "Refuse",
    "RegionRequest",
    "Resync",
    "Ring",
    "Synced",
    "decode_frame",
    "decode_ring",
    "encode_frame",
    "encode_ring",
]

SCHEMA_VERSION: Final = 1
#: Frames above this are refused by :func:`decode_frame` (and the member dropped).
MAX_FRAME_BYTES: Final = 128 * 1024
#: libzmq drops a connection that sends a message above this (ZMQ_MAXMSGSIZE), unread.
HARD_MAX_FRAME_BYTES: Final = 1024 * 1024
MAX_IDENTITY_LEN: Final = 128
MAX_ENDPOINT_LEN: Final = 256
MAX_REASON_LEN: Final = 1024
MAX_GOSSIP_ENTRIES: Final = 256
#: A diff part's room for runs (data plus offsets and lengths), under the hard limit.
DIFF_PART_BYTES: Final = HARD_MAX_FRAME_BYTES - 16 * 1024
#: Members an :class:`After` (or a region transfer's vector) may name.
MAX_DEPS: Final = 256
#: The largest count an eventfd holds (2**64 - 2).
MAX_RING_COUNT: Final = 0xFFFFFFFFFFFFFFFE
MAX_SEQ: Final = 2**64 - 1
MAX_PEER_ID: Final = 0xFFFF
#: ivshmem's limit on vectors per peer (as ivshmemd.protocol.MAX_VECTORS).
MAX_VECTORS: Final = 64
MAX_SHM_SIZE: Final = 2**64 - 1
#: z85 text of a CURVE public key.
Z85_KEY_LEN: Final = 40

#: Frame kinds reserved for part 2 (memory replication).
RESERVED_KINDS: Final = range(32, 64)


class Kind(enum.IntEnum):
    """What a frame is (its second array element)."""

    HELLO = 1
    HELLO_ACK = 2
    REFUSE = 3
    GOSSIP = 4
    RESYNC = 5
    SYNCED = 6
    PEER_JOINED = 7
    PEER_LEFT = 8
    RING = 9
    PING = 10
    PONG = 11
    BYE = 12
    DIFF = 32
    AFTER = 33
    REGION_REQUEST = 34


class FrameError(ValueError):
    """A frame that is not a valid frame of this schema (the message says why)."""


# -- field checkers: each returns the value (tuples for arrays) or raises FrameError -------

Checker = Callable[[Any, str], Any]


def _uint(maximum: int) -> Checker:
    def check(value: Any, name: str) -> Any:
        if type(value) is not int or not 0 <= value <= maximum:
            raise FrameError(f"{name} must be an integer in 0..{maximum}, got {_show(value)}")
        return value

    return check


def _positive(maximum: int) -> Checker:
    def check(value: Any, name: str) -> Any:
        if type(value) is not int or not 1 <= value <= maximum:
            raise FrameError(f"{name} must be an integer in 1..{maximum}, got {_show(value)}")
        return value

    return check


def _text(max_len: int) -> Checker:
    def check(value: Any, name: str) -> Any:
        if type(value) is not str or len(value) > max_len:
            raise FrameError(
                f"{name} must be a string of at most {max_len} characters, got {_show(value)}"
            )
        return value

    return check


def _nonempty_text(max_len: int) -> Checker:
    text = _text(max_len)

    def check(value: Any, name: str) -> Any:
        if text(value, name) == "":
            raise FrameError(f"{name} must not be empty")
        return value

    return check


def _bool(value: Any, name: str) -> Any:
    if type(value) is not bool:
        raise FrameError(f"{name} must be a boolean, got {_show(value)}")
    return value


def _time(value: Any, name: str) -> Any:
    if type(value) is not float or not math.isfinite(value):
        raise FrameError(f"{name} must be a finite float, got {_show(value)}")
    return value


def _key(value: Any, name: str) -> Any:
    if type(value) is not str or len(value) not in (0, Z85_KEY_LEN):
        raise FrameError(
            f"{name} must be '' or a {Z85_KEY_LEN}-character z85 key, got {_show(value)}"
        )
    return value


def _id_range(value: Any, name: str) -> Any:
    if (
        type(value) is not tuple
        or len(value) != 2
        or any(type(v) is not int for v in value)
        or not 0 <= value[0] <= value[1] <= MAX_PEER_ID
    ):
        raise FrameError(
            f"{name} must be [lo, hi] with 0 <= lo <= hi <= {MAX_PEER_ID}, got {_show(value)}"
        )
    return value


def _gossip_entries(value: Any, name: str) -> Any:
    if type(value) is not tuple or len(value) > MAX_GOSSIP_ENTRIES:
        raise FrameError(
            f"{name} must be an array of at most {MAX_GOSSIP_ENTRIES} entries, got {_show(value)}"
        )
    entries = []
    for index, entry in enumerate(value):
        where = f"{name}[{index}]"
        if type(entry) is not tuple or len(entry) != 3:
            raise FrameError(f"{where} must be [identity, endpoint, key], got {_show(entry)}")
        identity = _nonempty_text(MAX_IDENTITY_LEN)(entry[0], f"{where}.identity")
        endpoint = _nonempty_text(MAX_ENDPOINT_LEN)(entry[1], f"{where}.endpoint")
        key = _key(entry[2], f"{where}.key")
        entries.append(GossipEntry(identity, endpoint, key))
    return tuple(entries)


def _blob(value: Any, name: str) -> Any:
    if type(value) is not bytes:
        raise FrameError(f"{name} must be bytes, got {_show(value)}")
    return value


def _deps(value: Any, name: str) -> Any:
    if type(value) is not tuple or len(value) > MAX_DEPS:
        raise FrameError(
            f"{name} must be an array of at most {MAX_DEPS} entries, got {_show(value)}"
        )
    for index, entry in enumerate(value):
        if type(entry) is not tuple or len(entry) != 2:
            raise FrameError(f"{name}[{index}] must be [identity, seq], got {_show(entry)}")
        _IDENTITY(entry[0], f"{name}[{index}].identity")
        _SEQ(entry[1], f"{name}[{index}].seq")
    return value


def _show(value: Any) -> str:
    """A short description of a bad value for an error message."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


_SEQ = _uint(MAX_SEQ)
_PEER = _uint(MAX_PEER_ID)
_VECTOR = _uint(MAX_VECTORS - 1)
_VECTORS = _uint(MAX_VECTORS)
_NONCE = _uint(2**64 - 1)
_IDENTITY = _nonempty_text(MAX_IDENTITY_LEN)
_ENDPOINT = _nonempty_text(MAX_ENDPOINT_LEN)
_REASON = _text(MAX_REASON_LEN)


# -- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GossipEntry:
    """One member as gossip describes it: who, where, and its CURVE public key ('' if none)."""

    identity: str
    endpoint: str
    key: str = ""


class _Frame:
    """Base of the frame classes: its kind and a checker per field, in wire order."""

    __slots__ = ()
    KIND: ClassVar[Kind]
    CHECKS: ClassVar[tuple[Checker, ...]]

    def wire_fields(self) -> list[Any]:
        """The field values in wire order (as msgpack packs them)."""
        return [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Hello(_Frame):
    """Who a daemon is and what fabric it serves; starts a session (``session`` >= 1) or
    just introduces the sender (a probe: ``session`` 0, answered by :class:`HelloAck` with
    ``nonce``). ``prev_session``/``prev_seq`` name the last session the sender ran to this
    receiver and its last seq (0, 0 if it has none or reset it): when the receiver holds
    exactly that, nothing was lost between them and it can reconcile without churn."""

    KIND: ClassVar[Kind] = Kind.HELLO
    identity: str
    incarnation: str
    endpoint: str
    id_range: tuple[int, int]
    shm_size: int
    vectors: int
    session: int
    nonce: int
    prev_session: int
    prev_seq: int

    def wire_fields(self) -> list[Any]:
        return [
            self.identity,
            self.incarnation,
            self.endpoint,
            list(self.id_range),
            self.shm_size,
            self.vectors,
            self.session,
            self.nonce,
            self.prev_session,
            self.prev_seq,
        ]


@dataclass(frozen=True, slots=True)
class HelloAck(_Frame):
    """Answers a probe hello (by its nonce): the prober may close its probe link."""

    KIND: ClassVar[Kind] = Kind.HELLO_ACK
    nonce: int


@dataclass(frozen=True, slots=True)
class Refuse(_Frame):
    """The sender will not federate with the receiver; ``reason`` names both values."""

    KIND: ClassVar[Kind] = Kind.REFUSE
    identity: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Gossip(_Frame):
    """Members the sender is connected to, so that naming one member is enough."""

    KIND: ClassVar[Kind] = Kind.GOSSIP
    members: tuple[GossipEntry, ...]

    def wire_fields(self) -> list[Any]:
        return [[[e.identity, e.endpoint, e.key] for e in self.members]]


@dataclass(frozen=True, slots=True)
class Resync(_Frame):
    """A request: the sender does not hold our stream (any more); start a new session."""

    KIND: ClassVar[Kind] = Kind.RESYNC
    reason: str


@dataclass(frozen=True, slots=True)
class Synced(_Frame):
    """The end of a session's opening snapshot (its gossip and peer-joined frames)."""

    KIND: ClassVar[Kind] = Kind.SYNCED


@dataclass(frozen=True, slots=True)
class PeerJoined(_Frame):
    """A peer of the sender joined (or, in a snapshot, is there)."""

    KIND: ClassVar[Kind] = Kind.PEER_JOINED
    peer_id: int
    vectors: int


@dataclass(frozen=True, slots=True)
class PeerLeft(_Frame):
    """A peer of the sender left; every ring it sent before leaving came earlier."""

    KIND: ClassVar[Kind] = Kind.PEER_LEFT
    peer_id: int


@dataclass(frozen=True, slots=True)
class Ring(_Frame):
    """``count`` doorbells (as an eventfd accumulated them) for the receiver's peer."""

    KIND: ClassVar[Kind] = Kind.RING
    peer_id: int
    vector: int
    count: int


@dataclass(frozen=True, slots=True)
class Ping(_Frame):
    """A heartbeat; ``sent_at`` is the sender's clock, echoed back for the round trip."""

    KIND: ClassVar[Kind] = Kind.PING
    sent_at: float


@dataclass(frozen=True, slots=True)
class Pong(_Frame):
    """The answer to a :class:`Ping`."""

    KIND: ClassVar[Kind] = Kind.PONG
    echo: float


@dataclass(frozen=True, slots=True)
class Bye(_Frame):
    """The sender is going away: for good (its peers leave now), or ``restarting`` in place
    (keep its peers for up to the timeout, it comes back with the same incarnation)."""

    KIND: ClassVar[Kind] = Kind.BYE
    restarting: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Diff(_Frame):
    """Part ``part`` of the sender's diff number ``diff_seq`` (its count of diffs so far),
    stamped with its Lamport ``clock``: byte runs of the region, ``offsets`` (little-endian
    uint64) and ``lengths`` (little-endian uint32) with ``data``, every run's bytes in order.
    Applied only once its ``last`` part is in (a sender that dies mid-diff leaves nothing
    half-applied). ``flags``: :data:`REGION` for a whole-region transfer (answering
    :class:`RegionRequest`, its ``vector`` then says whose diffs it includes) and
    :data:`NOT_HOLDER` for a sender that holds no region yet (an empty answer)."""

    KIND: ClassVar[Kind] = Kind.DIFF
    REGION: ClassVar[int] = 1
    NOT_HOLDER: ClassVar[int] = 2
    diff_seq: int
    clock: int
    flags: int
    part: int
    last: bool
    offsets: bytes
    lengths: bytes
    data: bytes
    vector: tuple[tuple[str, int], ...]

    def wire_fields(self) -> list[Any]:
        return [
            self.diff_seq,
            self.clock,
            self.flags,
            self.part,
            self.last,
            self.offsets,
            self.lengths,
            self.data,
            [list(entry) for entry in self.vector],
        ]


@dataclass(frozen=True, slots=True)
class After(_Frame):
    """What the sender's next rings depend on: for each named member, the number of its
    diffs the sender had applied. The receiver delivers them only once it has applied as
    many (release consistency, transitively: what a ring's sender saw, its target sees)."""

    KIND: ClassVar[Kind] = Kind.AFTER
    deps: tuple[tuple[str, int], ...]

    def wire_fields(self) -> list[Any]:
        return [[list(entry) for entry in self.deps]]


@dataclass(frozen=True, slots=True)
class RegionRequest(_Frame):
    """A request for the sender's whole region (a joining or rejoining daemon), answered by
    a region transfer (:class:`Diff` parts with :data:`Diff.REGION`)."""

    KIND: ClassVar[Kind] = Kind.REGION_REQUEST
    reason: str


Frame = (
    Hello
    | HelloAck
    | Refuse
    | Gossip
    | Resync
    | Synced
    | PeerJoined
    | PeerLeft
    | Ring
    | Ping
    | Pong
    | Bye
    | Diff
    | After
    | RegionRequest
)

Hello.CHECKS = (
    _IDENTITY,
    _nonempty_text(64),
    _ENDPOINT,
    _id_range,
    _uint(MAX_SHM_SIZE),
    _VECTORS,
    _SEQ,
    _NONCE,
    _SEQ,
    _SEQ,
)
HelloAck.CHECKS = (_NONCE,)
Refuse.CHECKS = (_IDENTITY, _nonempty_text(64), _REASON)
Gossip.CHECKS = (_gossip_entries,)
Resync.CHECKS = (_REASON,)
Synced.CHECKS = ()
PeerJoined.CHECKS = (_PEER, _VECTORS)
PeerLeft.CHECKS = (_PEER,)
Ring.CHECKS = (_PEER, _VECTOR, _positive(MAX_RING_COUNT))
Ping.CHECKS = (_time,)
Pong.CHECKS = (_time,)
Bye.CHECKS = (_bool, _REASON)
Diff.CHECKS = (
    _SEQ,
    _SEQ,
    _uint(Diff.REGION | Diff.NOT_HOLDER),
    _uint(2**32 - 1),
    _bool,
    _blob,
    _blob,
    _blob,
    _deps,
)
After.CHECKS = (_deps,)
RegionRequest.CHECKS = (_REASON,)

_CLASSES: tuple[type[_Frame], ...] = (
    Hello,
    HelloAck,
    Refuse,
    Gossip,
    Resync,
    Synced,
    PeerJoined,
    PeerLeft,
    Ring,
    Ping,
    Pong,
    Bye,
    Diff,
    After,
    RegionRequest,
)
_BY_KIND: dict[int, tuple[type[_Frame], tuple[str, ...]]] = {
    cls.KIND: (cls, tuple(f.name for f in fields(cls)))  # type: ignore[arg-type]
    for cls in _CLASSES
}

_packer = msgpack.Packer(use_bin_type=True)


def encode_frame(frame: Frame, seq: int) -> bytes:
    """The wire bytes of ``frame`` at stream position ``seq``."""
    packed: bytes = _packer.pack([SCHEMA_VERSION, frame.KIND, seq, *frame.wire_fields()])
    return packed


def encode_ring(seq: int, peer_id: int, vector: int, count: int) -> bytes:
    """The wire bytes of a :class:`Ring` (the per-doorbell path: no object made)."""
    packed: bytes = _packer.pack((SCHEMA_VERSION, Kind.RING, seq, peer_id, vector, count))
    return packed


_RING_HEAD: Final = bytes((0x96, SCHEMA_VERSION, Kind.RING))  # a 6-element msgpack array
_unpackb = msgpack.unpackb
_DIFF_HEAD: Final = bytes((SCHEMA_VERSION, Kind.DIFF))


def decode_ring(raw: bytes) -> tuple[int, int, int, int] | None:
    """``(seq, peer_id, vector, count)`` if ``raw`` is a valid :class:`Ring` frame; None if
    it is not a ring at all (decode it with :func:`decode_frame`); :class:`FrameError` if it
    is a bad ring. The per-doorbell path: no object made, the checks of :class:`Ring`."""
    if raw[:3] != _RING_HEAD:
        return None
    try:
        _version, _kind, seq, peer_id, vector, count = _unpackb(raw, use_list=False)
    except Exception:
        decode_frame(raw)  # raises the precise FrameError
        raise AssertionError("decode_frame accepted what unpackb refused") from None
    if (
        type(seq) is int
        and type(peer_id) is int
        and type(vector) is int
        and type(count) is int
        and 0 <= seq <= MAX_SEQ
        and 0 <= peer_id <= MAX_PEER_ID
        and 0 <= vector < MAX_VECTORS
        and 1 <= count <= MAX_RING_COUNT
    ):
        return seq, peer_id, vector, count
    decode_frame(raw)  # raises the precise FrameError
    raise AssertionError(f"decode_frame accepted a ring decode_ring refused: {raw!r}")


def decode_frame(raw: bytes) -> tuple[int, Frame]:
    """``(seq, frame)`` from wire bytes; :class:`FrameError` if they are not a valid frame."""
    if len(raw) > MAX_FRAME_BYTES and not (
        len(raw) <= HARD_MAX_FRAME_BYTES and raw[1:3] == _DIFF_HEAD
    ):
        raise FrameError(f"frame of {len(raw)} bytes is over the limit of {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(raw, raw=False, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, ...)
        raise FrameError(f"frame is not valid msgpack: {exc}") from None
    if type(obj) is not tuple or len(obj) < 3:
        raise FrameError(
            f"frame must be a msgpack array [version, kind, seq, ...], got {_show(obj)}"
        )
    version, kind, seq = obj[0], obj[1], obj[2]
    if version != SCHEMA_VERSION or type(version) is not int:
        raise FrameError(
            f"unsupported schema version {_show(version)} "
            f"(this daemon speaks version {SCHEMA_VERSION})"
        )
    entry = _BY_KIND.get(kind) if type(kind) is int else None
    if entry is None:
        if type(kind) is int and kind in RESERVED_KINDS:
            raise FrameError(
                f"frame kind {kind} is reserved for memory replication, "
                "which this daemon does not support"
            )
        raise FrameError(f"unknown frame kind {_show(kind)}")
    cls, names = entry
    name = cls.KIND.name
    _SEQ(seq, f"{name}.seq")
    values = obj[3:]
    if len(values) != len(names):
        raise FrameError(
            f"{name} frame has {len(values)} fields, expected {len(names)} "
            f"({', '.join(names) or 'none'})"
        )
    checked = [
        check(value, f"{name}.{field}")
        for check, value, field in zip(cls.CHECKS, values, names, strict=True)
    ]
    if cls is Hello and (checked[6] == 0) != (checked[7] != 0):
        raise FrameError(
            "HELLO frame: a probe (session 0) needs a nonce and a session hello must have none"
        )
    if cls is Diff:
        _check_runs(checked)
    frame: Frame = cls(*checked)  # type: ignore[assignment]
    return seq, frame


def _check_runs(fields: list[Any]) -> None:
    offsets, lengths, data = fields[5], fields[6], fields[7]
    if len(offsets) % 8 or len(lengths) % 4 or len(offsets) // 8 != len(lengths) // 4:
        raise FrameError(
            f"DIFF frame: {len(offsets)} bytes of offsets and {len(lengths)} bytes of lengths "
            "are not the same number of uint64 and uint32"
        )
    total = int(np.frombuffer(lengths, dtype="<u4").sum(dtype=np.uint64))
    if total != len(data):
        raise FrameError(f"DIFF frame: its runs cover {total} bytes but it carries {len(data)}")
