"""The daemon as the control plane sees it: :class:`ivshmemd.control.schema.ControlView` over
a server.

Read-only snapshots (status, peers, stats) plus ``kick``; the permission check for ``kick``
is the control plane's (:mod:`ivshmemd.control.schema`), the leave notices are the server's.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any, Final, Protocol

from ivshmemd import __version__
from ivshmemd.server import IvshmemServer, fd_limit
from ivshmemd.wording import plural

from .schema import ErrorCode, RequestRefused
from .server import EventPublisher

__all__ = ["MAX_DEPARTURES", "DaemonControlView", "FederationStatus", "state_lines"]

#: departures remembered for ``departure`` requests (ids only grow: the oldest go first)
MAX_DEPARTURES: Final = 4096


class FederationStatus(Protocol):
    """The daemon's federation as the control plane shows it
    (:class:`ivshmemd.fedproc.FederationProcess`)."""

    def status(self) -> dict[str, Any]: ...


class DaemonControlView:
    """Answers ``status``, ``peers``, ``stats`` and ``kick`` for one running server (and
    its federation, if it has one: members in ``status``, remote peers in ``peers``)."""

    def __init__(
        self,
        server: IvshmemServer,
        socket_path: str,
        publisher: EventPublisher | None = None,
        federation: FederationStatus | None = None,
    ) -> None:
        self.server = server
        self.socket_path = socket_path
        self.publisher = publisher
        self.federation = federation
        #: recent departures, oldest first: peer id -> {"id", "reason", "time"}
        self.departures: OrderedDict[int, dict[str, Any]] = OrderedDict()
        #: the daemon's :class:`ivshmemd.upgrade.Upgrader` once it serves (``upgrade``)
        self.upgrader: Any = None
        server.listeners.append(self._on_server_event)

    def upgrade(self) -> dict[str, Any]:
        """Start an upgrade in place; how upgrades stand."""
        if self.upgrader is None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, "this daemon cannot upgrade yet")
        result: dict[str, Any] = self.upgrader.request()
        return result

    def _on_server_event(self, kind: str, event: dict[str, Any]) -> None:
        if kind != "peer-left":
            return
        peer_id = int(event["peer_id"])
        reason = event.get("reason")
        self.departures[peer_id] = {
            "id": peer_id,
            "reason": "disconnected" if reason is None else str(reason),
            "time": time.time(),
        }
        while len(self.departures) > MAX_DEPARTURES:
            self.departures.popitem(last=False)

    def status(self) -> dict[str, Any]:
        """Version, uptime, shm, vectors, peer count and limits; the federation (members:
        endpoint, id range, state, last heard, round trip; refusals) if there is one."""
        server, shm = self.server, self.server.shm
        federation = {} if self.federation is None else {"federation": self.federation.status()}
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - server.started_at,
            "socket": self.socket_path,
            "shm": {"name": shm.name, "path": shm.path, "size": shm.size},
            "vectors": server.config.n_vectors,
            "peers": len(server.connections),
            **self._events(),
            **({} if self.upgrader is None else {"upgrades": self.upgrader.status()}),
            "limits": {
                "max_peers": server.config.max_peers,
                "send_timeout": server.config.send_timeout,
                "fds": fd_limit(),
                "fds_in_use": server.fds_in_use(),
                "fd_reserve": server.config.fd_reserve,
                **_flight(server),
            },
            **federation,
        }

    def peers(self) -> list[dict[str, Any]]:
        """One entry per peer, in id order: id, pid/uid/gid, connect time, vectors; a
        federation member's peer has no pid/uid/gid but its ``member`` (that daemon)."""
        server = self.server
        found = [
            {"id": peer_id, "vectors": len(conn.peer.vectors), **conn.peer.info}
            for peer_id, conn in server.connections.items()
        ]
        for peer_id, member in server.remote.items():
            peer = server.registry.get(peer_id)
            if peer is not None:
                found.append(
                    {"id": peer_id, "vectors": len(peer.vectors), **peer.info, "member": member}
                )
        return sorted(found, key=lambda entry: int(entry["id"]))

    def _events(self) -> dict[str, Any]:
        """The event stream's instance id and last sequence number (a subscriber that
        reconnects learns from them whether the daemon restarted and what it missed)."""
        if self.publisher is None:
            return {}
        return {"boot": self.publisher.boot, "events_seq": self.publisher.last_seq}

    def kick(self, peer_id: int, reason: str) -> bool:
        """Disconnect a peer (the others are told); False if there is no such peer."""
        return self.server.kick(peer_id, reason=reason)

    def departure(self, peer_id: int) -> dict[str, Any] | None:
        """How a recently departed peer left, or None."""
        return self.departures.get(peer_id)

    def ring(self, peer_id: int, vector: int) -> None:
        """Ring a peer's doorbell: add 1 to its eventfd of ``vector``, as another peer
        would (the eventfd is non-blocking: a counter at its maximum is refused)."""
        conn = self.server.connections.get(peer_id)
        if conn is None:
            raise RequestRefused(ErrorCode.NO_SUCH_PEER, f"no peer with id {peer_id}")
        vectors = conn.peer.vectors
        if vector >= len(vectors):
            raise RequestRefused(
                ErrorCode.NO_SUCH_VECTOR,
                f"peer {peer_id} has {plural(len(vectors), 'vector')} (0..{len(vectors) - 1}),"
                f" not {vector}",
            )
        try:
            os.eventfd_write(vectors[vector].fd, 1)
        except BlockingIOError:
            raise RequestRefused(
                ErrorCode.BAD_ARGS, f"peer {peer_id} vector {vector}: its eventfd is full"
            ) from None

    def dump(self) -> dict[str, Any]:
        """The fds as the daemon holds them: what a peer joining now would receive (the
        shm fd, then every peer's eventfds, one per vector)."""
        shm = self.server.shm
        return {
            "shm": {"fd": shm.fd, "size": shm.size, "name": shm.name, "path": shm.path},
            "vectors": self.server.config.n_vectors,
            "peers": [
                {"id": peer_id, "eventfds": [shared.fd for shared in conn.peer.vectors]}
                for peer_id, conn in sorted(self.server.connections.items())
            ],
        }

    def stats(self) -> dict[str, int]:
        """The server's counters."""
        return self.server.stats.as_dict()

    @property
    def owner_uid(self) -> int:
        """The daemon's uid: it (and root) may kick."""
        return os.getuid()


