"""``crash``: a test-only plugin whose hook raises, to test how a plugin's exception is
reported (one line; the traceback with ``-v``).

``--hook start`` raises ``ValueError("bad value 42")`` in ``start``; ``--hook interrupt``
rings its own doorbell in ``start`` and raises in ``interrupt`` (inside the event loop, where
trio wraps it in exception groups). Registered through
``ivshmem_test_plugins-0.1.dist-info/entry_points.txt`` next to this file.
"""

from __future__ import annotations

import argparse

from peers.plugin import Guest, Plugin


def explode() -> None:
    raise ValueError("bad value 42")


class Crash(Plugin):
    """Raises from the hook ``--hook`` names."""

    name = "crash"
    description = "test-only: raise ValueError in start or interrupt"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--hook", choices=("start", "interrupt"), default="start")

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        if self.options.hook == "start":
            explode()
        guest.ring(guest.peer_id, 0)

    def interrupt(self, vector: int) -> None:
        explode()
