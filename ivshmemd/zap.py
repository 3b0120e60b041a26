"""Who may connect to a zmq socket of ours: one ZAP handler, driven from trio, for the
control plane and the federation alike; and connection counts.

libzmq asks the ZAP handler of a socket's context (RFC 27: a socket bound to
``inproc://zeromq.zap.01`` in the same context) about every connection to a socket that has
a ZAP domain, during the handshake, before the connection can send a request, a
subscription or a frame. :class:`ZapHandler` answers those questions from the trio loop
(no thread of its own), by a :class:`ZapPolicy`:

* **ipc** (mechanism NULL): libzmq passes the client's ``SO_PEERCRED`` in the address
  (``...:uid:gid:pid``) and ``allow`` decides (the control plane's allow-lists,
  :class:`ivshmemd.access.AllowList`). Without ``allow``, NULL is refused: CURVE only.
* **CURVE**: the client's public key must be one of ``curve_clients`` (the allow
  directory's keys, loaded by :mod:`ivshmemd.curve`); an admitted connection's ``User-Id``
  is its key in z85 (libzmq attaches it to every message of that connection: how the
  federation learns a member's key to dial it back).
* **Caps**: a socket's live connections are counted from its monitor events
  (:class:`ConnectionCounter`); once a socket has ``limit`` of them, newcomers are refused
  for now (300). Each socket has its own ZAP domain, so that its requests are counted
  against its cap.

A malformed request gets a 500, and a decision that raises refuses too (and is logged):
the handler never stops answering, since every handshake waits for it. A flood of
refusals costs one log line per refused party per interval.

Without a ZAP handler libzmq admits every client, so the handler binds its socket when it
is made: make it before any socket that needs it binds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .ratelimit import LogLimiter
from .zmqtrio import TrioSocket

__all__ = ["ZAP_ENDPOINT", "ConnectionCounter", "Verdict", "ZapHandler", "ZapPolicy",
           "ZapRequest", "answer", "monitor", "watch_connections"]  # fmt: skip

log = logging.getLogger("ivshmemd")

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
ZAP_VERSION: Final = b"1.0"
#: a raw CURVE public key (z85: 40 characters)
CURVE_KEY_BYTES: Final = 32
_MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


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


@dataclass(frozen=True)
class ZapRequest:
    """One ZAP request (RFC 27), its envelope removed."""

    request_id: bytes
    domain: bytes
    address: str
    mechanism: bytes
    credentials: tuple[bytes, ...]

    @classmethod
    def parse(cls, frames: list[bytes]) -> ZapRequest | None:
        """``[version, request id, domain, address, identity, mechanism, credentials...]``,
        or None if that is not a ZAP 1.0 request."""
        if len(frames) < 6 or frames[0] != ZAP_VERSION:
            return None
        request_id, domain, address, _identity, mechanism = frames[1:6]
        return cls(request_id, domain, address.decode("ascii", "replace"), mechanism,
                   tuple(frames[6:]))  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """A ZAP answer: ``status`` 200 admits (as ``user_id``), 300 refuses for now, 400
    refuses, 500 says the request could not be judged. A refusal's log line is ``why``,
    limited per ``party`` (the refused key or address: one line per party per interval)."""

    status: int
    text: str
    user_id: str = ""
    why: str = ""
    party: str = ""

    @property
    def admitted(self) -> bool:
        return self.status == 200


def _refuse(text: str, why: str, party: str, status: int = 400) -> Verdict:
    return Verdict(status, text, why=why, party=party)


@dataclass
class ZapPolicy:
    """What a handler admits. ``allow`` judges ipc credentials (uid, gid, pid) and returns
    a refusal or None (no ``allow``: mechanism NULL is refused); ``curve_clients`` are the
    z85 public keys admitted over CURVE, each with its name (None: CURVE is refused);
    ``counters`` caps the connections of the socket whose ZAP domain is the key."""

    allow: Callable[[int, int, int], str | None] | None = None
    curve_clients: Mapping[str, str] | None = None
    counters: dict[bytes, ConnectionCounter] = field(default_factory=dict)

    def decide(self, request: ZapRequest) -> Verdict:
        where = request.address
        counter = self.counters.get(request.domain)
        if counter is not None and counter.full():
            text = f"too many {counter.name} connections ({counter.limit})"
            return _refuse(text, f"{where}: {text}", counter.name, status=300)
        if request.mechanism == b"NULL" and self.allow is not None:
            return self._ipc(request)
        if request.mechanism == b"CURVE" and self.curve_clients is not None:
            return self._curve(request, self.curve_clients)
        mechanism = request.mechanism.decode("ascii", "replace")
        wanted = "CURVE" if self.allow is None else "NULL (ipc)"
        if self.curve_clients is not None and self.allow is not None:
            wanted = "NULL (ipc) or CURVE"
        return _refuse(f"{wanted} only", f"{where}: mechanism {mechanism}, not {wanted}", where)

    def _ipc(self, request: ZapRequest) -> Verdict:
        assert self.allow is not None
        where = request.address
        creds = _ipc_credentials(where)
        if creds is None:
            text = "no credentials (only ipc clients may connect without CURVE)"
            return _refuse(text, f"{where}: {text}", where)
        uid, gid, pid = creds
        refusal = self.allow(uid, gid, pid)
        if refusal is not None:
            return _refuse(refusal, f"{where}: {refusal}", refusal)
        return Verdict(200, "OK", f"uid:{uid}")

    @staticmethod
    def _curve(request: ZapRequest, allowed: Mapping[str, str]) -> Verdict:
        where = request.address
        if len(request.credentials) != 1 or len(request.credentials[0]) != CURVE_KEY_BYTES:
            return _refuse("bad CURVE credentials", f"{where}: bad CURVE credentials", where)
        key = z85.encode(request.credentials[0]).decode("ascii")
        if key not in allowed:
            why = f"{where}: public key {key} is not in the allow directory"
            return _refuse("key not allowed", why, key)
        return Verdict(200, "OK", key)


def _ipc_credentials(address: str) -> tuple[int, int, int] | None:
    """(uid, gid, pid) from libzmq's ipc peer address ``...:uid:gid:pid``."""
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def answer(
    frames: list[bytes], policy: ZapPolicy, label: str = "zap"
) -> tuple[list[bytes], Verdict]:
    """The reply to one ZAP request (its envelope removed), and the verdict."""
    request = ZapRequest.parse(frames)
    if request is None:
        verdict = Verdict(500, "bad ZAP request")
        request_id = frames[1] if len(frames) > 1 else b""
    else:
        request_id = request.request_id
        try:
            verdict = policy.decide(request)
        except Exception as exc:
            log.error("%s: the access check failed (%s); refusing", label, exc)
            verdict = Verdict(500, "internal error")
    reply = [ZAP_VERSION, request_id, str(verdict.status).encode(), verdict.text.encode(),
             verdict.user_id.encode(), b""]  # fmt: skip
    return reply, verdict


