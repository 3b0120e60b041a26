"""Federation membership as a sans-I/O state machine: who the members are, and one ordered,
loss-detecting stream to each of them.

:class:`Membership` owns no socket and no clock. Its driver hands it events (a received
frame, a local peer joining or leaving, the time passing) and gets back a list of
:data:`Action` values to carry out: open or close a link, send bytes on a link, discard a
link's unsent frames, register or unregister a remote peer, deliver a ring, report an event.
Everything here can be tested by passing frames between instances in memory.

**Links.** Every frame a daemon sends goes over a *link* it dialled (a zmq DEALER) and
arrives on the receiver's one listening socket (a ROUTER), tagged with the link's routing
id. A daemon has one *member link* per member, carrying the *session* stream below, and
short-lived *probe links* to endpoints it has been told about (``--federation-peer``, or
gossip) but whose daemon it does not know yet. A probe link only ever carries a probe hello;
the daemon behind it answers on its own member link, and the probe is closed.

**Sessions.** A daemon's stream to one member is a *session*: a hello (seq 0), the opening
snapshot (gossip, one peer-joined per local peer, synced), then everything that happens, in
order, with consecutive sequence numbers. The receiver checks every number: a gap means
frames were lost (a connection reset), so it forgets the sender's peers (announcing them as
left) and asks for a new session (resync). A new session whose hello names exactly the
previous session and its last seq, as the receiver holds them, lost nothing: the receiver
*reconciles* (the snapshot confirms the peers it knows; only real differences are
announced). Otherwise the sender's peers are announced as left and then joined again.

**Membership.** A hello says who a daemon is (identity, incarnation, endpoint) and what it
serves (id range, shm size, vector count). Hellos are checked both ways: an overlapping id
range (with us or with another member) or a different size or vector count is refused on
both sides, with a log line naming both values and a refuse frame to the other side.
Members gossip the members they are connected to, so naming one member is enough. A new
incarnation of a member is a restart: its old peers leave, its new ones join.

**Failure.** Members ping each other every ``heartbeat`` seconds and keep the round-trip
time. A member whose pongs stop for ``timeout`` seconds is *dead*: its peers are announced
as left, and every ``timeout`` seconds it is knocked on (a fresh session and a resync) so
that it rejoins, with its peers announced again, as soon as it answers. A member that sends
a bad frame or breaks the protocol is *dropped* (its peers leave; it is ignored until a new
incarnation says hello). A link whose unsent frames exceed the driver's bound makes its
member dead (:meth:`Membership.link_overflow`), never the daemon stall.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .schema import (
    After,
    Bye,
    Diff,
    Frame,
    FrameError,
    Gossip,
    GossipEntry,
    Hello,
    HelloAck,
    PeerJoined,
    PeerLeft,
    Ping,
    Pong,
    Refuse,
    RegionRequest,
    Resync,
    Ring,
    Synced,
    decode_frame,
    decode_ring,
    encode_frame,
    encode_ring,
)
from .throttle import Throttle

__all__ = [
    "DEFAULT_TIMEOUT",
    "Action",
    "Close",
    "Deliver",
    "Dial",
    "LocalMember",
    "Member",
    "MemberEvent",
    "MemberState",
    "Membership",
    "Memory",
    "RemoteJoined",
    "RemoteLeft",
    "Reset",
    "Send",
    "Stream",
    "incompatibility",
]

log = logging.getLogger(__name__)

#: A member silent for this long (seconds) is dead (``--federation-timeout``).
DEFAULT_TIMEOUT: Final = 3.0
#: Pings per timeout period.
PINGS_PER_TIMEOUT: Final = 5
#: A probe found by gossip is given up after this many timeouts unanswered (seeds never are).
PROBE_GIVE_UP_TIMEOUTS: Final = 20

#: Probes found by gossip are bounded (a member cannot make us dial without end).
MAX_PROBES_PER_MEMBER: Final = 2
PROBE_PREFIX: Final = b"P"
MEMBER_PREFIX: Final = b"M"


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    """Open link ``link``: a DEALER with ``routing_id`` connected to ``endpoint`` (CURVE with
    ``server_key`` if not empty). It reconnects by itself."""

    link: int
    endpoint: str
    server_key: str
    routing_id: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close link ``link`` (its unsent frames are dropped)."""

    link: int


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` (one encoded frame) on link ``link``, after everything sent before."""

    link: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Reset:
    """Discard the frames of link ``link`` not yet handed to zmq."""

    link: int


@dataclass(frozen=True, slots=True)
class RemoteJoined:
    """``member``'s peer ``peer_id`` joined: register it and announce it to local peers."""

    member: str
    peer_id: int
    vectors: int


@dataclass(frozen=True, slots=True)
class RemoteLeft:
    """``member``'s peer ``peer_id`` left: unregister it and announce its leave."""

    member: str
    peer_id: int


@dataclass(frozen=True, slots=True)
class Deliver:
    """Write ``count`` into local peer ``peer_id``'s eventfd for ``vector`` (rung from
    ``member``'s host)."""

    peer_id: int
    vector: int
    count: int
    member: str = ""


@dataclass(frozen=True, slots=True)
class Memory:
    """A memory-replication frame from ``member`` (a diff part, an after, a region request),
    in its stream's order with the rings around it (see :mod:`.replica`)."""

    member: str
    frame: Diff | After | RegionRequest


@dataclass(frozen=True, slots=True)
class Stream:
    """``member``'s stream to us started (``up``; ``intact`` if nothing was lost since the
    previous one) or stopped (not ``up``: dead, left, restarted, broken, refused)."""

    member: str
    up: bool
    intact: bool = False


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """For the event stream: ``kind`` is member-joined, member-left or member-refused."""

    kind: str
    info: dict[str, Any]


Action = (
    Dial
    | Close
    | Send
    | Reset
    | RemoteJoined
    | RemoteLeft
    | Deliver
    | MemberEvent
    | Memory
    | Stream
)


# -- state -----------------------------------------------------------------------------------


class MemberState(enum.StrEnum):
    """Where a member stands (shown by ``ivshmemctl status``)."""

    #: it said hello; its session to us has not started yet
    CONNECTING = "connecting"
    #: its session to us runs and it answers pings
    UP = "up"
    #: it said it restarts in place; its peers are kept for up to the timeout
    RESTARTING = "restarting"
    #: silent past the timeout; its peers were announced as left; knocked on until it answers
    DEAD = "dead"
    #: it said bye (shut down); knocked on like a dead member, it rejoins when it is back
    LEFT = "left"
    #: incompatible (ranges, size, vectors): no session in either direction
    REFUSED = "refused"
    #: it broke the protocol; ignored until a new incarnation says hello
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class LocalMember:
    """This daemon as its hello describes it."""

    identity: str
    incarnation: str
    endpoint: str
    id_range: tuple[int, int]
    shm_size: int
    vectors: int


@dataclass(eq=False)
class Member:
    """Another daemon of the federation, and our two streams with it."""

    identity: str
    endpoint: str
    key: str
    incarnation: str
    id_range: tuple[int, int]
    shm_size: int
    vectors: int
    state: MemberState = MemberState.CONNECTING
    reason: str | None = None
    #: our member link to it (None until dialled)
    link: int | None = None
    #: the routing id of its member link to us (frames from anything else are not its stream)
    origin: bytes | None = None
    # its stream to us
    in_session: int = 0
    in_expected: int = 0
    peers: dict[int, int] = field(default_factory=dict)
    unconfirmed: set[int] | None = None
    # our stream to it
    out_open: bool = False
    out_session: int = 0
    out_seq: int = 0
    out_started: float = -1e18
    resync_pending: bool = False
    #: its session to us has been up in this incarnation (a later lack of one is a break)
    has_been_up: bool = False
    #: after a break, a second resync request went out (the next step is a knock)
    asked_again: bool = False
    # liveness
    last_heard: float | None = None
    last_pong: float = 0.0
    #: when a memory diff part last came from it (a member busy sending data is alive)
    last_data: float | None = None
    #: we sent it diff parts since the last tick; when we last did (at a tick)
    data_out: bool = False
    last_data_out: float | None = None
    rtt: float | None = None
    next_ping: float = 0.0
    next_knock: float = 0.0
    resync_asked: float = -1e18

    def info(self) -> dict[str, Any]:
        """The member for events and status."""
        return {
            "member": self.identity,
            "endpoint": self.endpoint,
            "incarnation": self.incarnation,
            "id_range": list(self.id_range),
            "state": str(self.state),
        }


@dataclass(eq=False)
class _Probe:
    link: int
    endpoint: str
    key: str
    nonce: int
    seed: bool
    started: float
    next_send: float


def incompatibility(
    local: LocalMember, hello: Hello, others: Iterable[tuple[str, tuple[int, int]]] = ()
) -> tuple[str, str] | None:
    """``(code, reason)`` if the daemon that sent ``hello`` cannot join us, else None.

    ``others`` are the members already in the federation (identity, id range): a newcomer
    must not overlap them either. Each reason names both values.
    """
    them, us = hello.identity, local.identity
    if hello.shm_size != local.shm_size:
        return "shm-size", (
            f"shm size differs: {them} has {hello.shm_size} bytes, {us} has {local.shm_size} bytes"
        )
    if hello.vectors != local.vectors:
        return "vectors", (
            f"vector count differs: {them} has {hello.vectors}, {us} has {local.vectors}"
        )
    lo, hi = hello.id_range
    for name, (olo, ohi) in ((us, local.id_range), *others):
        if lo <= ohi and olo <= hi:
            return "id-range", (
                f"peer id ranges overlap: {them} has {lo}-{hi}, {name} has {olo}-{ohi}"
            )
    return None


def _routing_id(prefix: bytes, *parts: str) -> bytes:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=15).digest()
    return prefix + digest


_CONTROL_FRAMES = (HelloAck, Resync, Ping, Pong, Bye)
_MEMORY_FRAMES = (Diff, After, RegionRequest)


class Membership:
    """The federation state of one daemon (see the module docstring).

    ``seeds`` are the endpoints to probe at start (``--federation-peer``). ``own_key`` is our
    CURVE public key ('' without CURVE); ``probe_keys`` the public keys a probe tries when it
    does not know the key of the daemon behind an endpoint (the allow directory).
    ``endpoint_policy`` returns why an endpoint learned from the network may not be dialled
    (None if it may). ``rng`` makes nonces reproducible in tests. ``memory``: this daemon
    replicates the shared memory (a member that sends memory frames to one that does not is
    dropped, with a reason naming the setting).
    """

    def __init__(
        self,
        local: LocalMember,
        *,
        seeds: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float | None = None,
        own_key: str = "",
        probe_keys: Sequence[str] = (),
        endpoint_policy: Callable[[str], str | None] | None = None,
        max_members: int = 64,
        rng: random.Random | None = None,
        memory: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.local = local
        self.seeds = tuple(seeds)
        self.timeout = timeout
        self.heartbeat = heartbeat if heartbeat is not None else timeout / PINGS_PER_TIMEOUT
        self.own_key = own_key
        self.probe_keys = tuple(k for k in probe_keys if k != own_key)
        self.endpoint_policy = endpoint_policy or (lambda endpoint: None)
        self.max_members = max_members
        self.memory = memory
        self.members: dict[str, Member] = {}
        self.local_peers: dict[int, int] = {}
        #: identities that refused us, and why (for status)
        self.refused_by: dict[str, str] = {}
        self.routing_id = _routing_id(MEMBER_PREFIX, local.identity, local.incarnation)
        self._rng = rng or random.Random()
        self._origins: dict[bytes, str] = {}
        self._links_used = 0
        self._probes: dict[int, _Probe] = {}
        self._throttle = Throttle()
        self._actions: list[Action] = []

    # -- driver entry points ---------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Probe the seeds."""
        for endpoint in self.seeds:
            if endpoint != self.local.endpoint:
                self._probe(endpoint, "", now, seed=True)
        return self._take()

    def tick(self, now: float) -> list[Action]:
        """Heartbeats, timeouts, knocks on dead members, probe retries."""
        for member in list(self.members.values()):
            if member.data_out:
                member.data_out, member.last_data_out = False, now
            state = member.state
            if state in (MemberState.UP, MemberState.RESTARTING):
                if not self._alive(member, now):
                    heard = member.last_heard
                    silent = "never heard" if heard is None else f"silent for {now - heard:.1f} s"
                    self._declare_dead(member, now, f"{silent} (timeout {self.timeout:g} s)")
                    continue
                if state is MemberState.UP and member.out_open and now >= member.next_ping:
                    self._send(member, Ping(float(now)))
                    member.next_ping = now + self.heartbeat
                if member.resync_pending and now - member.out_started >= self.heartbeat:
                    self._start_session(member, now)
            elif state in (MemberState.DEAD, MemberState.LEFT) and now >= member.next_knock:
                self._knock(member, now)
            elif state is MemberState.CONNECTING and now >= member.next_knock:
                if member.has_been_up and not member.asked_again:
                    # its stream to us broke and our resync went unanswered: ask once more,
                    # without resetting our own stream (if that broke too, the seq of this
                    # request tells it so)
                    member.next_knock = now + self.timeout
                    member.asked_again = True
                    member.resync_asked = now
                    self._send(member, Resync("still waiting for your new session"))
                else:
                    # no session from it: our hello (or its) was lost, or it restarted
                    member.asked_again = False
                    self._knock(member, now)
            elif (
                state is MemberState.CONNECTING
                and member.resync_pending
                and now - member.out_started >= self.heartbeat
            ):
                self._start_session(member, now)
        for probe in list(self._probes.values()):
            if not probe.seed and now - probe.started > PROBE_GIVE_UP_TIMEOUTS * self.timeout:
                log.info("federation: no daemon answered at %s; giving up", probe.endpoint)
                self._close_probe(probe)
            elif now >= probe.next_send:
                self._actions.append(Reset(probe.link))
                self._send_probe_hello(probe)
                probe.next_send = now + self.timeout
        return self._take()

    def _alive(self, member: Member, now: float) -> bool:
        """A member is alive while its pongs come. During a data transfer a pong can wait
        behind megabytes of diffs in either direction, so a member also counts as alive
        while its diff parts keep arriving (its pongs queue behind them), or while it is
        heard from and we keep sending it diffs (our pings queue behind them). An idle link
        is judged by pongs alone: a one-way cut is seen at once."""
        timeout = self.timeout
        if now - member.last_pong <= timeout:
            return True
        if member.last_data is not None and now - member.last_data <= timeout:
            return True
        heard, sent = member.last_heard, member.last_data_out
        return (
            heard is not None
            and sent is not None
            and now - heard <= timeout
            and now - sent <= timeout
        )

    def receive(self, now: float, origin: bytes, raw: bytes, key: str = "") -> list[Action]:
        """A message that arrived on our listening socket from routing id ``origin``; ``key``
        is the sender's CURVE public key ('' without CURVE)."""
        try:
            ring = decode_ring(raw)
            if ring is not None:
                return self._receive_ring(now, origin, *ring)
            seq, frame = decode_frame(raw)
        except FrameError as exc:
            self._bad_frame(now, origin, str(exc))
            return self._take()
        return self.receive_frame(now, origin, seq, frame, key)

    def receive_frame(
        self, now: float, origin: bytes, seq: int, frame: Frame, key: str = ""
    ) -> list[Action]:
        """:meth:`receive` after decoding."""
        if isinstance(frame, Hello):
            self._on_hello(now, origin, frame, key)
            return self._take()
        if isinstance(frame, Refuse):
            self._on_refuse(now, frame)
            return self._take()
        identity = self._origins.get(origin)
        member = self.members.get(identity) if identity is not None else None
        if member is None or member.origin != origin:
            if self._throttle.allow(("unknown", origin), now):
                log.warning(
                    "federation: %s frame from an unknown connection %s ignored",
                    frame.KIND.name,
                    origin.hex(),
                )
            return self._take()
        if member.state in (MemberState.DROPPED, MemberState.REFUSED, MemberState.LEFT):
            return self._take()
        member.last_heard = now
        if member.in_session:
            if seq == member.in_expected:
                member.in_expected += 1
                self._dispatch(member, now, frame)
                return self._take()
            self._break_stream(
                member,
                now,
                f"frame {seq} arrived where {member.in_expected} was expected (frames were lost)",
            )
        if isinstance(frame, _CONTROL_FRAMES):
            self._dispatch(member, now, frame)
        else:
            self._ask_resync(member, now, "no session from you")
        return self._take()

    def _receive_ring(
        self, now: float, origin: bytes, seq: int, peer_id: int, vector: int, count: int
    ) -> list[Action]:
        """The per-doorbell path of :meth:`receive` (same rules, fewer steps)."""
        identity = self._origins.get(origin)
        member = self.members.get(identity) if identity is not None else None
        if (
            member is None
            or member.origin != origin
            or not member.in_session
            or seq != member.in_expected
            or member.state is not MemberState.UP
        ):
            return self.receive_frame(now, origin, seq, Ring(peer_id, vector, count))
        member.last_heard = now
        member.in_expected = seq + 1
        lo, hi = self.local.id_range
        if lo <= peer_id <= hi and vector < self.local.vectors:
            return [Deliver(peer_id, vector, count, member.identity)]
        self._on_ring(member, Ring(peer_id, vector, count))
        return self._take()

    def receive_malformed(self, now: float, origin: bytes, problem: str) -> list[Action]:
        """A message from ``origin`` that is not even one frame (the driver says why)."""
        self._bad_frame(now, origin, problem)
        return self._take()

    def local_peer_joined(self, peer_id: int, vectors: int) -> list[Action]:
        """A local peer joined: every member's stream says so."""
        if peer_id in self.local_peers:
            raise ValueError(f"local peer {peer_id} joined twice")
        self.local_peers[peer_id] = vectors
        frame = PeerJoined(peer_id, vectors)
        for member in self.members.values():
            if member.out_open:
                self._send(member, frame)
        return self._take()

    def local_peer_left(self, peer_id: int) -> list[Action]:
        """A local peer left (the driver has relayed its last rings already)."""
        if self.local_peers.pop(peer_id, None) is None:
            return []
        frame = PeerLeft(peer_id)
        for member in self.members.values():
            if member.out_open:
                self._send(member, frame)
        return self._take()

    def ring(self, identity: str, peer_id: int, vector: int, count: int) -> Send | None:
        """The frame that relays ``count`` rings to ``identity``'s peer (None if we have no
        stream to that member any more)."""
        member = self.members.get(identity)
        if member is None or not member.out_open or member.link is None:
            return None
        seq = member.out_seq
        member.out_seq = seq + 1
        return Send(member.link, encode_ring(seq, peer_id, vector, count))

    def broadcast(self, frames: Sequence[Frame]) -> list[Action]:
        """Send ``frames`` to every member we have a stream to (a diff goes to all)."""
        for member in self.members.values():
            if member.out_open:
                for frame in frames:
                    self._send(member, frame)
        return self._take()

    def send_to(self, identity: str, frames: Sequence[Frame]) -> list[Action]:
        """Send ``frames`` to ``identity`` on our stream to it (nothing if there is none)."""
        member = self.members.get(identity)
        if member is not None and member.out_open:
            for frame in frames:
                self._send(member, frame)
        return self._take()

    def drop(self, now: float, identity: str, why: str) -> list[Action]:
        """Drop ``identity`` for a protocol error its driver found (a diff that cannot be
        applied): as for a bad frame, its peers leave and it is ignored until it restarts."""
        member = self.members.get(identity)
        if member is not None and member.state not in (MemberState.DROPPED,):
            self._drop(member, now, why)
        return self._take()

    def link_overflow(self, now: float, link: int) -> list[Action]:
        """The driver could not queue more on ``link``: its member is too slow: dead."""
        for member in self.members.values():
            if member.link == link:
                if member.state in (MemberState.UP, MemberState.RESTARTING, MemberState.CONNECTING):
                    self._declare_dead(member, now, "too slow: its link's queue is full")
                else:
                    self._actions.append(Reset(link))
                break
        else:
            self._actions.append(Reset(link))
        return self._take()

    def shutdown(self, *, restarting: bool = False, reason: str = "shutting down") -> list[Action]:
        """Say bye to every member we have a session with."""
        for member in self.members.values():
            if member.out_open:
                self._send(member, Bye(restarting, reason))
        return self._take()

    def status(self, now: float) -> dict[str, Any]:
        """Members and probes, for the control plane."""
        members = []
        for member in self.members.values():
            item = member.info()
            item.update(
                reason=member.reason,
                peers=len(member.peers),
                last_heard=None if member.last_heard is None else now - member.last_heard,
                rtt=member.rtt,
                session_in=member.in_session,
                session_out=member.out_session if member.out_open else 0,
            )
            members.append(item)
        probes = sorted({p.endpoint for p in self._probes.values()})
        return {
            "identity": self.local.identity,
            "incarnation": self.local.incarnation,
            "endpoint": self.local.endpoint,
            "id_range": list(self.local.id_range),
            "timeout": self.timeout,
            "members": members,
            "probing": probes,
            "refused_by": dict(self.refused_by),
        }

    # -- frames ----------------------------------------------------------------------------

    def _on_hello(self, now: float, origin: bytes, hello: Hello, key: str) -> None:
        if hello.identity == self.local.identity:
            if hello.incarnation == self.local.incarnation:  # our own probe came back
                for probe in list(self._probes.values()):
                    if probe.nonce == hello.nonce:
                        self._close_probes_to(probe.endpoint)
            elif self._throttle.allow(("identity", hello.incarnation), now):
                log.warning(
                    "federation: a daemon at %s claims our identity %r; ignored",
                    hello.endpoint,
                    hello.identity,
                )
            return
        refusal = self.endpoint_policy(hello.endpoint)
        if refusal is not None:
            if self._throttle.allow(("endpoint", hello.endpoint), now):
                log.warning("federation: ignored a hello from %s: %s", hello.identity, refusal)
            return
        member = self.members.get(hello.identity)
        if (
            member is not None
            and member.state is MemberState.DROPPED
            and member.incarnation == hello.incarnation
        ):
            return
        if member is not None and member.incarnation != hello.incarnation:
            self._restarted(member, now, hello)
        problem = incompatibility(
            self.local,
            hello,
            (
                (m.identity, m.id_range)
                for m in self.members.values()
                if m.identity != hello.identity
                and m.state not in (MemberState.REFUSED, MemberState.DROPPED, MemberState.LEFT)
            ),
        )
        if member is None:
            if len(self.members) >= self.max_members:
                if self._throttle.allow(("full", hello.identity), now):
                    log.warning(
                        "federation: ignored %s at %s: we already have the maximum of %d members",
                        hello.identity,
                        hello.endpoint,
                        self.max_members,
                    )
                return
            member = Member(
                hello.identity,
                hello.endpoint,
                key,
                hello.incarnation,
                hello.id_range,
                hello.shm_size,
                hello.vectors,
            )
            self.members[hello.identity] = member
        else:
            self._update_address(member, hello.endpoint, key)
            member.id_range, member.shm_size, member.vectors = (
                hello.id_range,
                hello.shm_size,
                hello.vectors,
            )
        if problem is not None:
            self._refuse(member, now, *problem)
            return
        if member.state is MemberState.REFUSED:
            member.state, member.reason = MemberState.CONNECTING, None
        member.last_heard = now
        self._ensure_link(member)
        if not member.out_open:
            self._start_session(member, now)
        if hello.session == 0:
            if (
                member.state is MemberState.CONNECTING
                and now - member.out_started >= self.heartbeat
            ):
                # it probes again and has not started a session to us: it never got ours
                self._knock(member, now)
            self._send(member, HelloAck(hello.nonce))
            return
        self._begin_in_session(member, now, origin, hello)

    def _begin_in_session(self, member: Member, now: float, origin: bytes, hello: Hello) -> None:
        if member.in_session and hello.session <= member.in_session and member.origin == origin:
            return  # a hello we already hold (sent again while we were unreachable)
        intact = (
            member.in_session > 0
            and hello.prev_session == member.in_session
            and hello.prev_seq == member.in_expected - 1
        )
        if intact:
            member.unconfirmed = set(member.peers)
        elif member.peers:
            log.info(
                "federation: member %s restarted its stream without its history; "
                "its %d peers leave and join again",
                member.identity,
                len(member.peers),
            )
            self._forget_peers(member)
        if member.origin is not None and self._origins.get(member.origin) == member.identity:
            del self._origins[member.origin]
        member.origin = origin
        self._origins[origin] = member.identity
        member.in_session = hello.session
        member.in_expected = 1
        member.resync_asked = -1e18
        was = member.state
        member.state = MemberState.UP
        member.has_been_up = True
        member.asked_again = False
        member.reason = None
        member.last_pong = now
        member.next_ping = now
        self._actions.append(Stream(member.identity, True, intact))
        if was not in (MemberState.UP, MemberState.RESTARTING):
            log.info(
                "federation: member %s at %s is up (ids %d-%d)",
                member.identity,
                member.endpoint,
                *member.id_range,
            )
            self._actions.append(MemberEvent("member-joined", member.info()))
            entry = Gossip((GossipEntry(member.identity, member.endpoint, member.key),))
            for other in self.members.values():
                if other is not member and other.out_open and other.state is MemberState.UP:
                    self._send(other, entry)

    def _on_refuse(self, now: float, frame: Refuse) -> None:
        self.refused_by[frame.identity] = frame.reason
        if self._throttle.allow(("refused-by", frame.identity, frame.reason), now):
            log.warning("federation: member %s refused us: %s", frame.identity, frame.reason)
        member = self.members.get(frame.identity)
        if member is not None and member.state not in (MemberState.DROPPED, MemberState.LEFT):
            self._end_member(member, MemberState.REFUSED, f"it refused us: {frame.reason}")

    def _dispatch(self, member: Member, now: float, frame: Frame) -> None:
        if isinstance(frame, Ring):
            self._on_ring(member, frame)
        elif isinstance(frame, _MEMORY_FRAMES):
            if self.memory:
                if isinstance(frame, Diff):
                    member.last_data = now
                self._actions.append(Memory(member.identity, frame))
            else:
                self._drop(
                    member,
                    now,
                    "it replicates the shared memory and this daemon does not "
                    "(--federation-memory off here)",
                )
        elif isinstance(frame, PeerJoined):
            self._on_peer_joined(member, frame)
        elif isinstance(frame, PeerLeft):
            if frame.peer_id not in member.peers:
                self._drop(
                    member,
                    now,
                    f"it announced that peer {frame.peer_id} left, which it never announced",
                )
                return
            del member.peers[frame.peer_id]
            if member.unconfirmed is not None:
                member.unconfirmed.discard(frame.peer_id)
            self._actions.append(RemoteLeft(member.identity, frame.peer_id))
        elif isinstance(frame, Ping):
            if member.out_open:
                self._send(member, Pong(frame.sent_at))
        elif isinstance(frame, Pong):
            if member.state is MemberState.UP and frame.echo <= now:
                member.rtt = now - frame.echo
                member.last_pong = now
        elif isinstance(frame, Synced):
            if member.unconfirmed is not None:
                for peer_id in sorted(member.unconfirmed):
                    del member.peers[peer_id]
                    self._actions.append(RemoteLeft(member.identity, peer_id))
                member.unconfirmed = None
        elif isinstance(frame, Gossip):
            self._on_gossip(now, frame)
        elif isinstance(frame, HelloAck):
            for probe in list(self._probes.values()):
                if probe.nonce == frame.nonce:
                    self._close_probes_to(probe.endpoint)
        elif isinstance(frame, Resync):
            if member.state is MemberState.DEAD:
                return  # the knocks carry sessions already
            log.debug("federation: %s asks for a new session: %s", member.identity, frame.reason)
            if now - member.out_started >= self.heartbeat:
                self._start_session(member, now)
            else:
                member.resync_pending = True
        elif isinstance(frame, Bye):
            if frame.restarting and member.state is MemberState.UP:
                log.info(
                    "federation: member %s restarts in place: %s",
                    member.identity,
                    frame.reason or "no reason given",
                )
                member.state = MemberState.RESTARTING
            else:
                log.info(
                    "federation: member %s left: %s",
                    member.identity,
                    frame.reason or "no reason given",
                )
                self._end_member(member, MemberState.LEFT, frame.reason or "it said bye")
                member.next_knock = now + self.timeout  # it may come back
        else:  # Hello and Refuse are handled before dispatch
            raise AssertionError(f"unexpected frame {frame!r}")

    def _on_ring(self, member: Member, frame: Ring) -> None:
        lo, hi = self.local.id_range
        if not lo <= frame.peer_id <= hi:
            self._drop(
                member,
                member.last_heard or 0.0,
                f"it rang peer {frame.peer_id}, outside our id range {lo}-{hi}",
            )
        elif frame.vector >= self.local.vectors:
            self._drop(
                member,
                member.last_heard or 0.0,
                f"it rang vector {frame.vector}; peers have {self.local.vectors}",
            )
        else:
            self._actions.append(Deliver(frame.peer_id, frame.vector, frame.count, member.identity))

    def _on_peer_joined(self, member: Member, frame: PeerJoined) -> None:
        lo, hi = member.id_range
        peer_id, now = frame.peer_id, member.last_heard or 0.0
        if not lo <= peer_id <= hi:
            self._drop(member, now, f"it announced peer {peer_id}, outside its id range {lo}-{hi}")
        elif frame.vectors != member.vectors:
            self._drop(
                member,
                now,
                f"it announced peer {peer_id} with {frame.vectors} vectors, not {member.vectors}",
            )
        elif peer_id in member.peers:
            if member.unconfirmed is not None and peer_id in member.unconfirmed:
                member.unconfirmed.discard(peer_id)
            else:
                self._drop(member, now, f"it announced peer {peer_id} twice")
        else:
            member.peers[peer_id] = frame.vectors
            self._actions.append(RemoteJoined(member.identity, peer_id, frame.vectors))

    def _on_gossip(self, now: float, frame: Gossip) -> None:
        probing = {p.endpoint for p in self._probes.values()}
        for entry in frame.members:
            if entry.identity == self.local.identity or entry.endpoint in probing:
                continue
            known = self.members.get(entry.identity)
            if known is not None and known.state is not MemberState.LEFT:
                continue
            refusal = self.endpoint_policy(entry.endpoint)
            if refusal is not None:
                if self._throttle.allow(("endpoint", entry.endpoint), now):
                    log.warning(
                        "federation: not dialling gossiped member %s: %s", entry.identity, refusal
                    )
                continue
            self._probe(entry.endpoint, entry.key, now, seed=False)
            probing.add(entry.endpoint)

    def _bad_frame(self, now: float, origin: bytes, problem: str) -> None:
        identity = self._origins.get(origin)
        member = self.members.get(identity) if identity is not None else None
        if member is not None and member.origin == origin:
            if member.state is not MemberState.DROPPED:
                self._drop(member, now, f"bad frame: {problem}")
        elif self._throttle.allow(("bad", origin), now):
            log.warning(
                "federation: bad frame from an unknown connection %s: %s", origin.hex(), problem
            )

    # -- sessions --------------------------------------------------------------------------

    def _start_session(self, member: Member, now: float, *, after_reset: bool = False) -> None:
        """Our stream to ``member`` starts over: hello, gossip, a snapshot of our peers."""
        if member.out_open and not after_reset:
            prev = (member.out_session, member.out_seq - 1)
        else:
            prev = (0, 0)
        member.out_session += 1
        member.out_seq = 0
        member.out_open = True
        member.out_started = now
        member.next_knock = now + self.timeout
        member.resync_pending = False
        local = self.local
        self._send(
            member,
            Hello(
                local.identity,
                local.incarnation,
                local.endpoint,
                local.id_range,
                local.shm_size,
                local.vectors,
                member.out_session,
                0,
                *prev,
            ),
        )
        entries = tuple(
            GossipEntry(m.identity, m.endpoint, m.key)
            for m in self.members.values()
            if m is not member and m.state is MemberState.UP
        )
        if entries:
            self._send(member, Gossip(entries))
        for peer_id, vectors in self.local_peers.items():
            self._send(member, PeerJoined(peer_id, vectors))
        self._send(member, Synced())

    def _send(self, member: Member, frame: Frame) -> None:
        if member.link is None:
            return
        if type(frame) is Diff:
            member.data_out = True
        seq = 0
        if member.out_open:
            seq = member.out_seq
            member.out_seq = seq + 1
        self._actions.append(Send(member.link, encode_frame(frame, seq)))

    def _break_stream(self, member: Member, now: float, why: str) -> None:
        log.warning(
            "federation: stream from member %s broken: %s; its peers leave until it "
            "sends a new session",
            member.identity,
            why,
        )
        was_up = member.state is MemberState.UP
        self._forget_peers(member)
        self._actions.append(Stream(member.identity, False))
        member.in_session = 0
        member.state = MemberState.CONNECTING
        member.next_knock = now + self.timeout  # its new session should come well before
        if was_up:
            self._actions.append(
                MemberEvent("member-left", {**member.info(), "reason": "stream broken"})
            )
        self._ask_resync(member, now, why)

    def _ask_resync(self, member: Member, now: float, why: str) -> None:
        if now - member.resync_asked < self.heartbeat:
            return
        member.resync_asked = now
        self._send(member, Resync(why[:200]))

    def _knock(self, member: Member, now: float) -> None:
        """A fresh session and a resync request, for a member that is dead or has not
        started its session to us; it replaces the previous knock."""
        member.next_knock = now + self.timeout
        if member.link is None:
            return
        self._actions.append(Reset(member.link))
        self._start_session(member, now, after_reset=True)
        self._send(member, Resync("you were silent; start a new session"))

    # -- member lifecycle ------------------------------------------------------------------

    def _forget_peers(self, member: Member) -> None:
        for peer_id in member.peers:
            self._actions.append(RemoteLeft(member.identity, peer_id))
        member.peers.clear()
        member.unconfirmed = None

    def _end_member(self, member: Member, state: MemberState, reason: str) -> None:
        """Its peers leave, its stream and ours stop; it stays known (for rejoining)."""
        was_present = member.state in (MemberState.UP, MemberState.RESTARTING)
        self._forget_peers(member)
        self._actions.append(Stream(member.identity, False))
        member.in_session = 0
        member.state = state
        member.reason = reason
        if member.link is not None:
            self._actions.append(Reset(member.link))
        member.out_open = False
        if was_present:
            info = member.info()
            info["reason"] = reason
            self._actions.append(MemberEvent("member-left", info))

    def _declare_dead(self, member: Member, now: float, why: str) -> None:
        log.warning(
            "federation: member %s at %s is dead: %s; its %d peers leave",
            member.identity,
            member.endpoint,
            why,
            len(member.peers),
        )
        self._end_member(member, MemberState.DEAD, why)
        self._knock(member, now)

    def _drop(self, member: Member, now: float, why: str) -> None:
        log.error("federation: dropping member %s at %s: %s", member.identity, member.endpoint, why)
        self._end_member(member, MemberState.DROPPED, why)
        if member.link is not None:
            self._send(member, Bye(False, f"dropped: {why}"[:200]))

    def _restarted(self, member: Member, now: float, hello: Hello) -> None:
        """A new incarnation of ``member``: the old one's peers are gone. Our stream to it
        goes on as it is: the new incarnation either took it from its hello (a knock that
        found it) or asks for a new session; restarting ours here would make it see two
        sessions, the second older than the first."""
        log.info(
            "federation: member %s restarted (incarnation %s -> %s)",
            member.identity,
            member.incarnation,
            hello.incarnation,
        )
        was_present = member.state in (MemberState.UP, MemberState.RESTARTING)
        self._forget_peers(member)
        self._actions.append(Stream(member.identity, False))
        member.in_session = 0
        member.state = MemberState.CONNECTING
        member.reason = "it restarted"
        if was_present:
            info = {**member.info(), "reason": "it restarted"}
            self._actions.append(MemberEvent("member-left", info))
        member.incarnation = hello.incarnation
        member.has_been_up = False
        member.rtt = None

    def _refuse(self, member: Member, now: float, code: str, reason: str) -> None:
        """No session either way; tell it why (on its member link, outside any session)."""
        if self._throttle.allow(("refuse", member.identity, member.incarnation, reason), now):
            log.warning(
                "federation: refused member %s at %s: %s", member.identity, member.endpoint, reason
            )
            self._actions.append(MemberEvent("member-refused", {**member.info(), "reason": reason}))
        if member.state is not MemberState.REFUSED or member.out_open:
            self._end_member(member, MemberState.REFUSED, reason)
        member.reason = reason
        self._ensure_link(member)
        self._send(member, Refuse(self.local.identity, code, reason))

    def _update_address(self, member: Member, endpoint: str, key: str) -> None:
        """A member moved (or we learn its key): redial."""
        if endpoint == member.endpoint and (not key or key == member.key):
            return
        member.endpoint = endpoint
        member.key = key or member.key
        if member.link is not None:
            self._actions.append(Close(member.link))
            member.link = None
            member.out_open = False

    def _ensure_link(self, member: Member) -> None:
        if member.link is None:
            member.link = self._new_link()
            self._actions.append(Dial(member.link, member.endpoint, member.key, self.routing_id))

    # -- probes ----------------------------------------------------------------------------

    def _probe(self, endpoint: str, key: str, now: float, *, seed: bool) -> None:
        if not seed and len(self._probes) >= MAX_PROBES_PER_MEMBER * self.max_members:
            if self._throttle.allow(("probes", endpoint), now):
                log.warning("federation: too many daemons to probe; not dialling %s", endpoint)
            return
        if key:
            keys: Sequence[str] = (key,)
        elif self.own_key:
            keys = self.probe_keys
            if not keys:
                log.warning(
                    "federation: no public key to try at %s (the allow directory "
                    "holds only our own)",
                    endpoint,
                )
        else:
            keys = ("",)
        for server_key in keys:
            nonce = self._rng.randrange(1, 2**63)
            probe = _Probe(
                self._new_link(), endpoint, server_key, nonce, seed, now, now + self.timeout
            )
            self._probes[probe.link] = probe
            routing_id = PROBE_PREFIX + nonce.to_bytes(8, "big")
            self._actions.append(Dial(probe.link, endpoint, server_key, routing_id))
            self._send_probe_hello(probe)

    def _send_probe_hello(self, probe: _Probe) -> None:
        local = self.local
        hello = Hello(
            local.identity,
            local.incarnation,
            local.endpoint,
            local.id_range,
            local.shm_size,
            local.vectors,
            0,
            probe.nonce,
            0,
            0,
        )
        self._actions.append(Send(probe.link, encode_frame(hello, 0)))

    def _close_probes_to(self, endpoint: str) -> None:
        for probe in list(self._probes.values()):
            if probe.endpoint == endpoint:
                self._close_probe(probe)

    def _close_probe(self, probe: _Probe) -> None:
        del self._probes[probe.link]
        self._actions.append(Close(probe.link))

    def _new_link(self) -> int:
        self._links_used += 1
        return self._links_used

    def _take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions
