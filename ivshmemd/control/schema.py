"""The control plane's schema: requests, replies and events, pure and synchronous.

As h11 keeps HTTP apart from sockets, this module holds no socket and no trio object: the
server (:mod:`ivshmemd.control.server`) and the client (:mod:`ivshmemd.control.client`)
move its bytes. :func:`handle_request` turns the raw bytes of one request into the raw bytes
of its reply and never raises; :func:`encode_request`, :func:`decode_reply`,
:func:`decode_event` and :class:`SequenceTracker` are the client's side.

Wire format (schema version 1, every message a msgpack map)::

    request   {"v": 1, "cmd": "status" | "peers" | "stats" | "kick", "args": {...}}
    reply     {"v": 1, "ok": true, "result": {...}}
              {"v": 1, "ok": false, "error": {"code": "...", "message": "..."}}
    event     two frames: topic (the event kind) and
              {"v": 1, "seq": n, "event": "...", "peer_id": id, "vectors": n, "time": unix_s,
               "reason": text (optional), "boot": daemon instance id (optional),
               "member": identity (optional), "endpoint": text (optional),
               "id_range": [lo, hi] (optional)}

Event kinds: ``peer-joined`` and ``peer-left`` (a peer of this daemon, or of a federation
member: then ``member`` names that member), and ``member-joined``, ``member-left`` and
``member-refused`` (a daemon of the federation: ``member``, its ``endpoint`` and
``id_range``; ``peer_id`` is null and ``vectors`` 0; ``reason`` says why it left or was
refused, a refusal naming both values).

The events socket greets every new subscriber with the one-frame message
:data:`EVENTS_WELCOME`, so a subscriber knows when its subscription is live.

A bad request (not msgpack, not a map, keys that are not strings, wrong types, unknown
command, larger than :data:`MAX_REQUEST_BYTES`) gets an error reply with a code. ``kick``
needs the daemon's uid or root: the requester's uid is the transport's to tell
(``SO_PEERCRED`` over ipc, :func:`parse_peer_address`), never over tcp.

Endpoints follow one convention, shared by the daemon and its clients: ``SOCK.ctl`` and
``SOCK.events`` beside the daemon's unix socket (:func:`default_control_endpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Final, Protocol

import msgpack

from ivshmemd.protocol import MAX_PEER_ID, MAX_VECTORS

__all__ = [
    "COMMANDS",
    "EVENTS_WELCOME",
    "EVENT_KINDS",
    "MAX_REQUEST_BYTES",
    "MEMBER_EVENT_KINDS",
    "PEER_EVENT_KINDS",
    "SCHEMA_VERSION",
    "ControlError",
    "ControlView",
    "Credentials",
    "ErrorCode",
    "Event",
    "RequestRefused",
    "SchemaError",
    "SequenceTracker",
    "decode_event",
    "decode_reply",
    "default_control_endpoint",
    "default_events_endpoint",
    "encode_request",
    "error_reply",
    "events_endpoint_for",
    "handle_request",
    "parse_peer_address",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
#: Requests above this size get a ``too-large`` error reply.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: The one-frame message every new events subscriber receives first.
EVENTS_WELCOME: Final = b"ivshmem-events-v1"

COMMANDS: Final = ("status", "peers", "kick", "stats", "departure", "ring", "dump", "upgrade")
#: events about one peer (local, or a federation member's)
PEER_EVENT_KINDS: Final = ("peer-joined", "peer-left")
#: events about a federation member (another daemon)
MEMBER_EVENT_KINDS: Final = ("member-joined", "member-left", "member-refused")
EVENT_KINDS: Final = (*PEER_EVENT_KINDS, *MEMBER_EVENT_KINDS)


class ErrorCode:
    """The ``error.code`` strings a reply can carry."""

    TOO_LARGE: Final = "too-large"
    BAD_MSGPACK: Final = "bad-msgpack"
    BAD_REQUEST: Final = "bad-request"
    UNSUPPORTED_VERSION: Final = "unsupported-version"
    UNKNOWN_COMMAND: Final = "unknown-command"
    BAD_ARGS: Final = "bad-args"
    PERMISSION_DENIED: Final = "permission-denied"
    NO_SUCH_PEER: Final = "no-such-peer"
    NO_SUCH_VECTOR: Final = "no-such-vector"
    INTERNAL: Final = "internal"


class ControlView(Protocol):
    """What the daemon exposes to the control plane. Every method is called from the trio
    thread, between two awaits, and must not block.

    - ``status()``: ``version``, ``uptime`` (s), ``shm`` (``{"name", "path", "size"}``),
      ``vectors``, ``peers`` (count), ``limits`` (a map), plus anything else useful.
    - ``peers()``: one map per peer: ``id``, ``pid``, ``uid``, ``gid``, ``connected_at``
      (unix time), ``vectors``.
    - ``kick(peer_id, reason)``: disconnect that peer (the others get the leave notice),
      giving ``reason`` as the departure's; False if there is no such peer.
    - ``stats()``: counters: ``joins``, ``leaves``, ``refusals``, ``messages_sent``,
      ``slow_disconnects``.
    - ``departure(peer_id)``: how a peer that left recently left (``{"id", "reason",
      "time"}``), None if none is known: a disconnected peer asks why.
    - ``ring(peer_id, vector)``: write that peer's eventfd of ``vector`` (a doorbell rung
      from the command line); raises :class:`RequestRefused` (no such peer or vector).
    - ``dump()``: the fds as the daemon holds them: ``{"shm": {"fd", "size", ...},
      "peers": [{"id", "eventfds": [fd per vector]}]}``.
    - ``upgrade()``: start an upgrade in place (:mod:`ivshmemd.upgrade`); returns how
      upgrades stand (``{"running", "done", "failed", "last_error"}``; ``status`` repeats it
      as ``upgrades``), or raises :class:`RequestRefused`.
    - ``owner_uid``: the daemon's uid, which may kick, ring and upgrade (as may root).
    """

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def kick(self, peer_id: int, reason: str) -> bool: ...

    def stats(self) -> dict[str, int]: ...

    def departure(self, peer_id: int) -> dict[str, Any] | None: ...

    def ring(self, peer_id: int, vector: int) -> None: ...

    def dump(self) -> dict[str, Any]: ...

    def upgrade(self) -> dict[str, Any]: ...

    @property
    def owner_uid(self) -> int: ...


class SchemaError(Exception):
    """A reply or event that does not follow the schema (client side). Not to be confused
    with :class:`ivshmemd.protocol.ProtocolError`, the peers' protocol."""