class ZapHandler:
    """The ZAP handler of one zmq context. Construction binds its socket (synchronously,
    so that a socket bound afterwards is never without it: libzmq queues the requests
    until :meth:`serve` answers them); :meth:`close` when done. Refusals are logged as
    ``LABEL: refused a connection from WHY``, at most one line per refused party per
    ``log_interval`` seconds."""

    def __init__(
        self,
        context: zmq.Context[Any],
        policy: ZapPolicy,
        label: str,
        logger: logging.Logger = log,
        log_interval: float = 1.0,
    ) -> None:
        self.policy = policy
        self.label = label
        self._refusals = LogLimiter(logger, log_interval)
        self._sock = TrioSocket(context.socket(zmq.ROUTER))
        try:
            self._sock.socket.setsockopt(zmq.LINGER, 0)
            self._sock.socket.bind(ZAP_ENDPOINT)
        except BaseException:
            self._sock.close()
            raise

    async def serve(self) -> None:
        """Answer ZAP requests until cancelled."""
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            # [routing id, b"", the request...]: anything else cannot be answered
            if len(frames) < 3 or frames[1] != b"":
                continue
            reply, verdict = answer(frames[2:], self.policy, self.label)
            if verdict.why:
                line = "%s: refused a connection from %s"
                self._refusals.log(verdict.party, logging.WARNING, line, self.label, verdict.why)
            sock.try_send_multipart([frames[0], b"", *reply])

    def close(self) -> None:
        self._sock.close()
