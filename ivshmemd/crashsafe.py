"""Crash survival under systemd: the server's journal in systemd's fd store and a state file.

:class:`CrashJournal` is the server's :class:`~ivshmemd.server.Journal` when systemd keeps
an fd store for the daemon (:mod:`ivshmemd.fdstore`): a newcomer's connection and eventfds
go to the store before any of its messages is sent, the state file
(:mod:`ivshmemd.statefile`) is rewritten once they are queued, and a leaver's fds are removed
from the store (without that, systemd's copy of its socket would keep the client from
seeing EOF).

After a crash, systemd starts the daemon again and passes the stored fds back;
:func:`recover` matches them with the state file and builds what
:meth:`ivshmemd.server.IvshmemServer.adopt` takes. What cannot be served on is announced as
left once the daemon serves:

* a peer whose connection hung up while the daemon was down (systemd drops a stored socket
  that hangs up, or it is still there and reads EOF);
* a peer that still had messages queued when the daemon died (they died with it: its stream
  would miss part of the protocol), and one whose fds are not all in the store;
* a peer whose fds are stored but that the state file does not list (the daemon died between
  storing them and recording it): its join may have reached some peers.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .fdstore import LISTEN, SHM, FdStore, StoredFds, peer_names
from .registry import Peer
from .server import Connection, IvshmemServer
from .statefile import StateFile

__all__ = ["CrashJournal", "recover"]

log = logging.getLogger("ivshmemd")


class CrashJournal:
    """Keeps systemd's fd store and the state file current as peers join and leave."""

    def __init__(self, server: IvshmemServer, store: FdStore, statefile: StateFile) -> None:
        self.server = server
        self.store = store
        self.statefile = statefile
        #: peers with messages queued at the last write (their queue draining rewrites it)
        self._unsettled: set[int] = set()
        self.writes = 0
        self._closing = False

    def closing(self) -> None:
        """A clean shutdown begins: take the socket and shm out of the store (the socket
        file goes; a later start binds anew), remove the state file, and stop rewriting it
        while every peer is freed (each leave still takes its fds out of the store)."""
        self._closing = True
        self.store.remove([LISTEN, SHM])
        self.statefile.remove()

    def joining(self, conn: Connection) -> None:
        peer = conn.peer
        fds = [conn.sock.fileno(), *(shared.fd for shared in peer.vectors)]
        self.store.push_all(zip(peer_names(peer.peer_id, len(peer.vectors)), fds, strict=True))

    def joined(self, conn: Connection) -> None:
        self.write()

    def left(self, peer: Peer) -> None:
        self.store.remove(peer_names(peer.peer_id, len(peer.vectors)))
        self._unsettled.discard(peer.peer_id)
        self.write()

    def drained(self, conn: Connection) -> None:
        if conn.peer.peer_id in self._unsettled:
            self.write()

    def write(self) -> None:
        """Rewrite the state file (atomically); a failure is logged, never raised."""
        if self._closing:
            return
        server = self.server
        peers = []
        unsettled = set()
        for peer_id in server.registry.ids():
            conn = server.connections.get(peer_id)
            info = server.registry.get(peer_id).info  # type: ignore[union-attr]
            settled = conn is not None and not conn.outbox
            if not settled:
                unsettled.add(peer_id)
            peers.append([peer_id, info, settled])
        self._unsettled = unsettled
        try:
            self.statefile.write({
                "n_vectors": server.config.n_vectors,
                "next_id": server.registry.allocator.next_id,
                "started_at": server.started_at,
                "peers": peers,
            })  # fmt: skip
            self.writes += 1
        except OSError as exc:
            log.error("cannot write the state file %s: %s", self.statefile.path, exc.strerror)


def _hung_up(fd: int) -> bool:
    """True if the client end of a connection is gone (EOF or an error)."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.detach()


def recover(
    stored: StoredFds, state: dict[str, Any] | None, n_vectors: int
) -> tuple[dict[str, Any], dict[int, str]]:
    """The server state (for :meth:`IvshmemServer.adopt`) rebuilt from the fds systemd
    passed and the state file, and the peers to announce as left (id: why)."""
    peers: list[dict[str, Any]] = []
    gone: dict[int, str] = {}
    listed: set[int] = set()
    for peer_id, info, settled in (state or {}).get("peers", []):
        found = stored.peers.get(peer_id)
        listed.add(peer_id)
        if found is None:
            gone[peer_id] = "its fds were not in systemd's fd store"
            peers.append({"id": peer_id, "vectors": [], "info": info, "conn": None})
            continue
        vectors = [found.vectors[v] for v in sorted(found.vectors)]
        conn = found.conn
        if conn is None or _hung_up(conn):
            gone[peer_id] = "it hung up while the daemon was down"
        elif len(vectors) != n_vectors:
            gone[peer_id] = "not all its vectors were in systemd's fd store"
        elif not settled:
            gone[peer_id] = "messages queued for it died with the previous daemon"
        peers.append({"id": peer_id, "vectors": vectors, "info": info, "conn": conn,
                      "outbox": [], "ledger": None})  # fmt: skip
    for peer_id, found in stored.peers.items():
        if peer_id in listed:
            continue
        gone[peer_id] = "the daemon died while it joined"
        vectors = [found.vectors[v] for v in sorted(found.vectors)]
        if found.conn is not None:
            os.close(found.conn)
        peers.append({"id": peer_id, "vectors": vectors, "info": {}, "conn": None})
    first_free = max((p["id"] for p in peers), default=-1) + 1
    server_state = {
        "next_id": (state or {}).get("next_id", first_free),
        "n_vectors": n_vectors,
        "shm_fd": None,
        "started_at": (state or {}).get("started_at", time.time()),
        "stats": {},
        "flight_total": None,
        "peers": peers,
    }
    return server_state, gone