class ControlError(Exception):
    """An error reply from the daemon (client side)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------


def default_control_endpoint(socket_path: str | os.PathLike[str]) -> str:
    """``ipc://<socket_path>.ctl``: next to the daemon's unix socket, so ``-S`` finds it."""
    return f"ipc://{os.path.abspath(os.fspath(socket_path))}.ctl"


def default_events_endpoint(socket_path: str | os.PathLike[str]) -> str:
    """``ipc://<socket_path>.events``: the peer event stream next to the daemon's socket."""
    return f"ipc://{os.path.abspath(os.fspath(socket_path))}.events"


def events_endpoint_for(control_endpoint: str) -> str:
    """The events endpoint that goes with a control endpoint by convention:
    ``ipc://X.ctl`` -> ``ipc://X.events``, ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+1``."""
    if control_endpoint.startswith("ipc://") and control_endpoint.endswith(".ctl"):
        return control_endpoint[: -len(".ctl")] + ".events"
    if control_endpoint.startswith("tcp://"):
        host, sep, port = control_endpoint[len("tcp://") :].rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65535:
            return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(
        f"cannot derive an events endpoint from {control_endpoint!r}; give it explicitly"
    )


# ---------------------------------------------------------------------------------------------
# Requester credentials
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Credentials:
    """SO_PEERCRED of the process that connected to the control socket."""

    pid: int
    uid: int
    gid: int


def parse_peer_address(peer_address: str | None) -> Credentials | None:
    """Credentials from libzmq's ``Peer-Address`` of an ipc connection.

    For unix-domain connections libzmq appends ``:uid:gid:pid`` (read with SO_PEERCRED when
    the connection was accepted) to the address, e.g. ``"localhost:1000:1000:4242"``. Only
    call this for ipc endpoints: a tcp IPv6 address also contains colons.
    """
    if not peer_address:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        uid, gid, pid = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    return Credentials(pid=pid, uid=uid, gid=gid)


