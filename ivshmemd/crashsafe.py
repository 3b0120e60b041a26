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

Remote peers (a federation's) are stored by their vectors and recorded with their member;
they are restored as remote peers, and the new federation process confirms each as the
members announce it again (:class:`ivshmemd.fedproc.FederationProcess`): local peers see
no leave and no join of a remote peer that is still there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .fdstore import LISTEN, SHM, FdStore, StoredFds, peer_names, remote_names
from .registry import Peer
from .server import Connection, IvshmemServer
from .statefile import StateFile

__all__ = ["CrashJournal", "recover"]

log = logging.getLogger("ivshmemd")

#: records appended before the state file is compacted into a snapshot (at least)
COMPACT_AFTER = 64


class CrashJournal:
    """Keeps systemd's fd store and the state file current as peers join and leave."""

    def __init__(self, server: IvshmemServer, store: FdStore, statefile: StateFile) -> None:
        self.server = server
        self.store = store
        self.statefile = statefile
        #: peers with messages queued at the last write (their queue draining rewrites it)
        self._unsettled: set[int] = set()
        #: a newcomer whose handshake is being sent (unsettled until it all went)
        self._sending: int | None = None
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

    def joined(self, conn: Connection, *, sending: bool = False) -> None:
        """``conn``'s peer is registered; ``sending``: its handshake is about to leave (it
        counts as unsettled until :meth:`drained` says it all went)."""
        peer = conn.peer
        next_id = self.server.registry.allocator.next_id
        self._sending = peer.peer_id if sending else None
        self._record(["join", peer.peer_id, peer.info, next_id, self._scan()])

    def remote_joined(self, peer: Peer) -> None:
        names = remote_names(peer.peer_id, len(peer.vectors))
        self.store.push_all(zip(names, (shared.fd for shared in peer.vectors), strict=True))
        self._record(["remote", peer.peer_id, peer.info])

    def left(self, peer: Peer) -> None:
        names = remote_names if "member" in peer.info else peer_names
        self.store.remove(names(peer.peer_id, len(peer.vectors)))
        self._record(["leave", peer.peer_id, self._scan()])

    def drained(self, conn: Connection) -> None:
        if conn.peer.peer_id == self._sending:
            self._sending = None
        if conn.peer.peer_id in self._unsettled:
            self._record(["unsettled", self._scan()])

    def _scan(self) -> list[int]:
        """The peers with messages queued (what a crash now would lose)."""
        unsettled = [
            pid
            for pid, conn in self.server.connections.items()
            if conn.outbox or pid == self._sending
        ]
        self._unsettled = set(unsettled)
        return unsettled

    def _record(self, record: list[Any]) -> None:
        """Append a record, or compact into a snapshot once records outnumber peers."""
        if self._closing:
            return
        if self.statefile.records >= max(COMPACT_AFTER, 2 * len(self.server.registry)):
            self.write()
            return
        try:
            self.statefile.append(record)
        except OSError as exc:
            log.error("cannot write the state file %s: %s", self.statefile.path, exc.strerror)

    def write(self) -> None:
        """Write a snapshot of the state (atomically); a failure is logged, never raised."""
        if self._closing:
            return
        server = self.server
        unsettled = set(self._scan())
        served = server.connections.keys() | server.remote.keys()
        peers = [[peer.peer_id, peer.info, peer.peer_id not in unsettled
                  and peer.peer_id in served] for peer in server.registry]  # fmt: skip
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


def replay(state: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with the records written after it applied: ``peers`` as
    ``[id, info, settled]`` in connection order, ``next_id``."""
    peers: dict[int, list[Any]] = {entry[0]: list(entry) for entry in state.get("peers", [])}
    next_id = state.get("next_id")
    for record in state.get("records", []):
        kind = record[0] if record else None
        if kind == "join" and len(record) == 5:
            peers[record[1]] = [record[1], record[2], True]
            next_id = record[3]
        elif kind == "leave" and len(record) == 3:
            peers.pop(record[1], None)
        elif kind == "remote" and len(record) == 3:
            peers[record[1]] = [record[1], record[2], True]
            continue
        else:
            if kind != "unsettled" or len(record) != 2:
                continue
        unsettled = set(record[-1])
        for entry in peers.values():
            entry[2] = entry[0] not in unsettled
    return {**state, "peers": list(peers.values()), "next_id": next_id}


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
    state = None if state is None else replay(state)
    for peer_id, info, settled in (state or {}).get("peers", []):
        listed.add(peer_id)
        if isinstance(info, dict) and "member" in info:
            remote = stored.remote.pop(peer_id, None)
            vectors = [] if remote is None else [remote.vectors[v] for v in sorted(remote.vectors)]
            if len(vectors) == n_vectors:
                peers.append({"id": peer_id, "vectors": vectors, "info": info, "conn": None,
                              "member": info["member"]})  # fmt: skip
            else:  # its local peers cannot ring it: a leave, then the federation's join
                gone[peer_id] = "not all its vectors were in systemd's fd store"
                peers.append({"id": peer_id, "vectors": vectors, "info": info, "conn": None})
            continue
        found = stored.peers.get(peer_id)
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
    for remote in stored.remote.values():  # stored, never recorded: nobody was told of it
        for fd in remote.vectors.values():
            os.close(fd)
    local = [p["id"] for p in peers if "member" not in p["info"]]
    first_free = max(local, default=-1) + 1
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
