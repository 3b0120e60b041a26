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
    event     two frames: topic (b"peer-joined" | b"peer-left") and
              {"v": 1, "seq": n, "event": "...", "peer_id": id, "vectors": n, "time": unix_s}

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

from ivshmemd.protocol import MAX_PEER_ID

__all__ = [
    "COMMANDS",
    "EVENTS_WELCOME",
    "EVENT_KINDS",
    "MAX_REQUEST_BYTES",
    "SCHEMA_VERSION",
    "ControlError",
    "ControlView",
    "Credentials",
    "ErrorCode",
    "Event",
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

COMMANDS: Final = ("status", "peers", "kick", "stats")
EVENT_KINDS: Final = ("peer-joined", "peer-left")


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
    INTERNAL: Final = "internal"


class ControlView(Protocol):
    """What the daemon exposes to the control plane. Every method is called from the trio
    thread, between two awaits, and must not block.

    - ``status()``: ``version``, ``uptime`` (s), ``shm`` (``{"name", "path", "size"}``),
      ``vectors``, ``peers`` (count), ``limits`` (a map), plus anything else useful.
    - ``peers()``: one map per peer: ``id``, ``pid``, ``uid``, ``gid``, ``connected_at``
      (unix time), ``vectors``.
    - ``kick(peer_id)``: disconnect that peer (the others get the leave notice); False if
      there is no such peer.
    - ``stats()``: counters: ``joins``, ``leaves``, ``refusals``, ``messages_sent``,
      ``slow_disconnects``.
    - ``owner_uid``: the daemon's uid, which may kick (as may root).
    """

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def kick(self, peer_id: int) -> bool: ...

    def stats(self) -> dict[str, int]: ...

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


class _BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _string_keys(mapping: Mapping[Any, Any], where: str) -> None:
    """A map whose keys are not all text (msgpack also has bytes keys) is a bad request,
    refused before anything compares or sorts its keys."""
    odd = [key for key in mapping if not isinstance(key, str)]
    if odd:
        raise _BadRequest(
            ErrorCode.BAD_REQUEST, f"{where} keys must be strings, got {odd[0]!r:.40}"
        )


def _no_args(args: Mapping[str, Any]) -> None:
    if args:
        raise _BadRequest(ErrorCode.BAD_ARGS, f"unexpected arguments: {sorted(args)}")


def _kick_peer_id(args: Mapping[str, Any]) -> int:
    extra = set(args) - {"id"}
    if extra:
        raise _BadRequest(ErrorCode.BAD_ARGS, f"unexpected arguments: {sorted(extra)}")
    if "id" not in args:
        raise _BadRequest(ErrorCode.BAD_ARGS, "kick needs args.id (the peer id)")
    peer_id = args["id"]
    if isinstance(peer_id, bool) or not isinstance(peer_id, int):
        raise _BadRequest(ErrorCode.BAD_ARGS, "args.id must be an integer")
    if not 0 <= peer_id <= MAX_PEER_ID:
        raise _BadRequest(ErrorCode.BAD_ARGS, f"args.id must be in 0..{MAX_PEER_ID}")
    return peer_id


def _parse_request(raw: bytes) -> tuple[str, Mapping[str, Any]]:
    if len(raw) > MAX_REQUEST_BYTES:
        raise _BadRequest(
            ErrorCode.TOO_LARGE,
            f"request of {len(raw)} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit",
        )
    try:
        request = _unpack(raw)
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, ...)
        raise _BadRequest(ErrorCode.BAD_MSGPACK, f"request is not valid msgpack: {exc}") from None
    if not isinstance(request, dict):
        raise _BadRequest(
            ErrorCode.BAD_REQUEST, f"request must be a map, not {type(request).__name__}"
        )
    _string_keys(request, "request")
    version = request.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _BadRequest(ErrorCode.BAD_REQUEST, "request needs an integer schema version 'v'")
    if version != SCHEMA_VERSION:
        raise _BadRequest(
            ErrorCode.UNSUPPORTED_VERSION,
            f"schema version {version} is not supported (this daemon speaks {SCHEMA_VERSION})",
        )
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise _BadRequest(ErrorCode.BAD_REQUEST, "request needs a string 'cmd'")
    if cmd not in COMMANDS:
        raise _BadRequest(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})",
        )
    args = request.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _BadRequest(ErrorCode.BAD_ARGS, "'args' must be a map")
    _string_keys(args, "'args'")
    unknown = set(request) - {"v", "cmd", "args"}
    if unknown:
        raise _BadRequest(ErrorCode.BAD_REQUEST, f"unknown request fields: {sorted(unknown)}")
    return cmd, args


def _may_kick(view: ControlView, requester_uid: int | None) -> bool:
    return requester_uid is not None and requester_uid in (0, view.owner_uid)


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
        peer_id = _kick_peer_id(args)
        if not _may_kick(view, requester_uid):
            who = "an unknown uid" if requester_uid is None else f"uid {requester_uid}"
            raise _BadRequest(
                ErrorCode.PERMISSION_DENIED,
                f"kick needs the daemon's uid ({view.owner_uid}) or root; request came from {who}",
            )
        if not view.kick(peer_id):
            raise _BadRequest(ErrorCode.NO_SUCH_PEER, f"no peer with id {peer_id}")
        return {"kicked": peer_id}
    raise _BadRequest(ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd!r}")  # pragma: no cover


def handle_request(raw: bytes, view: ControlView, requester_uid: int | None) -> bytes:
    """Answer one control request. Pure apart from calling ``view``; never raises.

    ``requester_uid`` is the uid of the requesting process when the transport can tell it
    (SO_PEERCRED over ipc), else None; None is never allowed to ``kick``.
    """
    try:
        cmd, args = _parse_request(raw)
        result = _dispatch(cmd, args, view, requester_uid)
        return _ok(result)
    except _BadRequest as bad:
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
    """One peer event as published: ``seq`` starts at 1 and grows by 1 per event."""

    seq: int
    kind: str
    peer_id: int
    vectors: int
    time: float
    reason: str | None = None

    def to_frames(self) -> tuple[bytes, bytes]:
        """The two zmq frames: topic and msgpack body."""
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "seq": self.seq,
            "event": self.kind,
            "peer_id": self.peer_id,
            "vectors": self.vectors,
            "time": self.time,
        }
        if self.reason is not None:
            body["reason"] = self.reason
        return self.kind.encode(), _pack(body)


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
        event = Event(
            seq=int(body["seq"]),
            kind=str(body["event"]),
            peer_id=int(body["peer_id"]),
            vectors=int(body["vectors"]),
            time=float(body["time"]),
            reason=None if body.get("reason") is None else str(body["reason"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"event lacks a field or has a wrong type: {exc}") from None
    if event.kind.encode() != frames[0]:
        raise SchemaError(f"event topic {frames[0]!r} does not match {event.kind!r}")
    return event


class SequenceTracker:
    """Client side: notices gaps in the event sequence numbers."""

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.missed = 0

    def observe(self, seq: int) -> tuple[int, int] | None:
        """Record ``seq``; returns the missing range ``(first, last)`` if there is a gap.

        The first event seen starts the sequence (a subscriber that joins late has no gap).
        A sequence number that goes backwards (the daemon restarted) also starts afresh.
        """
        gap: tuple[int, int] | None = None
        if self.last_seq is not None and seq > self.last_seq + 1:
            gap = (self.last_seq + 1, seq - 1)
            self.missed += seq - 1 - self.last_seq
        self.last_seq = seq
        return gap
