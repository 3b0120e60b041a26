"""systemd's file descriptor store: the daemon's fds kept by systemd, so a crash loses no peer.

With ``FileDescriptorStoreMax=`` in the unit, a service may hand systemd duplicates of its
fds (``sd_notify`` with ``FDSTORE=1``, ``FDNAME=`` and the fds as SCM_RIGHTS); after a crash
(``kill -9``) systemd restarts it and passes them back like socket-activation fds
(``LISTEN_FDS``, ``LISTEN_FDNAMES``). ``FDSTOREREMOVE=1`` with ``FDNAME=`` closes every
stored fd of that name: a peer's connection must be removed when the daemon drops the peer,
or systemd's copy would keep the client from ever seeing EOF.

Names (one fd each; systemd keeps them in ``LISTEN_FDNAMES``):

``listen``               the listening socket (unless systemd passed it: ``ivshmemd.socket``)
``shm``                  the shared memory
``peer-<id>-conn``       peer ``id``'s connection
``peer-<id>-vec-<v>``    peer ``id``'s vector ``v`` (its eventfd)
``remote-<id>-vec-<v>``  vector ``v`` of remote peer ``id`` (a federation member's peer)

The store is used when ``$NOTIFY_SOCKET`` is set and ``$FDSTORE`` is above zero: systemd
(254 and later) sets ``$FDSTORE`` to ``FileDescriptorStoreMax=``; the unit sets it too, for
older systemd versions, which do not. Without it nothing is sent (an older systemd would log
a refusal for every fd). :func:`classify` sorts the fds passed at start-up by these names.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from .activation import PassedFd
from .sdnotify import SystemdNotifier

__all__ = [
    "FDSTORE_ENV",
    "LISTEN",
    "SHM",
    "FdStore",
    "StoredFds",
    "classify",
    "peer_names",
    "remote_names",
]

log = logging.getLogger("ivshmemd")

FDSTORE_ENV: Final = "FDSTORE"
LISTEN: Final = "listen"
SHM: Final = "shm"
_PEER = re.compile(r"(peer|remote)-(\d{1,5})-(conn|vec-(\d{1,2}))\Z")


def conn_name(peer_id: int) -> str:
    """The store name of a peer's connection."""
    return f"peer-{peer_id}-conn"


def vector_name(peer_id: int, vector: int) -> str:
    """The store name of a peer's vector."""
    return f"peer-{peer_id}-vec-{vector}"


def peer_names(peer_id: int, n_vectors: int) -> list[str]:
    """Every store name of a peer: its connection, then its vectors."""
    return [conn_name(peer_id), *(vector_name(peer_id, v) for v in range(n_vectors))]


def remote_names(peer_id: int, n_vectors: int) -> list[str]:
    """Every store name of a remote peer: its vectors (it has no connection here)."""
    return [f"remote-{peer_id}-vec-{v}" for v in range(n_vectors)]


def store_limit(environ: Mapping[str, str] | None = None) -> int:
    """How many fds the store takes (``$FDSTORE``; 0: no store)."""
    text = (os.environ if environ is None else environ).get(FDSTORE_ENV, "")
    return int(text) if text.isdigit() else 0


class FdStore:
    """Pushes and removes fds by name (a no-op without a store, see the module docstring)."""

    def __init__(self, notifier: SystemdNotifier, limit: int | None = None) -> None:
        self.notifier = notifier
        self.limit = store_limit() if limit is None else limit
        self.stored = 0
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when fds go to systemd."""
        return self.notifier.enabled and self.limit > 0

    def push(self, name: str, fd: int) -> bool:
        """Store a duplicate of ``fd`` under ``name`` (systemd does the duplicating)."""
        if not self.enabled:
            return False
        if self.stored >= self.limit:
            if not self._warned:
                self._warned = True
                log.warning(
                    "systemd's fd store is full (FileDescriptorStoreMax=%d): peers from now "
                    "on would not survive a crash; raise it", self.limit,
                )  # fmt: skip
            return False
        sent = self.notifier.send({"FDSTORE": 1, "FDNAME": name}, (fd,))
        self.stored += sent
        return sent

    def push_all(self, named: Iterable[tuple[str, int]]) -> None:
        """Store several fds, each under its name."""
        for name, fd in named:
            self.push(name, fd)

    def remove(self, names: Iterable[str]) -> None:
        """Close the stored fds of these names (one message per name: systemd takes one)."""
        if not self.enabled:
            return
        for name in names:
            if self.notifier.send({"FDSTOREREMOVE": 1, "FDNAME": name}):
                self.stored = max(0, self.stored - 1)


@dataclass
class StoredPeer:
    """What the store gave back for one peer."""

    conn: int | None = None
    vectors: dict[int, int] = field(default_factory=dict)


@dataclass
class StoredFds:
    """The fds passed at start-up, sorted by store name."""

    listen: int | None = None
    shm: int | None = None
    peers: dict[int, StoredPeer] = field(default_factory=dict)
    #: remote peers' vectors (a federation's: no connection)
    remote: dict[int, StoredPeer] = field(default_factory=dict)
    #: what is not ours: socket activation's fds, for :mod:`ivshmemd.activation`
    others: list[PassedFd] = field(default_factory=list)
    #: names we stored once but do not use now (for FDSTOREREMOVE), with their fds
    unknown: list[PassedFd] = field(default_factory=list)
    #: names whose fds were closed unused: to remove from the store
    discarded: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.shm is not None or bool(self.peers)

    def all_fds(self) -> list[int]:
        """Every fd of ours (to close what goes unused)."""
        fds = [fd for fd in (self.listen, self.shm) if fd is not None]
        for peer in (*self.peers.values(), *self.remote.values()):
            fds.extend(fd for fd in (peer.conn, *peer.vectors.values()) if fd is not None)
        return fds

    def discard(self) -> StoredFds:
        """Close every fd of ours (the store cannot be served on); what is left is the
        socket activation's fds, and the names to remove from the store."""
        for fd in self.all_fds():
            os.close(fd)
        names = [LISTEN, SHM]
        for peer_id, peer in self.peers.items():
            names.extend(peer_names(peer_id, max(peer.vectors, default=-1) + 1))
        for peer_id, peer in self.remote.items():
            names.extend(remote_names(peer_id, max(peer.vectors, default=-1) + 1))
        return StoredFds(others=self.others, discarded=names + [i.name for i in self.unknown])


def classify(passed: Sequence[PassedFd]) -> StoredFds:
    """Sort passed fds by name; a name given twice keeps its first fd (the other goes to
    ``unknown``, for the caller to close)."""
    stored = StoredFds()
    for item in passed:
        if item.name == LISTEN and stored.listen is None:
            stored.listen = item.fd
        elif item.name == SHM and stored.shm is None:
            stored.shm = item.fd
        elif (match := _PEER.match(item.name)) is not None:
            kind = stored.peers if match[1] == "peer" else stored.remote
            peer = kind.setdefault(int(match[2]), StoredPeer())
            if match[4] is None and peer.conn is None and kind is stored.peers:
                peer.conn = item.fd
            elif match[4] is not None and int(match[4]) not in peer.vectors:
                peer.vectors[int(match[4])] = item.fd
            else:
                stored.unknown.append(item)
        elif item.name in (LISTEN, SHM):
            stored.unknown.append(item)
        else:
            stored.others.append(item)
    return stored
