"""The federation's zmq sockets, driven from trio: one ROUTER in, one DEALER per link out.

Every daemon binds one ROUTER (its ``--federation-listen`` endpoint) on which it receives
from all members, and dials one DEALER per link (see
:mod:`ivshmemd.federation.membership`): a frame from A to B always travels on A's DEALER to
B's ROUTER, so each direction between two members is one ordered channel. Sockets are
driven through :class:`ivshmemd.zmqtrio.TrioSocket`: no thread, no polling loop.

Sending never blocks the daemon: :meth:`Transport.send` hands the frame to zmq at once when
the link is idle (no task switch on the per-doorbell path), else appends it to the link's
own outbox, which the link's sender task drains as zmq takes them. An outbox is bounded
(``max_backlog`` frames, and ``max_backlog_bytes`` bytes: memory diffs are large): past
either bound :meth:`Transport.send` returns False and the
caller declares that member too slow. DEALERs use ``ZMQ_IMMEDIATE`` (frames wait in our
outbox, not in zmq, while a member is unreachable, so a reset can discard them),
reconnect by themselves (100 ms, backing off to 1 s), and use ZMTP heartbeats so that a
dead TCP connection is noticed and replaced.

Receiving: libzmq drops a connection that sends a message over
:data:`~ivshmemd.federation.schema.HARD_MAX_FRAME_BYTES` before we see it; anything smaller
is handed up for strict decoding. With CURVE, the ROUTER is a CURVE server authenticated
by the ZAP handler (:mod:`ivshmemd.federation.zap`), and each message's ``User-Id`` (the
sender's public key) comes along so that the member can be dialled back with it.

ipc endpoints: the socket file is placed as the control plane's are
(:func:`ivshmemd.sockpath.place_socket`: created 0600 where nobody can swap it, an existing
path only replaced if it is a socket nobody listens on, never another kind of file or a live
daemon's socket) and removed on close only while it is still the one we made.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
import zmq

from ivshmemd.curve import CurveKeyPair
from ivshmemd.sockpath import SocketPathError, ipc_path, place_socket, unlink_if_ours
from ivshmemd.zmqtrio import TrioSocket

from .schema import HARD_MAX_FRAME_BYTES
from .zap import ZAP_DOMAIN

__all__ = ["Transport", "TransportError"]

log = logging.getLogger(__name__)

#: Messages handled between two checkpoints when they arrive faster than we take them.
RECEIVE_BATCH: Final = 64
RECONNECT_IVL_MS: Final = 100
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)
RECONNECT_IVL_MAX_MS: Final = 1000
#: Bytes a link's outbox may hold by default (a member that takes less is too slow).
DEFAULT_MAX_BACKLOG_BYTES: Final = 256 << 20


Handler = Callable[[bytes, bytes | None, str], None]


class TransportError(Exception):
    """The listening endpoint cannot be used (the message says why)."""


@dataclass(eq=False)
class _Link:
    sock: TrioSocket
    endpoint: str
    outbox: deque[bytes] = field(default_factory=deque)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    sending: bool = False
    sent: int = 0
    #: bytes of the frames in the outbox
    queued_bytes: int = 0
    #: the scope of the send waiting for zmq to take a frame (a reset cancels it)
    send_scope: trio.CancelScope | None = None


class Transport:
    """The ROUTER and the links of one daemon (see the module docstring)."""

    def __init__(
        self,
        context: zmq.Context[Any],
        *,
        keys: CurveKeyPair | None,
        timeout: float,
        max_backlog: int,
        max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES,
    ) -> None:
        self.context = context
        self.keys = keys
        self.timeout = timeout
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.endpoint: str | None = None
        self._router: TrioSocket | None = None
        #: the ipc socket file we placed, and its identity (removed only while still ours)
        self._ipc_file: tuple[str, tuple[int, int]] | None = None
        self._links: dict[int, _Link] = {}
        self._nursery: trio.Nursery | None = None

    def _use_keys(self, sock: zmq.Socket[Any]) -> None:
        assert self.keys is not None
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret.encode("ascii"))

    # -- listening -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER; returns the endpoint as bound (a tcp port 0 resolved)."""
        sock = self.context.socket(zmq.ROUTER)
        router = TrioSocket(sock)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_FRAME_BYTES)
            if self.keys is not None:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode("ascii"))
                self._use_keys(sock)
            path = ipc_path(endpoint)
            try:
                if path is None:
                    sock.bind(endpoint)
                    bound: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                else:
                    ident = place_socket(
                        path, lambda private: sock.bind(f"ipc://{private}"), 0o600, None,
                        "federation socket",
                    )  # fmt: skip
                    self._ipc_file = (path, ident)
                    bound = endpoint
            except zmq.ZMQError as exc:
                raise TransportError(f"cannot listen on {endpoint}: {exc}") from None
            except SocketPathError as exc:
                raise TransportError(str(exc)) from None
        except BaseException:
            router.close()
            raise
        self._router = router
        self.endpoint = bound
        return bound

    def incoming_fd(self) -> int:
        """The ROUTER's ``ZMQ_FD``: readable when messages *may* be waiting (the driver
        waits on it, then calls :meth:`receive_ready`, which re-arms it)."""
        assert self._router is not None
        return int(self._router.socket.getsockopt(zmq.FD))

    def receive_ready(self, handle: Handler) -> bool:
        """Hand the messages queued now to ``handle(origin, frame bytes, sender's public
        key)`` (frame bytes are None when a message is not exactly one frame), at most
        :data:`RECEIVE_BATCH` of them. Never waits. True if more are queued; when False,
        ``ZMQ_EVENTS`` has been read after the last message, so :meth:`incoming_fd` will
        signal the next one (the rule :mod:`ivshmemd.zmqtrio` explains)."""
        assert self._router is not None
        sock = self._router.socket
        events = sock.getsockopt
        receive = sock.recv_multipart
        secure = self.keys is not None
        for _ in range(RECEIVE_BATCH):
            if not int(events(_EVENTS)) & _POLLIN:
                return False
            if secure:
                frames = receive(zmq.NOBLOCK, copy=False)
                parts = [frame.bytes for frame in frames]
            else:
                parts = receive(zmq.NOBLOCK)
            key = ""
            if secure and len(parts) == 2:
                with contextlib.suppress(zmq.ZMQError):
                    key = str(frames[1].get("User-Id"))
            handle(parts[0], parts[1] if len(parts) == 2 else None, key)
        return bool(int(events(_EVENTS)) & _POLLIN)

    # -- links -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the links' sender tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def dial(self, link: int, endpoint: str, server_key: str, routing_id: bytes) -> None:
        """Open a link (it connects, and reconnects, by itself)."""
        sock = self.context.socket(zmq.DEALER)
        wrapped = TrioSocket(sock)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            heartbeat_ms = max(100, int(self.timeout * 1000 / 3))
            sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.timeout * 1000))
            if self.keys is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
                self._use_keys(sock)
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            wrapped.close()
            log.warning("federation: cannot dial %s: %s", endpoint, exc)
            return
        entry = _Link(wrapped, endpoint)
        self._links[link] = entry
        assert self._nursery is not None, "Transport.run is not running"
        self._nursery.start_soon(self._sender, entry)

    def send(self, link: int, data: bytes) -> bool:
        """Queue ``data`` on ``link`` (sent now if zmq takes it); False if the link's outbox
        is full. Frames for a closed or unknown link are dropped (True)."""
        entry = self._links.get(link)
        if entry is None:
            return True
        outbox = entry.outbox
        if not outbox and not entry.sending and entry.sock.try_send_multipart((data,)):
            entry.sent += 1
            return True
        if len(outbox) >= self.max_backlog or entry.queued_bytes > self.max_backlog_bytes:
            return False
        outbox.append(data)
        entry.queued_bytes += len(data)
        entry.lot.unpark_all()
        return True

    def reset(self, link: int) -> None:
        """Discard the frames ``link`` has not handed to zmq yet (including one a sender
        task is waiting to hand over: a stale frame must not reach a restarted member)."""
        entry = self._links.get(link)
        if entry is not None:
            entry.outbox.clear()
            entry.queued_bytes = 0
            if entry.send_scope is not None:  # the frame waiting for zmq goes too
                entry.send_scope.cancel()

    def close_link(self, link: int) -> None:
        """Close a link; unsent frames are dropped."""
        entry = self._links.pop(link, None)
        if entry is not None:
            entry.scope.cancel()
            entry.outbox.clear()
            entry.sock.close()

    def link_endpoint(self, link: int) -> str:
        """Where ``link`` goes ('?' if it is closed)."""
        entry = self._links.get(link)
        return "?" if entry is None else entry.endpoint

    def backlog(self, link: int) -> int:
        """Frames waiting in ``link``'s outbox."""
        entry = self._links.get(link)
        return 0 if entry is None else len(entry.outbox)

    async def _sender(self, entry: _Link) -> None:
        """Hand the outbox to zmq, waiting (without blocking trio) while zmq is full."""
        outbox = entry.outbox
        with entry.scope, contextlib.suppress(trio.ClosedResourceError):
            while True:
                if not outbox:
                    await entry.lot.park()
                    continue
                data = outbox.popleft()
                entry.queued_bytes -= len(data)
                entry.sending = True
                try:
                    with trio.CancelScope() as scope:
                        entry.send_scope = scope
                        await entry.sock.send_multipart((data,))
                finally:
                    entry.sending = False
                    entry.send_scope = None
                if scope.cancelled_caught:  # reset while zmq would not take it: not sent
                    continue
                entry.sent += 1
                while outbox and entry.sock.try_send_multipart((outbox[0],)):
                    entry.queued_bytes -= len(outbox.popleft())
                    entry.sent += 1

    async def flush(self, grace: float) -> None:
        """Hand every outbox to zmq, for up to ``grace`` seconds, then give zmq's I/O thread
        a moment to write (on the way out; the sender tasks may be cancelled already)."""
        with trio.move_on_after(grace):
            while True:
                pending = False
                for entry in self._links.values():
                    outbox = entry.outbox
                    while outbox and not entry.sending:
                        if not entry.sock.try_send_multipart((outbox[0],)):
                            break
                        entry.queued_bytes -= len(outbox.popleft())
                    pending = pending or bool(outbox)
                if not pending:
                    break
                await trio.sleep(0.01)
            await trio.sleep(min(0.05, grace))

    def close(self) -> None:
        """Close every socket and remove the ipc socket file we made. Idempotent."""
        for link in list(self._links):
            self.close_link(link)
        if self._router is not None:
            self._router.close()
            self._router = None
        if self._ipc_file is not None:
            unlink_if_ours(*self._ipc_file)
            self._ipc_file = None
