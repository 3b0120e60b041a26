"""The peer machine: a VMM model with the ivshmem device, wired to a server connection.

:class:`PeerMachine` is the I/O-free core both event loops drive (:mod:`peers.loops`): it
builds a :class:`vmm.Vm` with a RAM memslot and the ivshmem device whose BAR2 is backed by
the shm mmap, keeps the device's peer table in step with the daemon's join and leave
notices, turns a ring on one of our own eventfds into a device interrupt, and turns a
doorbell the guest writes into ``eventfd_write(1)`` on the destination's eventfd.

The per-doorbell path is: guest ``vcpu.write32`` -> MMIO dispatch -> device -> the
destination's route, resolved once per (peer, vector) until the peer table changes:
``functools.partial(ring_eventfd, fd)``, one Python frame between the device and the
``eventfd_write``. When the daemon keeps a memory log (a federation that replicates the
shared memory), the route is :func:`peers.memreport.reporting_ring`: the shm pages written
since the last doorbell are reported first, then the eventfd is written. The per-interrupt
path is: eventfd readable -> one non-blocking read -> ``device.ring`` -> ``plugin.interrupt``
(the device delivers an open MSI-X vector directly).

Neither path ever blocks on an eventfd another process controls (``O_NONBLOCK`` lives in
the file description every holder shares, so any of them may clear it): our own vectors
are read with ``preadv2(RWF_NOWAIT)`` (:func:`peers.client.vector_handler`, bound once per
vector), and a ring puts ``O_NONBLOCK`` back first if it was cleared
(:func:`peers.client.ring_eventfd`).
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ivshmemd.telemetry import TelemetryEndpoints, watched_now
from vmm import Backing, Vm
from vmm.ivshmem import IvshmemDevice

from .client import (
    IvshmemClient,
    PeerLeft,
    PeerVector,
    read_vector,
    ring_eventfd,
    vector_handler,
)
from .memreport import MemReporter, reporting_ring
from .pairing import PartnerSearch
from .plugin import Guest, Plugin
from .shmdir import ShmDirectory
from .telemetry import DirtyHeat, PeerCounters, TelemetryLink, telemetry_identity

__all__ = ["Layout", "PeerMachine", "PeerOutcome"]


def shm_page_size(size: int) -> int:
    """The host page size to back BAR2 with: the largest of 1G/2M/4K that divides the shm
    (a shm segment is hugepage-backed where the host allows; blocks make bulk accesses one
    slice each instead of one per 4 KiB page)."""
    for page in (1 << 30, 2 << 20):
        if size % page == 0:
            return page
    return 4096


@dataclass(frozen=True)
class Layout:
    """Where things sit in guest-physical memory."""

    ram_gpa: int = 0x8000_0000
    ram_size: int = 16 << 20
    bar0_gpa: int = 0x4000_0000
    bar1_gpa: int = 0x4000_1000
    shm_gpa: int = 0x1_0000_0000  # 4 GiB, BAR2 is 64-bit
    ram_slot: int = 0
    shm_slot: int = 1


@dataclass
class PeerOutcome:
    """How the peer ended: ``ok`` and the plugin's summary (or the reason it failed)."""

    ok: bool
    summary: str | None


