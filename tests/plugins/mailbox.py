"""``mailbox``: a test-only plugin that leaves a note in the shared memory and rings a peer.

On start it writes ``--text`` at ``--offset`` of BAR2 (through its vCPU) and rings peer
``--to`` on ``--vector`` (as soon as that peer is in the device's peer table). On its first
interrupt it reads ``--reply-len`` bytes at ``--reply-offset`` and finishes with
``mailbox: vector V: <reply>``. Used to prove that a real QEMU VM and our peer share memory
and doorbells on one daemon. Registered through the ``*.dist-info`` beside it.
"""

from __future__ import annotations

import argparse

from peers.plugin import Guest, Plugin


class MailboxPlugin(Plugin):
    """Write a note, ring a peer, report the reply that comes with the next interrupt."""

    name = "mailbox"
    description = "test aid: write a note in shm, ring a peer, report its reply"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--to", type=int, required=True, metavar="ID")
        group.add_argument("--vector", type=int, default=0)
        group.add_argument("--text", default="hello")
        group.add_argument("--offset", type=lambda t: int(t, 0), default=0)
        group.add_argument("--reply-offset", type=lambda t: int(t, 0), default=0x100)
        group.add_argument("--reply-len", type=int, default=64)

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        guest.write_shm(self.options.offset, self.options.text.encode())
        self.rung = False
        if self.options.to in guest.peers():
            self._ring()

    def _ring(self) -> None:
        assert self.guest is not None
        self.rung = True
        self.guest.ring(self.options.to, self.options.vector)
        self.guest.report(event="mailbox-rang", to=self.options.to, vector=self.options.vector)

    def peer_joined(self, peer_id: int) -> None:
        if peer_id == self.options.to and not self.rung:
            self._ring()

    def interrupt(self, vector: int) -> None:
        assert self.guest is not None
        reply = self.guest.read_shm(self.options.reply_offset, self.options.reply_len)
        text = reply.split(b"\0", 1)[0].decode(errors="replace")
        self.guest.finish(f"mailbox: vector {vector}: {text}")
