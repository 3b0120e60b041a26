"""The control plane's trio server: a zmq ROUTER for requests, an XPUB for events.

The thin driver around :mod:`ivshmemd.control.schema`, through :mod:`ivshmemd.zmqtrio`.
Replies and events are sent with NOBLOCK and dropped, never waited on, when a client is
slow or gone, so no client can stall the daemon; requests beyond
:data:`HARD_MAX_MESSAGE_BYTES` make libzmq drop that client's connection; what a client can
make the server hold is bounded (:class:`ControlLimits`: connections, queued requests,
replies and events per client, subscriptions applied only for topics that exist).

Access (:class:`ControlAccess`, enforced per connection by the ZAP handler of
:mod:`ivshmemd.zap`, on both sockets): the ipc socket files get mode 0600 unless told
otherwise, the allow-lists judge each client's SO_PEERCRED credentials, and tcp is served
only with CURVE and authorised client keys.

:class:`EventPublisher` is the daemon's side of the event stream: it stamps peer events with
a sequence number and queues them for :func:`serve_control`.

In the daemon, :func:`serve_control` runs in a process of its own
(:mod:`ivshmemd.control.process`), so that nothing libzmq does (it aborts its process when
it runs out of file descriptors while accepting a connection) can take the daemon down.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import trio
import zmq

from ivshmemd.curve import CurveKeys
from ivshmemd.sockpath import (
    SUN_PATH_MAX,
    SocketPathError,
    ipc_path,
    place_socket,
    unlink_if_ours,
)
from ivshmemd.zap import ConnectionCounter, ZapHandler, ZapPolicy, watch_connections
from ivshmemd.zap import monitor as zap_monitor
from ivshmemd.zmqtrio import TrioSocket

from .schema import (
    EVENT_KINDS,
    EVENTS_WELCOME,
    MAX_REQUEST_BYTES,
    MEMBER_EVENT_KINDS,
    PEER_EVENT_KINDS,
    ControlView,
    Credentials,
    ErrorCode,
    Event,
    error_reply,
    handle_request,
    parse_peer_address,
)

__all__ = [
    "EVENTS_SNDHWM",
    "HARD_MAX_MESSAGE_BYTES",
    "ControlAccess",
    "ControlEndpoints",
    "ControlLimits",
    "ControlSetupError",
    "CurveKeys",
    "EventPublisher",
    "RequestHandler",
    "local_handler",
    "serve_control",
    "subscribable",
    "tcp_needs_curve",
]

log = logging.getLogger(__name__)

#: libzmq drops a connection that sends a message above this (ZMQ_MAXMSGSIZE).
HARD_MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: Events kept for the publisher task before the oldest are dropped (and counted).
MAX_PENDING_EVENTS: Final = 65536
#: Per-subscriber queue in the daemon; a subscriber further behind loses events (seq gap).
#: Enough for a burst of thousands of joins to reach a subscriber that reads; a subscriber
#: that stops reading costs at most this many events (about 1 MiB) plus socket buffers.
EVENTS_SNDHWM: Final = 10_000


class ControlSetupError(Exception):
    """The control plane cannot start (bad endpoint, cannot bind, ...)."""


class EventPublisher:
    """Stamps peer events with a sequence number and queues them for the events socket.

    The daemon calls :meth:`peer_joined` / :meth:`peer_left` from its trio thread when the
    registry changes; they never block and never fail. :func:`serve_control` drains the queue.
    If nothing drains it (no control plane), the oldest events are dropped and counted in
    :attr:`dropped`; the sequence numbers still tell subscribers about the gap.
    """

    def __init__(
        self,
        *,
        max_pending: int = MAX_PENDING_EVENTS,
        clock: Callable[[], float] = time.time,
        boot: str | None = None,
    ) -> None:
        #: this daemon instance, stamped on its events (see :attr:`Event.boot`)
        self.boot = boot if boot is not None else secrets.token_hex(8)
        self._seq = 0
        self._clock = clock
        self._pending: deque[Event] = deque()
        self._max_pending = max_pending
        self._lot = trio.lowlevel.ParkingLot()
        self.dropped = 0

    @property
    def last_seq(self) -> int:
        """The sequence number of the last event published (0 before the first)."""
        return self._seq

    def publish(
        self,
        kind: str,
        peer_id: int | None,
        vectors: int,
        reason: str | None = None,
        **member: Any,
    ) -> Event:
        """Stamp and queue one event; returns it. ``member`` holds the :class:`Event`'s
        member fields (``member``, ``endpoint``, ``id_range``)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        self._seq += 1
        event = Event(self._seq, kind, peer_id, vectors, self._clock(), reason, self.boot, **member)
        self.forward(event)
        return event

    def export(self) -> dict[str, Any]:
        """The stream's instance, last number and unsent events: an upgrade in place
        (:mod:`ivshmemd.handover`) carries them, so the stream goes on without a gap."""
        pending = [list(dataclasses.astuple(event)) for event in self._pending]
        return {"boot": self.boot, "seq": self._seq, "pending": pending}

    def resume(self, state: dict[str, Any]) -> None:
        """Go on where :meth:`export` left off (in the next image of the daemon)."""
        self.boot = str(state["boot"])
        self._seq = max(self._seq, int(state["seq"]))
        for fields in state["pending"]:
            self.forward(Event(*fields))

    def forward(self, event: Event) -> None:
        """Queue an event stamped elsewhere (the control process relays the daemon's)."""
        self._seq = max(self._seq, event.seq)
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(event)
        self._lot.unpark_all()

    def peer_joined(self, peer_id: int, vectors: int) -> Event:
        return self.publish("peer-joined", peer_id, vectors)

    def peer_left(self, peer_id: int, vectors: int, reason: str | None = None) -> Event:
        """``reason`` is free text for humans, e.g. ``"disconnected"``, ``"kicked"``, ``"slow"``."""
        return self.publish("peer-left", peer_id, vectors, reason)

    def on_server_event(self, kind: str, event: Mapping[str, Any]) -> None:
        """An event listener in the daemon's shape, ``listener(kind, {"peer_id", "vectors",
        ...})``: ``server.listeners.append(publisher.on_server_event)``. An optional
        ``"reason"`` is passed on, and ``"member"`` (a federation member's peer); other
        kinds than peer-joined/peer-left are ignored."""
        if kind not in PEER_EVENT_KINDS:
            log.debug("not publishing server event %r", kind)
            return
        reason, member = event.get("reason"), event.get("member")
        self.publish(
            kind,
            int(event["peer_id"]),
            int(event.get("vectors", 0)),
            None if reason is None else str(reason),
            member=None if member is None else str(member),
        )

    def on_member_event(self, kind: str, info: Mapping[str, Any]) -> None:
        """A federation member joined, left or was refused (the shape of
        :attr:`ivshmemd.fedproc.FederationProcess.member_listeners`): ``info`` has
        ``member``, ``endpoint``, ``id_range`` and, when it left or was refused, ``reason``."""
        if kind not in MEMBER_EVENT_KINDS:
            log.debug("not publishing member event %r", kind)
            return
        reason, id_range = info.get("reason"), info.get("id_range")
        self.publish(
            kind,
            None,
            0,
            None if reason is None else str(reason),
            member=str(info.get("member")),
            endpoint=None if info.get("endpoint") is None else str(info["endpoint"]),
            id_range=None if id_range is None else (int(id_range[0]), int(id_range[1])),
        )

    def take_pending(self) -> list[Event]:
        """Remove and return the queued events, oldest first."""
        events = list(self._pending)
        self._pending.clear()
        return events

    async def wait_pending(self) -> None:
        """Return once at least one event is queued."""
        if self._pending:
            await trio.lowlevel.checkpoint()
            return
        await self._lot.park()