def _flight(server: IvshmemServer) -> dict[str, int]:
    flight = server.config.flight
    if flight is None:
        return {}
    return {"fds_in_flight": flight.total, "fds_in_flight_limit": flight.limit}


def state_lines(server: IvshmemServer, control_pid: int | None, restarts: int) -> list[str]:
    """The daemon's state in a few log lines (SIGUSR1)."""
    conns = server.connections
    queued = sorted(((c.outbox.messages, pid) for pid, c in conns.items()), reverse=True)
    busiest = ", ".join(f"peer {pid}: {n}" for n, pid in queued[:3] if n) or "none"
    flight = server.config.flight
    in_flight = (
        "no in-flight limit (privileged)"
        if flight is None
        else f"{flight.total} fds in flight of {flight.limit} (window {flight.window})"
    )
    control = "none" if control_pid is None else f"pid {control_pid}, {plural(restarts, 'restart')}"
    return [
        f"state: {plural(len(conns), 'peer')} (ids {', '.join(map(str, sorted(conns))) or 'none'})",
        f"state: fds {server.fds_in_use()} in use of {fd_limit()} ({server.config.fd_reserve} "
        f"kept free); {in_flight}; {len(server.lingering)} dropped clients still reading",
        f"state: queued messages per peer, largest: {busiest}",
        "state: " + ", ".join(f"{k} {v}" for k, v in server.stats.as_dict().items()),
        f"state: control plane process: {control}",
    ]
