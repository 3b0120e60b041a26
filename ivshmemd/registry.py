"""The peer registry: peer ids, eventfd vectors and connection order.

The registry owns the eventfds (one per vector per peer) and hands them out as
reference-counted :class:`SharedFd` handles: a message queued for a slow recipient keeps the
fd alive after its peer has left, so a queued join notice is never sent with a closed (or,
worse, reused) fd number. Ids come from :class:`IdAllocator`, a 16-bit counter like QEMU's
that only moves forward, wraps, and skips ids in use; a configurable id range keeps room for
peers that are not local sockets (a federation of daemons).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .protocol import MAX_PEER_ID, PeerVectors

__all__ = ["IdAllocator", "Peer", "Registry", "RegistryFull", "SharedFd"]


class SharedFd:
    """A file descriptor closed when its last reference is released."""

    __slots__ = ("_refs", "ancillary", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._refs = 1
        #: the SCM_RIGHTS control message that carries this fd, built once
        self.ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]

    def acquire(self) -> SharedFd:
        """Take one more reference (for a queued message); returns self."""
        if self._refs <= 0:
            raise RuntimeError(f"fd {self.fd} acquired after it was closed")
        self._refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; the fd is closed with the last one."""
        self._refs -= 1
        if self._refs == 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        """True once the fd has been closed."""
        return self._refs <= 0

    def __repr__(self) -> str:
        return f"SharedFd({self.fd}, refs={self._refs})"


class RegistryFull(Exception):
    """No peer id is free (or the configured maximum number of peers is reached)."""


class IdAllocator:
    """QEMU's peer-id policy: a counter over ``[first, last]`` that moves forward and wraps.

    ``allocate`` returns the counter's value if free, else the next free one after it; the
    counter then moves past the id handed out, so a freed id is not reused at once.
    """

    def __init__(self, first: int = 0, last: int = MAX_PEER_ID) -> None:
        if not 0 <= first <= last <= MAX_PEER_ID:
            raise ValueError(f"invalid peer id range {first}..{last} (ids are 0..{MAX_PEER_ID})")
        self.first = first
        self.last = last
        self.next_id = first

    @property
    def capacity(self) -> int:
        """How many ids the range holds."""
        return self.last - self.first + 1

    def allocate(self, in_use: Any) -> int:
        """Return a free id (``in_use`` supports ``in``); raise :class:`RegistryFull`."""
        span = self.capacity
        candidate = self.next_id
        for _ in range(span):
            if candidate not in in_use:
                self.next_id = self.first if candidate == self.last else candidate + 1
                return candidate
            candidate = self.first if candidate == self.last else candidate + 1
        raise RegistryFull(f"all {span} peer ids in {self.first}..{self.last} are in use")


@dataclass(eq=False)
class Peer:
    """A registered peer: its id, its receive vectors and what the transport attaches."""

    peer_id: int
    vectors: tuple[SharedFd, ...]
    info: dict[str, Any] = field(default_factory=dict)
    _view: PeerVectors[SharedFd] | None = field(default=None, repr=False)

    def as_protocol(self) -> PeerVectors[SharedFd]:
        """This peer as the sans-I/O protocol sees it (made once: every join lists it)."""
        if self._view is None:
            self._view = PeerVectors(self.peer_id, self.vectors)
        return self._view


class Registry:
    """Peers in connection order, with their eventfd vectors.

    ``max_peers`` bounds the number of registered peers; ``create_vectors`` makes the eventfds
    for a newcomer and cleans up after itself when the fd table runs out.
    """

    def __init__(
        self, n_vectors: int, max_peers: int, allocator: IdAllocator | None = None
    ) -> None:
        self.n_vectors = n_vectors
        self.max_peers = max_peers
        self.allocator = allocator or IdAllocator()
        self._peers: dict[int, Peer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def get(self, peer_id: int) -> Peer | None:
        """The peer with this id, if registered."""
        return self._peers.get(peer_id)

    def ids(self) -> list[int]:
        """Registered peer ids in connection order."""
        return list(self._peers)

    def reserve_id(self) -> int:
        """Pick the id for a newcomer, enforcing ``max_peers``."""
        if len(self._peers) >= self.max_peers:
            raise RegistryFull(f"the maximum of {self.max_peers} peers is reached")
        return self.allocator.allocate(self._peers)

    def create_vectors(self) -> tuple[SharedFd, ...]:
        """Create ``n_vectors`` non-blocking, close-on-exec, counter-mode eventfds.

        On failure (typically ``EMFILE``) the ones already made are closed and the ``OSError``
        propagates, so nothing leaks.
        """
        made: list[SharedFd] = []
        try:
            for _ in range(self.n_vectors):
                made.append(SharedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)))
        except OSError:
            for shared in made:
                shared.release()
            raise
        return tuple(made)

    def add(self, peer: Peer) -> None:
        """Register a peer (after its join messages have been queued)."""
        if peer.peer_id in self._peers:
            raise ValueError(f"peer id {peer.peer_id} is already registered")
        self._peers[peer.peer_id] = peer

    def remove(self, peer_id: int) -> Peer:
        """Unregister a peer and drop the registry's reference on its vectors."""
        peer = self._peers.pop(peer_id)
        for shared in peer.vectors:
            shared.release()
        return peer