# ---------------------------------------------------------------------------------------------
# The trio server
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlEndpoints:
    """The endpoints actually bound (``tcp://...:0`` resolved to its port)."""

    control: str
    events: str


@dataclasses.dataclass(frozen=True)
class ControlAccess:
    """Who may connect (checked once per connection, during the handshake, by the ZAP
    handler of :mod:`ivshmemd.zap`): over ipc, ``allow`` judges the client's credentials
    (None: anyone who can open the socket file); over tcp, only CURVE clients whose key is
    in ``curve.clients``. Without ``curve``, tcp endpoints are refused at start-up."""

    allow: Callable[[Credentials], str | None] | None = None
    curve: CurveKeys | None = None


@dataclasses.dataclass(frozen=True)
class ControlLimits:
    """Bounds on what clients can make the control plane hold."""

    #: live connections to the request socket / to the events socket
    max_clients: int = 64
    max_subscribers: int = 32
    #: replies queued per client; requests queued per client
    reply_hwm: int = 16
    request_hwm: int = 16
    #: events queued per subscriber (beyond, it loses events and sees the seq gap)
    events_hwm: int = EVENTS_SNDHWM


#: Returns the reply to one request: ``handler(raw request, credentials or None)``.
RequestHandler = Callable[[bytes, Credentials | None], Awaitable[bytes]]

