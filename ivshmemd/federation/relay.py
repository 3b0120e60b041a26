"""The doorbell relay's eventfd side: remote peers' vectors watched here, local peers' rung.

A remote peer (one that lives on another daemon) gets eventfds here like any peer, made by
the host's registry (:meth:`ivshmemd.registry.Registry.create_vectors`) and handed out to
local peers with the ordinary protocol. Nobody reads them but this relay: a local peer
rings the remote peer by writing one, and :meth:`DoorbellRelay.drain` reads the count the
eventfd accumulated and says which member's peer and vector it was for. The driver sends
that count to the member, whose relay writes it into the real eventfd with
:meth:`DoorbellRelay.deliver`. Rings are never lost and coalesce exactly as an eventfd
coalesces them: the count read is the count written.

All watched eventfds sit in one epoll set, so the driver waits on one fd (``fileno()``) and
:meth:`DoorbellRelay.drain` costs one call plus one read per eventfd that was rung, however
many are watched. Draining everything before a local peer's leave is announced is what makes
a remote peer see that peer's last rings before its leave.

References: the relay holds its own reference (:meth:`SharedFd.acquire`) on every eventfd it
watches or writes, so an fd number it uses is never closed (or reused) under it; it removes
an eventfd from the epoll set *before* releasing it (an eventfd also held by a peer process
would otherwise stay in the set after our close). Nothing here does network I/O.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Sequence
from dataclasses import dataclass

from ivshmemd.registry import SharedFd

__all__ = ["DoorbellRelay", "RelayStats"]


@dataclass
class RelayStats:
    """Counters for the control plane."""

    #: eventfd reads relayed to members (one frame each) and the doorbells they carried
    relayed_frames: int = 0
    relayed_rings: int = 0
    #: counts written into local eventfds
    delivered_frames: int = 0
    delivered_rings: int = 0
    #: rings for a local peer that had left (or a full eventfd counter): dropped
    stale_rings: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False, slots=True)
class _Watched:
    member: str
    peer_id: int
    vector: int
    shared: SharedFd


class DoorbellRelay:
    """Watched eventfds of remote peers, and the eventfds of local peers."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, _Watched] = {}
        self._remote: dict[int, tuple[str, tuple[_Watched, ...]]] = {}
        self._local: dict[int, tuple[SharedFd, ...]] = {}
        self.stats = RelayStats()

    def fileno(self) -> int:
        """The epoll fd: readable when a watched eventfd was rung."""
        return self._epoll.fileno()

    def add_wakeup_fd(self, fd: int) -> None:
        """Make :meth:`fileno` readable when ``fd`` is too (the listening socket's
        ``ZMQ_FD``), so that one task waits for rings and frames alike. :meth:`drain`
        does not read it."""
        self._epoll.register(fd, select.EPOLLIN)

    def remove_wakeup_fd(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)

    # -- remote peers ----------------------------------------------------------------------

    def watch(self, member: str, peer_id: int, vectors: Sequence[SharedFd]) -> None:
        """Watch the eventfds of ``member``'s peer ``peer_id`` (taking a reference on each)."""
        if peer_id in self._remote:
            raise ValueError(f"remote peer {peer_id} is already watched")
        entries = []
        try:
            for vector, shared in enumerate(vectors):
                entry = _Watched(member, peer_id, vector, shared.acquire())
                entries.append(entry)
                self._epoll.register(shared.fd, select.EPOLLIN)
                self._watched[shared.fd] = entry
        except BaseException:
            self._unwatch_entries(entries)
            raise
        self._remote[peer_id] = (member, tuple(entries))

    def unwatch(self, peer_id: int) -> str | None:
        """Stop watching remote peer ``peer_id``; its unread rings are dropped (it left).
        Returns its member, or None if it was not watched."""
        found = self._remote.pop(peer_id, None)
        if found is None:
            return None
        member, entries = found
        self._unwatch_entries(entries)
        return member

    def _unwatch_entries(self, entries: Sequence[_Watched]) -> None:
        for entry in entries:
            fd = entry.shared.fd
            if self._watched.get(fd) is entry:
                del self._watched[fd]
                self._epoll.unregister(fd)
            entry.shared.release()

    def remote_peers(self) -> dict[int, str]:
        """Watched remote peers and their members."""
        return {peer_id: member for peer_id, (member, _) in self._remote.items()}

    def drain(self) -> list[tuple[str, int, int, int]]:
        """Read every rung watched eventfd now: ``(member, peer_id, vector, count)`` each.
        Never waits."""
        rings: list[tuple[str, int, int, int]] = []
        watched = self._watched
        read = os.eventfd_read
        for fd, _events in self._epoll.poll(0):
            entry = watched.get(fd)
            if entry is None:
                continue
            try:
                count = read(fd)
            except BlockingIOError:  # read already (a stale readiness)
                continue
            rings.append((entry.member, entry.peer_id, entry.vector, count))
        stats = self.stats
        stats.relayed_frames += len(rings)
        stats.relayed_rings += sum(ring[3] for ring in rings)
        return rings

    # -- local peers -----------------------------------------------------------------------

    def add_local(self, peer_id: int, vectors: Sequence[SharedFd]) -> None:
        """A local peer whose eventfds remote rings are written into (references taken)."""
        if peer_id in self._local:
            raise ValueError(f"local peer {peer_id} is already known")
        self._local[peer_id] = tuple(shared.acquire() for shared in vectors)

    def remove_local(self, peer_id: int) -> None:
        """Forget a local peer (rings for it are dropped from now on)."""
        for shared in self._local.pop(peer_id, ()):
            shared.release()

    def local_peers(self) -> dict[int, int]:
        """Known local peers and their vector counts."""
        return {peer_id: len(vectors) for peer_id, vectors in self._local.items()}

    def deliver(self, peer_id: int, vector: int, count: int) -> bool:
        """Write ``count`` into local peer ``peer_id``'s eventfd ``vector``; False (and
        counted) if that peer is gone, has no such vector, or its counter is full."""
        vectors = self._local.get(peer_id)
        stats = self.stats
        if vectors is None or vector >= len(vectors):
            stats.stale_rings += count
            return False
        try:
            os.eventfd_write(vectors[vector].fd, count)
        except BlockingIOError:  # the counter would pass 2**64 - 2: nobody reads it
            stats.stale_rings += count
            return False
        stats.delivered_frames += 1
        stats.delivered_rings += count
        return True

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Release every reference and close the epoll set. Idempotent."""
        for peer_id in list(self._remote):
            self.unwatch(peer_id)
        for peer_id in list(self._local):
            self.remove_local(peer_id)
        self._epoll.close()
