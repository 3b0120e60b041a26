"""The peer's side of the memory-log channel: before every doorbell, the shm pages it wrote.

A federation that replicates the shared memory (issue 13) must get every write a peer made
before one of its doorbells to the rung peer's host before the interrupt. Our peers know
which pages they wrote: a dirty tracker of the shm memslot (:meth:`vmm.vm.Vm.track_dirty`,
stage-2 write protection, independent of the plugin's own dirty log). :class:`MemReporter`
hands those pages to the daemon on the side channel of :mod:`ivshmemd.memlog` (a
``SOCK_SEQPACKET`` unix socket at ``SOCK.memlog``), one packet per doorbell that follows a
write, *before* the eventfd is written.

Resources and failures:

* **No listener, no reporting.** The daemon only listens while its federation replicates
  memory. :meth:`MemReporter.connect` returns None when nothing is there (ENOENT,
  ECONNREFUSED), silently; for any other failure (a file that is no such socket, a listener
  that does not accept in time) it logs one line. Either way nothing else changes: no
  tracker, no report, the doorbell path is the plain one.
* **Order.** The socket is blocking: ``send`` returns once the packet is queued at the
  receiving socket, so the report is readable by the daemon before the eventfd write that
  follows it.
* **A daemon that does not read** (its queue full for :data:`SEND_TIMEOUT` seconds, with
  ``SO_SNDTIMEO``) or that went away: the channel is closed, its tracker too, and the peer
  goes on without reporting (one line in its log). The daemon then scans the whole region
  for this peer's writes: slower, nothing lost.
* **The doorbell path** gains one attribute read when nothing was written since the last
  report (:attr:`vmm.dirtytrack.DirtyTracker.pending`): no harvest, no packet.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ivshmemd.memlog import encode_dirty, encode_hello, memlog_path

from .client import ring_eventfd
from .shmdir import DIRECTORY_SIZE

if TYPE_CHECKING:
    from vmm import Vm
    from vmm.dirtytrack import DirtyTracker

__all__ = ["PAGE_SIZE", "SEND_TIMEOUT", "MemReporter", "reporting_ring"]

#: the channel's page size (the region's bitmap is in 4 KiB pages)
PAGE_SIZE: Final = 4096
#: how long a report may wait for room at the daemon before the channel is given up
SEND_TIMEOUT: Final = 2.0
#: nothing listens: the daemon does not replicate memory (not a failure)
_ABSENT: Final = (errno.ENOENT, errno.ECONNREFUSED)


class MemReporter:
    """One peer's channel to its daemon's memory log, and the tracker it reports from."""

    def __init__(
        self, sock: socket.socket, tracker: DirtyTracker, log: Callable[[str], None]
    ) -> None:
        self.sock = sock
        self.tracker = tracker
        self._log = log
        #: reports sent (one per doorbell that followed a write)
        self.sent = 0
        self.closed = False
        #: called once when the channel is given up (the runtime drops its routes)
        self.on_close: Callable[[], None] = _nothing

    @classmethod
    def connect(
        cls,
        socket_path: str,
        peer_id: int,
        shm_size: int,
        vm: Vm,
        slot: int,
        log: Callable[[str], None],
    ) -> MemReporter | None:
        """Connect to the memory log of the daemon serving ``socket_path``, say hello and
        start tracking ``slot`` (the shm memslot) of ``vm``; None if there is no listener
        (or it cannot be used: then one line is logged)."""
        path = memlog_path(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            seconds = int(SEND_TIMEOUT)
            timeval = struct.pack("@ll", seconds, int((SEND_TIMEOUT - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.connect(path)
            # the directory rests on this host's record locks: never replicated
            local = ((shm_size - DIRECTORY_SIZE, DIRECTORY_SIZE),)
            sock.send(encode_hello(peer_id, PAGE_SIZE, shm_size // PAGE_SIZE, local))
        except OSError as exc:
            sock.close()
            if exc.errno not in _ABSENT:
                log(f"memory log {path}: {_why(exc)}; not reporting written pages")
            return None
        try:
            tracker = vm.track_dirty(slot)
        except BaseException:
            sock.close()
            raise
        return cls(sock, tracker, log)

    def report(self) -> None:
        """Send the pages written since the last report, if any (before a doorbell)."""
        if self.closed:
            return
        packet = encode_dirty(self.tracker.harvest_words())
        if packet is None:
            return
        try:
            self.sock.send(packet)
        except OSError as exc:
            self._log(
                f"memory log: {_why(exc)}; closing it (the daemon scans for our writes instead)"
            )
            self.close()
            return
        self.sent += 1

    def close(self) -> None:
        """Close the channel and stop tracking (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.tracker.close()
        self.sock.close()
        self.on_close()


def reporting_ring(
    tracker: DirtyTracker,
    report: Callable[[], None],
    fd: int,
    counts: list[int] | None = None,
    slot: int = 0,
) -> bool:
    """A doorbell route with reporting: the pages written since the last report go to the
    daemon first (one check when there are none), then the ring (:func:`ring_eventfd`)."""
    if tracker.pending:
        report()
    return ring_eventfd(fd, counts, slot)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return f"the daemon did not take a report within {SEND_TIMEOUT:g} s"
    return exc.strerror or str(exc)


def _nothing() -> None:
    return None