_CONTROL_DOMAIN: Final = b"ivshmemd-control"
_EVENTS_DOMAIN: Final = b"ivshmemd-events"


def tcp_needs_curve(endpoints: Iterable[str], access: ControlAccess | None) -> str | None:
    """Why these endpoints cannot be served with this access (tcp without CURVE), or None."""
    tcp = [ep for ep in endpoints if ep.startswith("tcp://")]
    if tcp and (access is None or access.curve is None):
        return (
            f"{tcp[0]}: tcp carries no client credentials, so the control plane serves tcp "
            "only with CURVE authentication (--curve-secret-key and --curve-clients)"
        )
    return None


def _bind(
    sock: zmq.Socket[Any],
    endpoint: str,
    mode: int,
    gid: int | None,
    created: dict[str, tuple[int, int]],
) -> str:
    """Bind ``endpoint``; an ipc socket file is placed race-free with ``mode``/``gid``
    (:func:`ivshmemd.sockpath.place_socket`: libzmq never unlinks anything at the public
    path, and only a stale socket there is replaced). Records the files it creates in
    ``created`` (path -> identity, for removal on exit). Returns the bound endpoint."""
    path = ipc_path(endpoint)
    if path is not None and len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ControlSetupError(
            f"ipc path {path!r} is longer than {SUN_PATH_MAX} bytes (a unix socket limit); "
            "use a shorter socket path or an explicit endpoint"
        )
    try:
        if path is None:
            sock.bind(endpoint)
            bound: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            return bound
        created[path] = place_socket(
            path, lambda private: sock.bind(f"ipc://{private}"), mode, gid, "control socket"
        )
        return endpoint
    except zmq.ZMQError as exc:
        raise ControlSetupError(f"cannot bind {endpoint}: {exc}") from None
    except SocketPathError as exc:
        raise ControlSetupError(str(exc)) from None
    except OSError as exc:
        raise ControlSetupError(f"cannot bind {endpoint}: {exc.strerror or exc}") from None


def _secure(sock: zmq.Socket[Any], endpoint: str, domain: bytes, access: ControlAccess) -> None:
    """Every connection goes through the ZAP handler (none is let in unasked: the domain
    is enforced); tcp ones must speak CURVE."""
    sock.setsockopt(zmq.ZAP_DOMAIN, domain)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    if endpoint.startswith("tcp://") and access.curve is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, access.curve.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, access.curve.secret)


def _zap_policy(access: ControlAccess, counters: dict[bytes, ConnectionCounter]) -> ZapPolicy:
    allow = access.allow

    def judge(uid: int, gid: int, pid: int) -> str | None:
        return None if allow is None else allow(Credentials(pid=pid, uid=uid, gid=gid))

    clients = None
    if access.curve is not None:
        clients = {key.decode("ascii"): "client" for key in access.curve.clients}
    return ZapPolicy(allow=judge, curve_clients=clients, counters=counters)


def _split_envelope(frames: list[zmq.Frame]) -> tuple[list[bytes], list[zmq.Frame]]:
    """Split a ROUTER message into its routing envelope (up to the empty delimiter a REQ
    client adds) and its body frames."""
    for index in range(1, len(frames)):
        if len(frames[index].bytes) == 0:
            return [f.bytes for f in frames[: index + 1]], frames[index + 1 :]
    return [frames[0].bytes], frames[1:]


def local_handler(view: ControlView) -> RequestHandler:
    """Requests answered in this process by :func:`handle_request` on ``view``."""

    async def handle(raw: bytes, creds: Credentials | None) -> bytes:
        return handle_request(raw, view, creds.uid if creds else None)

    return handle