# ---------------------------------------------------------------------------------------------
# Requests and replies (pure)
# ---------------------------------------------------------------------------------------------


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=True)


def _ok(result: Any) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "ok": True, "result": result})


def error_reply(code: str, message: str) -> bytes:
    """The bytes of an error reply."""
    return _pack({"v": SCHEMA_VERSION, "ok": False, "error": {"code": code, "message": message}})


class RequestRefused(Exception):
    """A request answered with an error reply of ``code`` (raised by the parser, the
    dispatcher, or a view)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _string_keys(mapping: Mapping[Any, Any], where: str) -> None:
    """A map whose keys are not all text (msgpack also has bytes keys) is a bad request,
    refused before anything compares or sorts its keys."""
    odd = [key for key in mapping if not isinstance(key, str)]
    if odd:
        raise RequestRefused(
            ErrorCode.BAD_REQUEST, f"{where} keys must be strings, got {odd[0]!r:.40}"
        )


def _no_args(args: Mapping[str, Any]) -> None:
    if args:
        raise RequestRefused(ErrorCode.BAD_ARGS, f"unexpected arguments: {sorted(args)}")


def _int_arg(args: Mapping[str, Any], name: str, top: int) -> int:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestRefused(ErrorCode.BAD_ARGS, f"args.{name} must be an integer")
    if not 0 <= value <= top:
        raise RequestRefused(ErrorCode.BAD_ARGS, f"args.{name} must be in 0..{top}")
    return value


def _peer_id_arg(cmd: str, args: Mapping[str, Any], optional: tuple[str, ...] = ()) -> int:
    extra = set(args) - {"id", *optional}
    if extra:
        raise RequestRefused(ErrorCode.BAD_ARGS, f"unexpected arguments: {sorted(extra)}")
    if "id" not in args:
        raise RequestRefused(ErrorCode.BAD_ARGS, f"{cmd} needs args.id (the peer id)")
    return _int_arg(args, "id", MAX_PEER_ID)


def _parse_request(raw: bytes) -> tuple[str, Mapping[str, Any]]:
    if len(raw) > MAX_REQUEST_BYTES:
        raise RequestRefused(
            ErrorCode.TOO_LARGE,
            f"request of {len(raw)} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit",
        )
    try:
        request = _unpack(raw)
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, ...)
        raise RequestRefused(
            ErrorCode.BAD_MSGPACK, f"request is not valid msgpack: {exc}"
        ) from None
    if not isinstance(request, dict):
        raise RequestRefused(
            ErrorCode.BAD_REQUEST, f"request must be a map, not {type(request).__name__}"
        )
    _string_keys(request, "request")
    version = request.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RequestRefused(ErrorCode.BAD_REQUEST, "request needs an integer schema version 'v'")
    if version != SCHEMA_VERSION:
        raise RequestRefused(
            ErrorCode.UNSUPPORTED_VERSION,
            f"schema version {version} is not supported (this daemon speaks {SCHEMA_VERSION})",
        )
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise RequestRefused(ErrorCode.BAD_REQUEST, "request needs a string 'cmd'")
    if cmd not in COMMANDS:
        raise RequestRefused(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})",
        )
    args = request.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestRefused(ErrorCode.BAD_ARGS, "'args' must be a map")
    _string_keys(args, "'args'")
    unknown = set(request) - {"v", "cmd", "args"}
    if unknown:
        raise RequestRefused(ErrorCode.BAD_REQUEST, f"unknown request fields: {sorted(unknown)}")
    return cmd, args


def _check_may_act(cmd: str, view: ControlView, requester_uid: int | None) -> None:
    """``kick``, ``ring`` and ``upgrade`` act on peers: the daemon's uid or root only."""
    if requester_uid is None or requester_uid not in (0, view.owner_uid):
        who = "an unknown uid" if requester_uid is None else f"uid {requester_uid}"
        raise RequestRefused(
            ErrorCode.PERMISSION_DENIED,
            f"{cmd} needs the daemon's uid ({view.owner_uid}) or root; request came from {who}",
        )


