"""A real, small ControlView for the control-plane tests (no daemon needed)."""

from __future__ import annotations

from typing import Any

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

    def kick(self, peer_id: int) -> bool:
        if peer_id not in self.table:
            return False
        self.leave(peer_id, "kicked")
        return True

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
