"""Who may talk to the control plane: a ZAP handler driven from trio, and connection counts.

libzmq asks a ZAP handler (RFC 27, ``inproc://zeromq.zap.01`` in the same context) about
every connection to a socket that has a ZAP domain, during the handshake, before the
connection can send a request or a subscription. This module answers those questions from
the trio loop that runs the control plane (no thread of its own):

* **ipc** (mechanism NULL): libzmq passes the client's ``SO_PEERCRED`` in the address
  (``...:uid:gid:pid``); the daemon's allow-lists (:class:`ivshmemd.access.AllowList`)
  decide. A refused client's connection is closed at once: it never gets a session, a
  queue, or a subscription.
* **tcp** (mechanism CURVE): the client's public key must be one of the authorised keys
  (``--curve-clients``); tcp carries no credentials, so the daemon serves tcp only with
  CURVE.
* **Caps**: a socket's live connections are counted from its monitor events
  (:class:`ConnectionCounter`); once a socket has ``limit`` of them, newcomers are refused.
  Each socket has its own ZAP domain, so that its requests are counted against its cap.

Any malformed request is refused, and a decision that raises refuses too (and is logged):
the handler never stops answering, since every handshake waits for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .ratelimit import LogLimiter
from .zmqtrio import TrioSocket

__all__ = ["ZAP_ENDPOINT", "ConnectionCounter", "ZapPolicy", "bind_handler", "monitor",
           "serve_zap", "watch_connections"]  # fmt: skip

log = logging.getLogger("ivshmemd")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
#: a flood of refused connections costs one log line per kind per second
_refusals = LogLimiter(log)


@dataclass
class ConnectionCounter:
    """Live connections of one listening socket, from its monitor events."""

    name: str
    limit: int
    live: int = 0
    fds: set[int] = field(default_factory=set)

    def full(self) -> bool:
        return self.live >= self.limit

    def apply(self, event: int, fd: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self.fds.add(fd)
        elif event == zmq.EVENT_DISCONNECTED:
            self.fds.discard(fd)
        self.live = len(self.fds)


async def watch_connections(monitor: TrioSocket, counter: ConnectionCounter) -> None:
    """Keep ``counter`` up to date from a socket monitor (run as a task)."""
    while True:
        frames = await monitor.recv_multipart()
        try:
            event = parse_monitor_message(frames)
        except Exception:  # a malformed monitor message: not ours to crash on
            continue
        counter.apply(int(event["event"]), int(event["value"]))


def monitor(sock: zmq.Socket[Any]) -> TrioSocket:
    """A trio-driven monitor of ``sock``'s accepted and closed connections."""
    return TrioSocket(sock.get_monitor_socket(_MONITORED))


@dataclass
class ZapPolicy:
    """What the handler allows. ``allow`` judges ipc credentials (uid, gid, pid) and
    returns a refusal or None; ``curve_clients`` are the raw 32-byte public keys allowed
    over CURVE (None: CURVE is refused); ``counters`` caps the connections of the socket
    whose ZAP domain is the key."""

    allow: Callable[[int, int, int], str | None] | None = None
    curve_clients: frozenset[bytes] | None = None
    counters: dict[bytes, ConnectionCounter] = field(default_factory=dict)

    def decide(
        self, domain: bytes, mechanism: bytes, address: str, credentials: list[bytes]
    ) -> tuple[int, str, str]:
        """``(status, text, user id)``: 200 lets the connection in, 400 refuses it, 300
        refuses it for now (the socket has all the connections it takes)."""
        counter = self.counters.get(domain)
        if counter is not None and counter.full():  # 300: a temporary refusal
            return 300, f"too many {counter.name} connections ({counter.limit})", ""
        if mechanism == b"NULL":
            creds = _ipc_credentials(address)
            if creds is None:
                return 400, "no credentials (only ipc clients may connect without CURVE)", ""
            uid, gid, pid = creds
            refusal = self.allow(uid, gid, pid) if self.allow is not None else None
            if refusal is not None:
                return 400, refusal, ""
            return 200, "OK", f"uid:{uid}"
        if mechanism == b"CURVE" and credentials:
            if self.curve_clients is not None and credentials[0] in self.curve_clients:
                return 200, "OK", "curve:" + z85.encode(credentials[0]).decode()
            return 400, "this CURVE key is not authorised", ""
        return 400, f"mechanism {mechanism.decode(errors='replace')} is not accepted", ""


def _ipc_credentials(address: str) -> tuple[int, int, int] | None:
    """(uid, gid, pid) from libzmq's ipc peer address ``...:uid:gid:pid``."""
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def bind_handler(ctx: zmq.Context[Any]) -> TrioSocket:
    """The ZAP handler's socket, bound now: bind it before any socket that needs it, so
    that no connection is ever let through because nobody answered for it."""
    handler = TrioSocket(ctx.socket(zmq.ROUTER))
    handler.socket.setsockopt(zmq.LINGER, 0)
    handler.socket.bind(ZAP_ENDPOINT)
    return handler


async def serve_zap(handler: TrioSocket, policy: ZapPolicy) -> None:
    """Answer ZAP requests on ``handler`` (from :func:`bind_handler`) until cancelled."""
    while True:
        frames = await handler.recv_multipart()
        reply = _answer(frames, policy)
        if reply is not None:
            handler.try_send_multipart(reply)


def _answer(frames: list[bytes], policy: ZapPolicy) -> list[bytes] | None:
    # [routing id, b"", version, request id, domain, address, identity, mechanism, creds...]
    if len(frames) < 8 or frames[1] != b"" or frames[2] != b"1.0":
        return None  # not a ZAP request: nothing to answer
    route, request_id, domain, mechanism = frames[0], frames[3], frames[4], frames[7]
    address = frames[5].decode(errors="replace")
    try:
        status, text, user = policy.decide(domain, mechanism, address, frames[8:])
    except Exception as exc:
        log.error("control plane: the access check failed (%s); refusing", exc)
        status, text, user = 500, "internal error", ""
    if status != 200:
        _refusals.log(text, logging.WARNING, "control plane: refused %s: %s", address, text)
    return [route, b"", b"1.0", request_id, str(status).encode(), text.encode(), user.encode(), b""]