def _dispatch(
    cmd: str, args: Mapping[str, Any], view: ControlView, requester_uid: int | None
) -> Any:
    if cmd == "status":
        _no_args(args)
        return view.status()
    if cmd == "peers":
        _no_args(args)
        return {"peers": view.peers()}
    if cmd == "stats":
        _no_args(args)
        return view.stats()
    if cmd == "kick":
        peer_id = _peer_id_arg(cmd, args)
        _check_may_act(cmd, view, requester_uid)
        if not view.kick(peer_id, f"kicked by uid {requester_uid} (ivshmemctl kick)"):
            raise RequestRefused(ErrorCode.NO_SUCH_PEER, f"no peer with id {peer_id}")
        return {"kicked": peer_id}
    if cmd == "departure":
        peer_id = _peer_id_arg(cmd, args)
        departure = view.departure(peer_id)
        if departure is None:
            raise RequestRefused(ErrorCode.NO_SUCH_PEER, f"no departure known of peer {peer_id}")
        return departure
    if cmd == "ring":
        peer_id = _peer_id_arg(cmd, args, ("vector",))
        vector = _int_arg(args, "vector", MAX_VECTORS - 1) if "vector" in args else 0
        _check_may_act(cmd, view, requester_uid)
        view.ring(peer_id, vector)
        return {"rang": peer_id, "vector": vector}
    if cmd == "dump":
        _no_args(args)
        return view.dump()
    if cmd == "upgrade":
        _no_args(args)
        _check_may_act(cmd, view, requester_uid)
        return view.upgrade()
    raise RequestRefused(ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd!r}")  # pragma: no cover


def handle_request(raw: bytes, view: ControlView, requester_uid: int | None) -> bytes:
    """Answer one control request. Pure apart from calling ``view``; never raises.

    ``requester_uid`` is the uid of the requesting process when the transport can tell it
    (SO_PEERCRED over ipc), else None; None is never allowed to ``kick``.
    """
    try:
        cmd, args = _parse_request(raw)
        result = _dispatch(cmd, args, view, requester_uid)
        return _ok(result)
    except RequestRefused as bad:
        return error_reply(bad.code, bad.message)
    except Exception as exc:  # one line for the operator; the traceback only with -v
        log.error("control request failed inside the daemon: %s: %s", type(exc).__name__, exc)
        log.debug("control request failure", exc_info=True)
        return error_reply(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def encode_request(cmd: str, args: Mapping[str, Any] | None = None) -> bytes:
    """Client side: the bytes of one request."""
    request: dict[str, Any] = {"v": SCHEMA_VERSION, "cmd": cmd}
    if args:
        request["args"] = dict(args)
    return _pack(request)


def decode_reply(raw: bytes) -> Any:
    """Client side: the ``result`` of a reply; raises :class:`ControlError` for an error reply
    and :class:`SchemaError` for anything that is not a valid reply."""
    try:
        reply = _unpack(raw)
    except Exception as exc:
        raise SchemaError(f"reply is not valid msgpack: {exc}") from None
    if not isinstance(reply, dict) or reply.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"reply is not a schema-{SCHEMA_VERSION} map: {reply!r:.200}")
    if reply.get("ok") is True and "result" in reply:
        return reply["result"]
    error = reply.get("error")
    if reply.get("ok") is False and isinstance(error, dict):
        return_code = error.get("code")
        message = error.get("message")
        raise ControlError(str(return_code), str(message))
    raise SchemaError(f"malformed reply: {reply!r:.200}")


