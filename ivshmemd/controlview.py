"""The daemon as the control plane sees it: :class:`ivshmemd.control.ControlView` over a server.

Read-only snapshots (status, peers, stats) plus ``kick``; the permission check for ``kick``
is the control plane's (:mod:`ivshmemd.control`), the leave notices are the server's.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import __version__
from .server import IvshmemServer, fd_limit

__all__ = ["DaemonControlView"]


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
