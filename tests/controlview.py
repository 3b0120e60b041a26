"""A real, small ControlView for the control-plane tests (no daemon needed)."""

from __future__ import annotations

from typing import Any

from ivshmemd.control.schema import ErrorCode, RequestRefused
from ivshmemd.control.server import EventPublisher


class FakeDaemon:
    """A real, small ControlView: a peer table and counters, kept consistent by kick()."""

    def __init__(self, owner_uid: int = 1000, publisher: EventPublisher | None = None) -> None:
        self._owner_uid = owner_uid
        self.publisher = publisher
        self.table: dict[int, dict[str, Any]] = {}
        self.counters = {
            "joins": 0,
            "leaves": 0,
            "refusals": 0,
            "messages_sent": 0,
            "slow_disconnects": 0,
        }
        self.next_id = 0
        self.departures: dict[int, str] = {}
        self.rung: list[tuple[int, int]] = []

    def join(self, vectors: int = 2) -> int:
        peer_id = self.next_id
        self.next_id += 1
        self.table[peer_id] = {
            "id": peer_id,
            "pid": 4000 + peer_id,
            "uid": 1000,
            "gid": 1000,
            "connected_at": 1_700_000_000.0 + peer_id,
            "vectors": vectors,
        }
        self.counters["joins"] += 1
        self.counters["messages_sent"] += 3 + vectors
        if self.publisher is not None:
            self.publisher.peer_joined(peer_id, vectors)
        return peer_id

    def leave(self, peer_id: int, reason: str = "disconnected") -> None:
        peer = self.table.pop(peer_id)
        self.departures[peer_id] = reason
        self.counters["leaves"] += 1
        if self.publisher is not None:
            self.publisher.peer_left(peer_id, peer["vectors"], reason)

    # ControlView
    def status(self) -> dict[str, Any]:
        return {
            "version": "0.1.0",
            "uptime": 12.5,
            "shm": {"name": "ivshmem", "path": "/dev/shm/ivshmem", "size": 4 << 20},
            "vectors": 2,
            "peers": len(self.table),
            "limits": {"max_peers": 65536},
        }

    def peers(self) -> list[dict[str, Any]]:
        return list(self.table.values())

    def kick(self, peer_id: int, reason: str = "kicked") -> bool:
        if peer_id not in self.table:
            return False
        self.leave(peer_id, reason)
        return True

    def departure(self, peer_id: int) -> dict[str, Any] | None:
        reason = self.departures.get(peer_id)
        return None if reason is None else {"id": peer_id, "reason": reason, "time": 0.0}

    def ring(self, peer_id: int, vector: int) -> None:
        if peer_id not in self.table:
            raise RequestRefused(ErrorCode.NO_SUCH_PEER, f"no peer with id {peer_id}")
        self.rung.append((peer_id, vector))

    def dump(self) -> dict[str, Any]:
        return {"shm": {"fd": 3, "size": 4 << 20}, "peers": []}

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    @property
    def owner_uid(self) -> int:
        return self._owner_uid


class BrokenDaemon(FakeDaemon):
    def status(self) -> dict[str, Any]:
        raise RuntimeError("registry on fire")

    def stats(self) -> dict[str, int]:
        return {"unpackable": object()}  # type: ignore[dict-item]