async def _serve_requests(router: TrioSocket, handler: RequestHandler, ipc: bool) -> None:
    while True:
        frames = await router.recv_frames()
        envelope, body = _split_envelope(frames)
        creds: Credentials | None = None
        if ipc and body:
            creds = parse_peer_address(str(body[0].get("Peer-Address")))
        if len(body) != 1:
            reply = error_reply(ErrorCode.BAD_REQUEST, "a request is exactly one frame")
        elif len(body[0].bytes) > MAX_REQUEST_BYTES:  # answered here, never passed on
            reply = handle_request(body[0].bytes, _NO_VIEW, None)
        else:
            reply = await handler(body[0].bytes, creds)
        # ROUTER drops a reply to a client that is gone or full: never wait for one.
        if not router.try_send_multipart([*envelope, reply]):
            log.info("control reply dropped: client is gone or not reading")


class _NoView:
    """A view that is never reached (oversized requests are refused before dispatch)."""

    def status(self) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError("unreachable")

    def peers(self) -> list[dict[str, Any]]:  # pragma: no cover
        raise AssertionError("unreachable")

    def kick(self, peer_id: int, reason: str) -> bool:  # pragma: no cover
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, int]:  # pragma: no cover
        raise AssertionError("unreachable")

    def departure(self, peer_id: int) -> dict[str, Any] | None:  # pragma: no cover
        raise AssertionError("unreachable")

    def ring(self, peer_id: int, vector: int) -> None:  # pragma: no cover
        raise AssertionError("unreachable")

    def dump(self) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError("unreachable")

    def upgrade(self) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError("unreachable")

    @property
    def owner_uid(self) -> int:  # pragma: no cover
        raise AssertionError("unreachable")


_NO_VIEW = _NoView()


def subscribable(topic: bytes) -> bool:
    """Whether a subscription can ever match anything the events socket sends: the empty
    topic (everything) or a prefix of an event kind or of the welcome. Nothing else is
    applied, so a subscriber cannot make the daemon store topics of its choosing."""
    return not topic or any(
        name.startswith(topic) for name in (*(k.encode() for k in EVENT_KINDS), EVENTS_WELCOME)
    )


def _apply_subscription(pub: TrioSocket, notice: list[bytes]) -> bool:
    """Handle one (un)subscription notice of the manual XPUB; True for a new subscription
    (the subscriber is greeted then)."""
    if len(notice) != 1 or not notice[0] or notice[0][:1] not in (b"\x00", b"\x01"):
        return False
    topic = notice[0][1:]
    if not subscribable(topic):
        return False
    subscribe = notice[0][:1] == b"\x01"
    # applies to the connection the notice came from (XPUB_MANUAL)
    pub.socket.setsockopt(zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE, topic)
    return subscribe


async def _wait_for_work(pub: TrioSocket, publisher: EventPublisher) -> None:
    """Return when an event is queued or the XPUB socket has something to process (a new
    subscriber to attach and greet, a subscription notice)."""
    async with trio.open_nursery() as nursery:

        async def then_stop(wait: Callable[[], Awaitable[None]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(then_stop, publisher.wait_pending)
        nursery.start_soon(then_stop, pub.wait_readable)


async def _serve_events(pub: TrioSocket, publisher: EventPublisher) -> None:
    while True:
        # A subscription notice (b"\x01" + topic) means XPUB has now processed a new
        # subscriber's filter: greet it then, and not earlier. (libzmq's XPUB_WELCOME_MSG
        # goes out when the connection attaches, which can be before the subscription
        # arrives, so a subscriber could see the welcome and still miss the next event.)
        # The greeting is broadcast; subscribers skip welcomes they did not wait for.
        greet = False
        while (notice := pub.try_recv_multipart()) is not None:
            greet = _apply_subscription(pub, notice) or greet
            await trio.lowlevel.checkpoint()  # a subscription flood must not hog the loop
        if greet:
            pub.try_send_multipart([EVENTS_WELCOME])
        for event in publisher.take_pending():
            # XPUB never blocks: a subscriber over its high-water mark loses the event and
            # sees the gap in the sequence numbers.
            pub.try_send_multipart(event.to_frames())
        await _wait_for_work(pub, publisher)


def _configure(router: zmq.Socket[Any], pub: zmq.Socket[Any], limits: ControlLimits) -> None:
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MESSAGE_BYTES)
    router.setsockopt(zmq.SNDHWM, limits.reply_hwm)
    router.setsockopt(zmq.RCVHWM, limits.request_hwm)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, limits.events_hwm)
    pub.setsockopt(zmq.RCVHWM, limits.request_hwm)
    pub.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscribers only send subscriptions
    pub.setsockopt(zmq.XPUB_MANUAL, 1)  # every (un)subscription is ours to apply, or not


