"""``memwriter``: a test-only plugin that writes shm pages through a chosen write path and
rings a peer after each step, for the memory-log tests (tests/peers/test_memreport.py).

``--script`` is a list of steps ``PATH:PAGES`` separated by ``;`` (``PAGES``: page numbers
of BAR2 and ``A-B`` ranges, comma-separated). A step writes the pages through its path, then
rings peer ``--to`` on vector 0; the next step runs when an interrupt comes back; after the
last step the plugin finishes. The paths are the ways guest software can write memory:

* ``vcpu``: one ``vcpu.write`` per page; ``write64``: one ``vcpu.write64`` per page;
* ``span``: one ``vcpu.write`` over pages ``min..max`` (leaf by leaf); ``touch``: the bulk
  path (``vcpu.access_many``, one batch of faults);
* ``nested``: an L2 guest whose memory the L1 maps onto BAR2 (its writes fault the L1 page);
* ``device``: a device's DMA into BAR2 (``vm.write_guest``, no stage 2);
* ``directory``: ``guest.shm.allocate`` (the shared-memory directory, the last page);
* ``none``: no write at all (a doorbell with nothing to report).

``--flood N`` instead writes one page and rings, N times in a row without waiting, then
finishes. Registered through ``ivshmem_test_plugins-0.1.dist-info/entry_points.txt``.
"""

from __future__ import annotations

import argparse

import numpy as np

from peers.plugin import Guest, Plugin

L2_BASE = 0x4000_0000
PAGE = 4096


def parse_script(text: str) -> list[tuple[str, list[int]]]:
    """``"vcpu:1,3-5;directory"`` -> ``[("vcpu", [1, 3, 4, 5]), ("directory", [])]``."""
    steps = []
    for step in filter(None, text.split(";")):
        path, _, pages = step.partition(":")
        numbers: list[int] = []
        for part in filter(None, pages.split(",")):
            first, _, last = part.partition("-")
            numbers.extend(range(int(first), int(last or first) + 1))
        steps.append((path, numbers))
    return steps


class MemWriter(Plugin):
    """Write pages through a path, ring, wait for the answer, next step."""

    name = "memwriter"
    description = "test-only: write shm pages through each write path, ring after each"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--to", type=int, required=True, metavar="ID")
        group.add_argument("--script", default="", type=parse_script)
        group.add_argument("--flood", type=int, default=0, metavar="N")

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        self.l2 = guest.vm.create_nested(1)
        self.l2.set_l2_mapping(L2_BASE, guest.shm_gpa, guest.shm_size)
        self.step = 0
        self.allocated = 0
        if self.options.to in guest.peers():
            self._go()

    def peer_joined(self, peer_id: int) -> None:
        if peer_id == self.options.to and self.step == 0:
            self._go()

    def _go(self) -> None:
        assert self.guest is not None
        if self.options.flood:
            for n in range(self.options.flood):
                self._write("vcpu", [n % 64])
                self.guest.ring(self.options.to, 0)
            self.guest.finish(f"memwriter: flooded {self.options.flood} rings")
            return
        self._next()

    def interrupt(self, vector: int) -> None:
        self._next()

    def _next(self) -> None:
        assert self.guest is not None
        script = self.options.script
        if self.step == len(script):
            self.guest.finish(f"memwriter: {len(script)} steps")
            return
        path, pages = script[self.step]
        self.step += 1
        self._write(path, pages)
        self.guest.ring(self.options.to, 0)

    def _write(self, path: str, pages: list[int]) -> None:
        guest = self.guest
        assert guest is not None
        vcpu, base, note = guest.vcpu, guest.shm_gpa, self.step.to_bytes(8, "little")
        if path == "vcpu":
            for page in pages:
                vcpu.write(base + page * PAGE + 8, note)
        elif path == "write64":
            for page in pages:
                vcpu.write64(base + page * PAGE + 16, self.step)
        elif path == "span":
            first, last = min(pages), max(pages)
            vcpu.write(base + first * PAGE, bytes((last - first + 1) * PAGE))
        elif path == "touch":
            gpas = np.array([base + page * PAGE for page in pages], dtype=np.uint64)
            vcpu.access_many(gpas, write=True, value=self.step)
        elif path == "nested":
            for page in pages:
                self.l2.write(L2_BASE + page * PAGE + 24, note, vcpu=vcpu)
        elif path == "device":
            for page in pages:
                guest.vm.write_guest(base + page * PAGE + 32, note)
        elif path == "directory":
            self.allocated += 1
            guest.shm.allocate(f"memwriter-{self.allocated}", PAGE)
        elif path != "none":
            raise ValueError(f"unknown write path {path!r}")
