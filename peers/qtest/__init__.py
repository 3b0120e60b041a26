"""Drive a real QEMU ivshmem device with no guest OS, through QEMU's qtest protocol.

A :class:`QemuIvshmemVm` starts ``qemu-system-x86_64 -qtest stdio`` with one ivshmem device
(``ivshmem-doorbell`` on an ivshmem server's socket, or ``ivshmem-plain`` on a file such as
``/dev/shm/NAME``) and plays the guest's PCI driver itself: it enumerates bus 0 through the
configuration ports 0xcf8/0xcfc, sizes and places BAR0 (registers), BAR1 (MSI-X) and BAR2 (the
shared memory, 64-bit) at chosen guest-physical addresses, enables memory decoding and bus
mastering, and enables MSI-X with every vector masked, so that an incoming doorbell sets the
vector's pending bit (as QEMU's own ``tests/qtest/ivshmem-test.c`` observes it). A vector can
also be routed to guest RAM (:meth:`QemuIvshmemVm.msix_route`): the device's MSI-X message is
then a real memory write of a chosen value, visible with :meth:`QtestConnection.readl`.

It is meant for users' own tests: real QEMU VMs sharing an ivshmem server (``ivshmemd`` or
QEMU's ``ivshmem-server``) with our peers.

Resources and errors: every QEMU process is started in :class:`QtestConnection` and is killed
and reaped by ``close()`` (also on every failed start and by the context managers). When the
creating thread is the main thread, QEMU additionally gets a parent-death signal (through
``setpriv --pdeathsig``) so that it cannot outlive a test runner that is killed outright. Every
reply is awaited with a deadline; QEMU dying, a ``FAIL``/``ERR`` reply or a timeout raise
:class:`QtestError` carrying QEMU's stderr. Arguments are checked here before they are sent,
because QEMU answers a malformed qtest command with an assertion failure (it aborts).

QEMU facts this driver relies on (QEMU 7.2): an ``ivshmem-doorbell`` device blocks QEMU's
start-up until the server has sent the version, the peer id and the shared-memory fd, so the
server must be listening before the VM starts; ``ivshmem-doorbell`` always uses MSI-X, and
while MSI-X is disabled it reads and drops incoming rings, so MSI-X is enabled right after the
BARs are placed; the pending-bit array is read-only and a pending bit is only cleared by
unmasking the vector (which delivers the message); a VM learns the other peers' eventfds
asynchronously after its start-up, and drops doorbells to peers it does not know yet (see
:func:`ring_until_pending`). Debian's QEMU is built without the ``qtest`` accelerator:
the driver then uses TCG with the vCPU stopped (``-S``), so no firmware ever runs and the PCI
devices stay unconfigured, exactly as under ``-accel qtest``.
"""

from __future__ import annotations

from vmm.ivshmem import IVSHMEM_DEVICE_ID, IVSHMEM_VENDOR_ID

from .ivshmem import BarLayout, QemuIvshmemVm, VmOptions, ring_until_pending
from .pci import PciFunction, find_pci_function
from .transport import (
    DEFAULT_TIMEOUT,
    QEMU_BINARY,
    QemuOptions,
    QtestConnection,
    QtestError,
    qemu_available,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "IVSHMEM_DEVICE_ID",
    "IVSHMEM_VENDOR_ID",
    "QEMU_BINARY",
    "BarLayout",
    "PciFunction",
    "QemuIvshmemVm",
    "QemuOptions",
    "QtestConnection",
    "QtestError",
    "VmOptions",
    "find_pci_function",
    "qemu_available",
    "ring_until_pending",
]