async def serve_control(
    view: ControlView | None,
    endpoint: str,
    events_endpoint: str,
    publisher: EventPublisher,
    *,
    socket_mode: int = 0o600,
    socket_gid: int | None = None,
    access: ControlAccess | None = None,
    limits: ControlLimits | None = None,
    handler: RequestHandler | None = None,
    task_status: trio.TaskStatus[ControlEndpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve control requests on ``endpoint`` and events on ``events_endpoint`` until
    cancelled. Start it with ``await nursery.start(serve_control, view, ep, ev_ep, pub)``:
    that returns the bound :class:`ControlEndpoints` once both sockets listen, or raises
    :class:`ControlSetupError`.

    Requests are answered by ``handler`` if given, else by :func:`handle_request` on
    ``view``. ``socket_mode``/``socket_gid`` apply to ipc socket files. ``access`` says who
    may connect (see :class:`ControlAccess`; tcp endpoints need CURVE), ``limits`` how much
    clients can make it hold. On exit every socket is closed with linger 0, the context is
    terminated once nothing uses it any more, and the ipc socket files are removed.
    """
    access = access or ControlAccess()
    limits = limits or ControlLimits()
    problem = tcp_needs_curve((endpoint, events_endpoint), access)
    if problem is not None:
        raise ControlSetupError(problem)
    if handler is None:
        if view is None:
            raise ValueError("serve_control needs a view or a handler")
        handler = local_handler(view)
    # The context is this function's alone: every socket in it is created, used and closed
    # by this function and its tasks, and it is terminated only after all of them ended.
    ctx: zmq.Context[Any] = zmq.Context()
    created: dict[str, tuple[int, int]] = {}
    sockets: list[TrioSocket] = []
    zap: ZapHandler | None = None
    try:
        counters = {
            _CONTROL_DOMAIN: ConnectionCounter("control", limits.max_clients),
            _EVENTS_DOMAIN: ConnectionCounter("events", limits.max_subscribers),
        }
        # bound before any socket that needs it
        zap = ZapHandler(ctx, _zap_policy(access, counters), "control plane")
        router = TrioSocket(ctx.socket(zmq.ROUTER))
        sockets.append(router)
        pub = TrioSocket(ctx.socket(zmq.XPUB))
        sockets.append(pub)
        _configure(router.socket, pub.socket, limits)
        monitors = {}
        for sock, domain in ((router, _CONTROL_DOMAIN), (pub, _EVENTS_DOMAIN)):
            monitors[domain] = zap_monitor(sock.socket)
            sockets.append(monitors[domain])
        _secure(router.socket, endpoint, _CONTROL_DOMAIN, access)
        _secure(pub.socket, events_endpoint, _EVENTS_DOMAIN, access)
        bound = ControlEndpoints(
            control=_bind(router.socket, endpoint, socket_mode, socket_gid, created),
            events=_bind(pub.socket, events_endpoint, socket_mode, socket_gid, created),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(zap.serve)
            for domain, monitor_sock in monitors.items():
                nursery.start_soon(watch_connections, monitor_sock, counters[domain])
            nursery.start_soon(_serve_requests, router, handler, endpoint.startswith("ipc://"))
            nursery.start_soon(_serve_events, pub, publisher)
            task_status.started(bound)
    finally:
        # every task of the nursery has ended: nothing waits on or uses these sockets now
        for sock in reversed(sockets):
            sock.close()
        if zap is not None:
            zap.close()
        ctx.term()
        # libzmq leaves the ipc socket files behind: remove ours (and only ours)
        for path, ident in created.items():
            unlink_if_ours(path, ident)
