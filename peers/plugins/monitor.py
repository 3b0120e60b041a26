"""``monitor``: prints every event the peer sees (joins, leaves, interrupts)."""

from __future__ import annotations

import argparse
import time

from ivshmemd.wording import plural

from ..plugin import Guest, Plugin


class MonitorPlugin(Plugin):
    """Guest software that only watches: one line per event, until stopped."""

    name = "monitor"
    description = "print every event the peer sees (joins, leaves, interrupts)"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--exit-after",
            type=int,
            metavar="N",
            default=0,
            help="finish after N interrupts (default: run until stopped)",
        )

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        self.interrupts = 0
        self.t0 = time.monotonic()
        others = sorted(p for p in guest.peers() if p != guest.peer_id)
        self._say(f"started as peer {guest.peer_id}; peers present: {others or 'none'}")
        limit = self.options.exit_after
        guest.waiting(plural(limit, "interrupt") if limit else "events (it runs until stopped)")

    def _say(self, text: str) -> None:
        assert self.guest is not None
        self.guest.log(f"[{time.monotonic() - self.t0:9.3f}] {text}")
        self.guest.report(event="monitor", text=text)

    def interrupt(self, vector: int) -> None:
        self.interrupts += 1
        self._say(f"interrupt on vector {vector}")
        limit = self.options.exit_after
        if limit and self.interrupts >= limit and self.guest is not None:
            self.guest.finish(f"monitor: {plural(self.interrupts, 'interrupt')}")

    def peer_joined(self, peer_id: int) -> None:
        self._say(f"peer {peer_id} joined")

    def peer_left(self, peer_id: int) -> None:
        self._say(f"peer {peer_id} left")

    def stop(self) -> None:
        if self.guest is not None:
            self._say("stopping")
