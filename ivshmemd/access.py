"""Who may connect: the ``--allow-uid`` / ``--allow-gid`` lists, checked against the
credentials the kernel reports for a unix-socket client (``SO_PEERCRED``: pid, uid, gid).

One definition serves the peer socket (:mod:`ivshmemd.server`) and the control plane's
sockets (requests and events), so that a client refused on one is refused on all. A client
is allowed when both lists are empty, when its uid is listed, when its primary gid is
listed, or when one of its supplementary groups (read from ``/proc/PID/status``) is.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AllowList", "supplementary_gids"]


def supplementary_gids(pid: int) -> frozenset[int]:
    """The supplementary groups of a process, from /proc (empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass(frozen=True)
class AllowList:
    """The configured lists; empty lists allow everyone (the socket's mode still applies)."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    @property
    def open(self) -> bool:
        """True when nobody is refused."""
        return not self.uids and not self.gids

    def check(self, uid: int, gid: int, pid: int) -> str | None:
        """None if these credentials may connect, else why not (for the log)."""
        if self.open or uid in self.uids or gid in self.gids:
            return None
        if self.gids and supplementary_gids(pid) & self.gids:
            return None
        return f"pid {pid} uid {uid} gid {gid} is not allowed"