# ---------------------------------------------------------------------------------------------
# Events (pure encoding, plus a queue the serving task drains)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    """One event as published: ``seq`` starts at 1 and grows by 1 per event. A peer event
    has its ``peer_id``; a member event (:data:`MEMBER_EVENT_KINDS`) has none, and its
    ``member``, ``endpoint`` and ``id_range`` instead."""

    seq: int
    kind: str
    peer_id: int | None
    vectors: int
    time: float
    reason: str | None = None
    #: the daemon instance that published it (new at every start): a subscriber that sees
    #: it change knows the daemon restarted and its sequence numbers started again
    boot: str | None = None
    #: the federation member (another daemon's identity) the peer or the event is about
    member: str | None = None
    #: a member event: where the member listens, and the peer ids it serves
    endpoint: str | None = None
    id_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.id_range is not None:  # a list, from msgpack or a link
            object.__setattr__(self, "id_range", (int(self.id_range[0]), int(self.id_range[1])))

    def to_frames(self) -> tuple[bytes, bytes]:
        """The two zmq frames: topic and msgpack body."""
        return self.kind.encode(), _pack({"v": SCHEMA_VERSION, **self.to_dict()})

    def to_dict(self) -> dict[str, Any]:
        """The event's fields as the wire carries them (``reason`` and ``boot`` only when
        known): the msgpack body, and ``ivshmemctl watch --json``'s lines."""
        body: dict[str, Any] = {
            "seq": self.seq,
            "event": self.kind,
            "peer_id": self.peer_id,
            "vectors": self.vectors,
            "time": self.time,
        }
        for name in ("reason", "boot", "member", "endpoint", "id_range"):
            value = getattr(self, name)
            if value is not None:
                body[name] = list(value) if name == "id_range" else value
        return body


def _optional_text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    return None if value is None else str(value)


def _id_range(raw: Any) -> tuple[int, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise ValueError(f"id_range must be [lo, hi], not {raw!r:.40}")
    return int(raw[0]), int(raw[1])


def decode_event(frames: list[bytes]) -> Event:
    """Client side: an :class:`Event` from the frames of one events message."""
    if len(frames) != 2:
        raise SchemaError(f"an event has 2 frames, got {len(frames)}")
    try:
        body = _unpack(frames[1])
    except Exception as exc:
        raise SchemaError(f"event body is not valid msgpack: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"event is not a schema-{SCHEMA_VERSION} map")
    try:
        kind = str(body["event"])
        raw_peer = body["peer_id"] if kind in PEER_EVENT_KINDS else body.get("peer_id")
        event = Event(
            seq=int(body["seq"]),
            kind=kind,
            peer_id=None if raw_peer is None else int(raw_peer),
            vectors=int(body["vectors"]),
            time=float(body["time"]),
            reason=_optional_text(body, "reason"),
            boot=_optional_text(body, "boot"),
            member=_optional_text(body, "member"),
            endpoint=_optional_text(body, "endpoint"),
            id_range=_id_range(body.get("id_range")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"event lacks a field or has a wrong type: {exc}") from None
    if event.kind in PEER_EVENT_KINDS and event.peer_id is None:
        raise SchemaError(f"a {event.kind} event needs a peer_id")
    if event.kind.encode() != frames[0]:
        raise SchemaError(f"event topic {frames[0]!r} does not match {event.kind!r}")
    return event


class SequenceTracker:
    """Client side: notices gaps in the event sequence numbers, and a new daemon instance
    (its events carry another :attr:`Event.boot`, their numbers start again at 1)."""

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.boot: str | None = None
        self.missed = 0
        #: new daemon instances seen since the first event
        self.restarts = 0

    def observe(self, seq: int, boot: str | None = None) -> tuple[int, int] | None:
        """Record ``seq``; returns the missing range ``(first, last)`` if there is a gap.

        The first event seen starts the sequence (a subscriber that joins late has no gap).
        An event of a new daemon instance starts afresh from 1 (events 1..seq-1 of the new
        instance were missed); so does a sequence number that goes backwards, from a daemon
        that does not say its instance.
        """
        if boot is not None and self.boot is not None and boot != self.boot:
            self.restart(boot, 0)
        elif boot is not None:
            self.boot = boot
        elif self.last_seq is not None and seq <= self.last_seq:
            self.last_seq = None  # backwards, from a daemon that does not say its instance
        gap: tuple[int, int] | None = None
        if self.last_seq is not None and seq > self.last_seq + 1:
            gap = (self.last_seq + 1, seq - 1)
            self.missed += seq - 1 - self.last_seq
        if self.last_seq is None or seq > self.last_seq:
            self.last_seq = seq
        return gap

    def restart(self, boot: str, seq: int) -> None:
        """A new daemon instance ``boot`` whose last event so far is ``seq``."""
        self.restarts += 1
        self.boot = boot
        self.last_seq = seq
