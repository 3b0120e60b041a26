"""The daemon as the control plane sees it: :class:`ivshmemd.control.schema.ControlView` over
a server.

Read-only snapshots (status, peers, stats) plus ``kick``; the permission check for ``kick``
is the control plane's (:mod:`ivshmemd.control.schema`), the leave notices are the server's.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ivshmemd import __version__
from ivshmemd.server import IvshmemServer, fd_limit

__all__ = ["DaemonControlView", "state_lines"]


class DaemonControlView:
    """Answers ``status``, ``peers``, ``stats`` and ``kick`` for one running server."""

    def __init__(self, server: IvshmemServer, socket_path: str) -> None:
        self.server = server
        self.socket_path = socket_path

    def status(self) -> dict[str, Any]:
        """Version, uptime, shm, vectors, peer count and limits."""
        server, shm = self.server, self.server.shm
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - server.started_at,
            "socket": self.socket_path,
            "shm": {"name": shm.name, "path": shm.path, "size": shm.size},
            "vectors": server.config.n_vectors,
            "peers": len(server.connections),
            "limits": {
                "max_peers": server.config.max_peers,
                "send_timeout": server.config.send_timeout,
                "fds": fd_limit(),
                "fds_in_use": server.fds_in_use(),
                "fd_reserve": server.config.fd_reserve,
                **_flight(server),
            },
        }

    def peers(self) -> list[dict[str, Any]]:
        """One entry per peer, in id order: id, pid/uid/gid, connect time, vectors."""
        return [
            {"id": peer_id, "vectors": len(conn.peer.vectors), **conn.peer.info}
            for peer_id, conn in sorted(self.server.connections.items())
        ]

    def kick(self, peer_id: int) -> bool:
        """Disconnect a peer (the others are told); False if there is no such peer."""
        return self.server.kick(peer_id, reason="kicked through the control plane")

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
    control = "none" if control_pid is None else f"pid {control_pid}, {restarts} restarts"
    return [
        f"state: {len(conns)} peers (ids {', '.join(map(str, sorted(conns))) or 'none'})",
        f"state: fds {server.fds_in_use()} in use of {fd_limit()} ({server.config.fd_reserve} "
        f"kept free); {in_flight}; {len(server.lingering)} dropped clients still reading",
        f"state: queued messages per peer, largest: {busiest}",
        "state: " + ", ".join(f"{k} {v}" for k, v in server.stats.as_dict().items()),
        f"state: control plane process: {control}",
    ]
