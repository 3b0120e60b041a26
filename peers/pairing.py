"""The runtime's side of ``guest.find_partner()``: from seeking to :meth:`Plugin.paired`.

The agreement itself is the directory's (:meth:`peers.shmdir.ShmDirectory.seek`); this is
what happens around it in one peer:

1. **seek**: claim a waiting peer at once, or write down that we wait. While we wait, the
   device's interrupts come here instead of to the plugin (``device.on_interrupt`` is
   swapped, so nothing is added to the doorbell path once paired), and the peer reports
   that it waits for a partner, and which;
2. **claimed**: the peer that claimed us rings our vector 0 once; on that interrupt we read
   our pair from the directory;
3. **paired**: once the partner is in the device's peer table (a doorbell to a peer the
   device does not know yet would be dropped), interrupts go back to the plugin and it
   gets :meth:`~peers.plugin.Plugin.paired`. The claiming side then rings the waiting side
   (step 2): the waiting side *leads* (speaks first), so that doorbell is never merged
   with one of the plugin's.

A partner that leaves before the pairing completes is forgotten and we seek again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .shmdir import Pair, ShmDirectory, ShmDirectoryError

if TYPE_CHECKING:
    from vmm.ivshmem import IvshmemDevice

    from .plugin import Plugin

__all__ = ["PAIRING_VECTOR", "PartnerSearch"]

#: The vector the claiming peer rings to tell the waiting one.
PAIRING_VECTOR = 0


class PartnerSearch:
    """One ``find_partner`` call of one peer, until :meth:`Plugin.paired` has been called."""

    def __init__(
        self,
        directory: ShmDirectory,
        key: str,
        size: int,
        device: IvshmemDevice,
        plugin: Plugin,
        ring: Callable[[int, int], None],
        report: Callable[..., None],
        log: Callable[[str], None],
    ) -> None:
        self.directory = directory
        self.key = key
        self.size = size
        self.device = device
        self.plugin = plugin
        self._ring = ring
        self._report = report
        self._log = log
        self.pending: Pair | None = None  # agreed, partner not yet in the peer table
        self.done = False

    def seek(self) -> None:
        """Claim a waiting partner, or wait for one."""
        if self.device.vectors < 1 or not self.device.peers.get(self.directory.peer_id):
            raise ShmDirectoryError(
                "finding a partner needs at least one interrupt vector (ivshmemd -n 1)"
            )
        pair = self.directory.seek(self.key, self.size)
        if pair is not None:
            self._found(pair)
            return
        self.device.on_interrupt = self.on_interrupt
        what = f"a partner running {self.key}"
        self._log(f"waiting for {what} (none is free yet)")
        self._report(event="waiting", what=what)

    def on_interrupt(self, vector: int) -> None:
        """While we wait: someone may have claimed us."""
        if self.pending is None:
            pair = self.directory.claimed(self.key)
            if pair is not None:
                self._found(pair)

    def peer_joined(self, peer_id: int) -> None:
        if self.pending is not None and self.pending.partner == peer_id:
            self._complete()

    def peer_left(self, peer_id: int) -> None:
        if self.pending is not None and self.pending.partner == peer_id:
            self._log(f"partner {peer_id} left before the pairing completed; seeking again")
            self.pending = None
            self.seek()

    def _found(self, pair: Pair) -> None:
        self.pending = pair
        self._complete()

    def _complete(self) -> None:
        pair = self.pending
        if pair is None or pair.partner not in self.device.peers:
            return  # its join notice is on its way: peer_joined completes it
        self.pending = None
        self.done = True
        self.device.on_interrupt = self.plugin.interrupt
        region = pair.region
        offset, size = (region.offset, region.size) if region else (0, 0)
        self._report(
            event="paired",
            key=pair.key,
            partner=pair.partner,
            leader=pair.leader,
            offset=offset,
            size=size,
        )
        where = f", region {size} bytes at {offset:#x}" if region else ""
        role = "it waited: we answer" if not pair.leader else "we waited: we lead"
        self._log(f"paired with peer {pair.partner} ({pair.key}{where}; {role})")
        self.plugin.paired(pair)
        if not pair.leader:
            self._ring(pair.partner, PAIRING_VECTOR)