class PeerMachine:
    """One peer: VM + device + plugin, fed by its connection's events."""

    def __init__(
        self,
        client: IvshmemClient,
        plugin: Plugin,
        *,
        vectors: int | None = None,
        layout: Layout = Layout(),
        report: Callable[..., None] = lambda **fields: None,
        log: Callable[[str], None] = lambda message: None,
        plugin_name: str | None = None,
        telemetry: bool = True,
    ) -> None:
        self.client = client
        self.plugin = plugin
        #: what it runs: the pairing key of ``guest.find_partner()``
        self.plugin_name = plugin_name or plugin.name or type(plugin).__name__
        self.layout = layout
        self.outcome: PeerOutcome | None = None
        self._report = report
        self._log = log
        #: vectors the server hands each peer, and vectors of our device
        self.server_vectors = len(client.own_vectors)
        self.vectors = vectors if vectors is not None else max(1, self.server_vectors)
        #: a peer counts as joined once this many of its vectors are connected
        self._joined_at = min(self.vectors, self.server_vectors)
        #: what the hot paths count (None: telemetry off, nothing counted)
        self.counters = PeerCounters(self.vectors) if telemetry else None
        #: where to report once someone watches (set by whoever runs the peer; None: never)
        self.telemetry_endpoints: TelemetryEndpoints | None = None
        #: the link to the control process's telemetry, made by :meth:`start_telemetry`
        self.telemetry_link: TelemetryLink | None = None
        self.shm = mmap.mmap(client.shm_fd, client.shm_size, mmap.MAP_SHARED)
        self.vm = Vm()
        self.vm.set_user_memory_region(
            layout.ram_slot, 0, layout.ram_gpa, layout.ram_size,
            Backing.anonymous(layout.ram_size),
        )  # fmt: skip
        self.vcpu = self.vm.create_vcpu(0)
        self.device = IvshmemDevice(
            client.shm_size,
            self.vectors,
            own_id=client.peer_id,
            notify=self._doorbell,
            on_interrupt=plugin.interrupt,
            doorbell_route=self._route,
        )
        self.device.attach(
            self.vm, layout.shm_slot, layout.bar0_gpa, layout.bar1_gpa, layout.shm_gpa, self.shm,
            page_size=shm_page_size(client.shm_size),
        )  # fmt: skip
        #: peer id -> its eventfds; ourselves included (a doorbell to our own id rings us)
        self.peer_fds: dict[int, list[int]] = client.peers
        self.peer_fds[client.peer_id] = client.own_vectors
        for peer_id, fds in self.peer_fds.items():
            self.device.set_peer(peer_id, min(len(fds), self.vectors))
        self._own_fds = list(client.own_vectors[: self.vectors])
        vcpu, shm_gpa = self.vcpu, layout.shm_gpa
        directory = ShmDirectory(
            client.shm_fd, client.shm_size, lambda offset, size: vcpu.read(shm_gpa + offset, size),
            lambda offset, data: vcpu.write(shm_gpa + offset, data), client.peer_id,
        )  # fmt: skip
        self.guest = Guest(
            self.vm, self.vcpu, self.device,
            ram_gpa=layout.ram_gpa, ram_size=layout.ram_size, bar0_gpa=layout.bar0_gpa,
            bar1_gpa=layout.bar1_gpa, shm_gpa=layout.shm_gpa,
            finish=self._finish, report=report, log=log, directory=directory,
            find_partner=self._find_partner,
            count=self.counters.count if self.counters is not None else None,
        )  # fmt: skip
        self.dirty_heat = DirtyHeat(self.vm, layout.shm_slot, client.shm_size)
        self._identity = telemetry_identity(client.peer_id, self.plugin_name)
        #: the memory-log channel to the daemon (None: nobody listens, or not started yet)
        self.memlog: MemReporter | None = None
        #: a ``guest.find_partner()`` under way (None once paired)
        self.partner_search: PartnerSearch | None = None
        self._started = False
        self._stopped = False

    # -- the hot paths --------------------------------------------------------------------

    def _doorbell(self, peer_id: int, vector: int) -> None:
        if self.counters is not None:
            self.counters.rung[self.counters.slot(peer_id, vector)] += 1
        memlog = self.memlog
        if memlog is not None and memlog.tracker.pending:
            memlog.report()
        ring_eventfd(self.peer_fds[peer_id][vector])

    def _route(self, peer_id: int, vector: int) -> Callable[[], bool]:
        """What rings ``peer_id``'s ``vector``: :func:`ring_eventfd` bound to its eventfd
        (the device keeps it until its peer table changes, which the server events below
        always do when a peer's eventfds come or go); with telemetry, bound to the pair's
        counter slot as well; with a memory log, :func:`~peers.memreport.reporting_ring`
        (the pages written since the last report go to the daemon first)."""
        fd = self.peer_fds[peer_id][vector]
        counters = self.counters
        counting = () if counters is None else (counters.rung, counters.slot(peer_id, vector))
        memlog = self.memlog
        if memlog is not None:
            return partial(reporting_ring, memlog.tracker, memlog.report, fd, *counting)
        return partial(ring_eventfd, fd, *counting)

    def on_vector(self, vector: int) -> bool:
        """Our eventfd ``vector`` may be readable: consume it and interrupt the guest once.
        Returns whether it had been rung. Never blocks (see :func:`read_vector`)."""
        if not read_vector(self._own_fds[vector]):
            return False
        if self.counters is not None:
            self.counters.interrupts[vector] += 1
        self.device.ring(vector)
        return True

    def vector_handler(self, vector: int) -> Callable[[], bool]:
        """:meth:`on_vector` for one vector, bound once (an event loop's per-fd handler,
        :func:`peers.client.vector_handler`)."""
        counts = self.counters.interrupts if self.counters is not None else None
        return vector_handler(
            self._own_fds[vector], partial(self.device.ring, vector), counts, vector
        )

    # -- telemetry ------------------------------------------------------------------------

    def start_telemetry(self) -> TelemetryLink | None:
        """Connect the telemetry link (once): someone watches (the control process knocked,
        or its flag said so at start). Until then nothing but the counters runs: no zmq
        context, no thread, no fd in the event loop."""
        if self.telemetry_link is None and self.telemetry_endpoints is not None:
            self.telemetry_link = TelemetryLink(self.telemetry_endpoints, self.telemetry_report)
        return self.telemetry_link

    def watched_at_start(self) -> bool:
        """Whether someone already watches (the control process's flag file is fresh)."""
        endpoints = self.telemetry_endpoints
        return endpoints is not None and watched_now(endpoints)

    def telemetry_report(self) -> dict[str, Any]:
        """This peer's report (:mod:`ivshmemd.telemetry`): its counts, and the shm pages
        dirtied since the last report (harvested now, in bulk)."""
        counters = self.counters
        self.dirty_heat.harvest()
        report: dict[str, Any] = {**self._identity, "t": time.monotonic()}
        if counters is not None:
            report.update(
                rung=counters.rung_list(), interrupts=list(counters.interrupts),
                counters=dict(counters.plugin),
            )  # fmt: skip
        if self.dirty_heat.usable:
            report["dirty"] = self.dirty_heat.report()
        return report

    @property
    def own_fds(self) -> list[int]:
        """Our own vectors' eventfds, vector order (what the event loop watches)."""
        return self._own_fds

    # -- server events --------------------------------------------------------------------

    def on_server_event(self, event: PeerVector | PeerLeft) -> None:
        """Apply a join or leave notice to the device's peer table and tell the plugin."""
        if isinstance(event, PeerVector):
            if event.own:
                if event.index < self.vectors and event.fd not in self._own_fds:
                    self._own_fds.append(event.fd)
                return
            if event.index < self.vectors:
                self.device.add_peer_vector(event.peer_id, event.index)
            if event.index + 1 == self._joined_at:
                self._report(event="peer-joined", peer_id=event.peer_id)
                if self._started and not self.done:
                    self.plugin.peer_joined(event.peer_id)
                if self.partner_search is not None:
                    self.partner_search.peer_joined(event.peer_id)
                    self._forget_search()
        else:
            # A ring that peer sent before leaving may still sit in our eventfds: deliver it
            # first, so the plugin sees the peer's last doorbell before its departure. Not
            # before the plugin has started: its driver has not enabled MSI-X yet, and a ring
            # consumed now would be lost (QEMU drops rings while MSI-X is off); left in the
            # eventfd, the event loop delivers it once the guest is ready.
            if self._started:
                for vector in range(len(self._own_fds)):
                    self.on_vector(vector)
            self.device.remove_peer(event.peer_id)
            self._report(event="peer-left", peer_id=event.peer_id)
            if self._started and not self.done:
                self.plugin.peer_left(event.peer_id)
            if self.partner_search is not None:
                self.partner_search.peer_left(event.peer_id)
                self._forget_search()

    # -- partners -------------------------------------------------------------------------

    def _find_partner(self, key: str | None, size: int) -> None:
        """``guest.find_partner()``: see :mod:`peers.pairing`."""
        search = PartnerSearch(
            self.guest.shm, key or self.plugin_name, size, self.device, self.plugin,
            self.guest.ring, self._report, self._log,
        )  # fmt: skip
        self.partner_search = search
        search.seek()
        self._forget_search()

    def _forget_search(self) -> None:
        if self.partner_search is not None and self.partner_search.done:
            self.partner_search = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Open the memory log (if the daemon listens) and hand the guest to the plugin."""
        self._started = True
        self.start_memlog()
        self.plugin.start(self.guest)

    def start_memlog(self) -> MemReporter | None:
        """Connect to the daemon's memory log beside our ivshmem socket, once: from then on
        every doorbell reports the shm pages written since the previous one first
        (:mod:`peers.memreport`). Nobody listening: nothing changes."""
        path = self.client.socket_path
        if self.memlog is None and path:
            self.memlog = MemReporter.connect(
                path, self.client.peer_id, self.client.shm_size, self.vm,
                self.layout.shm_slot, self._log,
            )  # fmt: skip
            if self.memlog is not None:
                self.memlog.on_close = self._memlog_closed
                self.device.doorbell_route = self._route  # routes that report
        return self.memlog

    def _memlog_closed(self) -> None:
        """The channel was given up: back to plain routes."""
        self.memlog = None
        self.device.doorbell_route = self._route

    def _finish(self, summary: str | None, ok: bool) -> None:
        if self.outcome is None:
            self.outcome = PeerOutcome(ok, summary)

    @property
    def done(self) -> bool:
        """True once the plugin has finished or failed."""
        return self.outcome is not None

    def stop(self) -> None:
        """Stop the plugin and release the VM, the mapping and the connection."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._started:
                self.plugin.stop()
        finally:
            if self.telemetry_link is not None:
                self.telemetry_link.close(final=True)
            if self.memlog is not None:
                self.memlog.close()
            self.vm.close()
            try:
                self.shm.close()
            except BufferError:
                pass  # a view is still exported; the mapping goes with the process
            self.client.close()
