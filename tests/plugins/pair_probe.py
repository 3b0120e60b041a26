"""``pair-probe``: a test-only plugin that finds a partner through the shared-memory
directory and stays paired until it is stopped.

On start it asks for a partner with a ``--size``-byte region (``guest.find_partner``). Once
paired it reports ``{"event": "pair", "partner": ..., "leader": ..., "offset": ...,
"size": ...}``; the leader writes its id at the start of the pair's region and rings its
partner, which reports ``{"event": "rung", "vector": ..., "note": <the id it reads>}``.
Then both wait until SIGTERM, so a test sees every pair alive at once. Registered through
``ivshmem_test_plugins-0.1.dist-info/entry_points.txt`` next to this file.
"""

from __future__ import annotations

import argparse

from peers.plugin import Guest, Pair, Plugin


class PairProbe(Plugin):
    """Pair up, ring once from the leader, wait."""

    name = "pair-probe"
    description = "test-only: pair through the directory, leader rings once, wait"
    pairing = True

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--size", type=int, default=4096, metavar="BYTES")

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        self.pair: Pair | None = None
        guest.find_partner(size=self.options.size)

    def paired(self, pair: Pair) -> None:
        assert self.guest is not None and pair.region is not None
        self.pair = pair
        region = pair.region
        self.guest.report(event="pair", partner=pair.partner, leader=pair.leader,
                          offset=region.offset, size=region.size)  # fmt: skip
        if pair.leader:
            self.guest.write_shm(region.offset, self.guest.peer_id.to_bytes(4, "little"))
            self.guest.ring(pair.partner, 0)

    def interrupt(self, vector: int) -> None:
        assert self.guest is not None and self.pair is not None and self.pair.region
        note = int.from_bytes(self.guest.read_shm(self.pair.region.offset, 4), "little")
        self.guest.report(event="rung", vector=vector, note=note)
