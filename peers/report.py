"""The peer's ``--report json`` events: the one schema of what a peer says on stdout.

``ivshmem-peer --report json`` prints one JSON object per line, ``{"event": KIND, ...}``.
Each kind the runtime itself reports is a frozen dataclass here (as h11 does with its
events): :class:`Running`, :class:`Log`, :class:`Finished`, :class:`Stopped`,
:class:`ServerGone`, :class:`Reconnecting`, :class:`Error`, :class:`PeerJoined`,
:class:`PeerLeft`, :class:`Waiting`, :class:`Progress`, :class:`Paired`. A plugin's own
events (``guest.report(event="ring", ...)``) are a :class:`PluginEvent` (its kind and
fields), and so is any line of another kind.

:func:`encode` turns an event into its line (the peer's side); :func:`decode` turns a parsed
object back into an event (the launcher's, the fixtures' and the benchmarks' side) and
raises :class:`ReportError` when a known kind lacks a field or has one of the wrong type.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeAlias, TypeVar

__all__ = [
    "KINDS",
    "Error",
    "Event",
    "Finished",
    "Log",
    "Paired",
    "PeerJoined",
    "PeerLeft",
    "PluginEvent",
    "Progress",
    "Reconnecting",
    "ReportError",
    "Running",
    "ServerGone",
    "Stopped",
    "Waiting",
    "decode",
    "decode_as",
    "encode",
]


class ReportError(ValueError):
    """An event object that does not fit the schema."""


@dataclass(frozen=True, slots=True)
class Running:
    """The peer is connected, its VM built, its plugin started: it has its id."""

    KIND: ClassVar = "running"
    peer_id: int
    pid: int
    shm_size: int
    vectors: int
    peers: tuple[int, ...]
    loop: str


@dataclass(frozen=True, slots=True)
class Log:
    """A log line (what the human report prints on stderr)."""

    KIND: ClassVar = "log"
    message: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The plugin finished: ``ok`` or failed, with its one-line summary."""

    KIND: ClassVar = "finished"
    ok: bool
    summary: str | None


@dataclass(frozen=True, slots=True)
class Stopped:
    """A signal stopped the peer cleanly (the signal's name)."""

    KIND: ClassVar = "stopped"
    signal: str


@dataclass(frozen=True, slots=True)
class ServerGone:
    """The daemon went away (the peer exits, or reconnects with ``--reconnect``)."""

    KIND: ClassVar = "server-gone"
    message: str


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """``--reconnect``: connecting again after the daemon went away."""

    KIND: ClassVar = "reconnecting"


@dataclass(frozen=True, slots=True)
class Error:
    """The peer could not run (no daemon, a protocol error); it exits 1."""

    KIND: ClassVar = "error"
    message: str


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """The daemon announced another peer."""

    KIND: ClassVar = "peer-joined"
    peer_id: int


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """Another peer left."""

    KIND: ClassVar = "peer-left"
    peer_id: int


@dataclass(frozen=True, slots=True)
class Waiting:
    """What the peer waits for now (``guest.waiting(...)``; the runtime says it too while
    it seeks a partner): ``ivshmemctl up`` names it for a peer still running when it
    stops."""

    KIND: ClassVar = "waiting"
    what: str


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the plugin's work is: ``done`` of ``total`` ``unit`` (``guest.progress``)."""

    KIND: ClassVar = "progress"
    done: int
    total: int
    unit: str


@dataclass(frozen=True, slots=True)
class Paired:
    """The peer found its partner (``guest.find_partner``): the pairing key, the partner,
    whether we lead (speak first), and the pair's region (offset and size, 0 if none)."""

    KIND: ClassVar = "paired"
    key: str
    partner: int
    leader: bool
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class PluginEvent:
    """A plugin's own event (``guest.report(event=kind, **fields)``)."""

    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)


Event: TypeAlias = (
    Running
    | Log
    | Finished
    | Stopped
    | ServerGone
    | Reconnecting
    | Error
    | PeerJoined
    | PeerLeft
    | Waiting
    | Progress
    | Paired
)
_RUNTIME: Final = (Running, Log, Finished, Stopped, ServerGone, Reconnecting, Error, PeerJoined,
                   PeerLeft, Waiting, Progress, Paired)  # fmt: skip
#: The runtime's event kinds and their classes.
KINDS: Final[dict[str, type[Event]]] = {cls.KIND: cls for cls in _RUNTIME}
#: JSON types a field may have, by its annotation.
_JSON_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "int": (int,),
    "str": (str,),
    "bool": (bool,),
    "str | None": (str, type(None)),
    "tuple[int, ...]": (list, tuple),
}


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    """``value`` is one of ``allowed`` (a bool is not taken for an int, nor the reverse)."""
    return isinstance(value, allowed) and (bool in allowed) == isinstance(value, bool)


def encode(event: Event | PluginEvent) -> str:
    """The event's JSON line (without the newline)."""
    if isinstance(event, PluginEvent):
        if event.kind in KINDS:
            raise ReportError(f"a plugin event cannot use the runtime's kind {event.kind!r}")
        return json.dumps({"event": event.kind, **event.fields})
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    return json.dumps({"event": event.KIND, **fields})


def decode(obj: Mapping[str, Any]) -> Event | PluginEvent:
    """The event a parsed JSON object stands for."""
    kind = obj.get("event")
    if not isinstance(kind, str):
        raise ReportError(f"an event needs an 'event' kind: {dict(obj)!r}")
    cls = KINDS.get(kind)
    if cls is None:
        return PluginEvent(kind, {k: v for k, v in obj.items() if k != "event"})
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        value = obj.get(spec.name)
        allowed = _JSON_TYPES[str(spec.type)]
        if not _fits(value, allowed) or (
            isinstance(value, list | tuple) and not all(_fits(v, (int,)) for v in value)
        ):
            raise ReportError(f"{kind!r} event: bad {spec.name!r}: {value!r}")
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


E = TypeVar("E", bound=Event | PluginEvent)


def decode_as(obj: Mapping[str, Any], cls: type[E]) -> E:
    """The event ``obj`` stands for, which must be a ``cls``."""
    event = decode(obj)
    if not isinstance(event, cls):
        raise ReportError(f"expected a {cls.__name__} event, got {dict(obj)!r}")
    return event
