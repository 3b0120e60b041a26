"""The ivshmem-specific part of the qtest driver: a real QEMU VM with one ivshmem device,
probed and driven as its guest driver would (:class:`QemuIvshmemVm`). The device's BAR0
register map and ids are the device model's (:mod:`vmm.ivshmem`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

from ivshmemd.closing import Closing
from vmm.ivshmem import (
    BAR0_SIZE,
    IVSHMEM_DEVICE_ID,
    IVSHMEM_VENDOR_ID,
    REG_DOORBELL,
    REG_INTRMASK,
    REG_INTRSTATUS,
    REG_IVPOSITION,
)

from .pci import (
    FOUR_GIB,
    MAX_MSIX_VECTORS,
    MSIX_BIR_MASK,
    MSIX_ENTRY_ADDR_HI,
    MSIX_ENTRY_ADDR_LO,
    MSIX_ENTRY_CTRL_MASKBIT,
    MSIX_ENTRY_DATA,
    MSIX_ENTRY_SIZE,
    MSIX_ENTRY_VECTOR_CTRL,
    MSIX_FLAGS,
    MSIX_FLAGS_ENABLE,
    MSIX_FLAGS_MASKALL,
    MSIX_FLAGS_QSIZE,
    MSIX_PBA,
    MSIX_TABLE,
    PCI_CAP_ID_MSIX,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    find_pci_function,
)
from .transport import (
    U32,
    QemuOptions,
    QtestConnection,
    QtestError,
    check_unsigned,
)

__all__ = ["BarLayout", "QemuIvshmemVm", "VmOptions", "ring_until_pending"]

logger = logging.getLogger(__name__)

#: Pending-bit polls between two rings in :func:`ring_until_pending`.
POLLS_PER_RING = 64
#: Where BAR2 goes when the device's BAR2 is 32-bit (below the PC's 4 GiB PCI hole).
BAR2_32BIT_GPA = 0xC000_0000
#: The smallest shared memory an ivshmem device accepts (and a power of two).
MIN_SHM_SIZE = 4096


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class BarLayout:
    """Where the driver places the ivshmem BARs (guest-physical addresses).

    ``bar2=None`` places the shared memory at the lowest multiple of its size at or above
    4 GiB, which never collides with RAM, the registers or the PC's 32-bit PCI hole.
    """

    bar0: int = 0xE000_0000
    bar1: int = 0xE000_1000
    bar2: int | None = None


class VmOptions(QemuOptions, total=False):
    """Keyword options of :class:`QemuIvshmemVm` and its :meth:`~QemuIvshmemVm.doorbell` and
    :meth:`~QemuIvshmemVm.plain` constructors: QEMU's, and where the BARs go."""

    layout: BarLayout | None


class QemuIvshmemVm(Closing):
    """A real QEMU VM with one ivshmem device, driven as its guest driver would.

    Build one with :meth:`doorbell` (``ivshmem-doorbell`` on an ivshmem server's socket) or
    :meth:`plain` (``ivshmem-plain`` on a shared file). The constructor runs the whole driver
    probe (find 1af4:1110, place the BARs, enable memory + bus master, enable MSI-X with all
    vectors masked); use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        device_args: Sequence[str],
        *,
        layout: BarLayout | None = None,
        **qemu: Unpack[QemuOptions],
    ) -> None:
        """Start QEMU with ``device_args`` (which must create one ivshmem device) and probe it;
        ``qemu``: :class:`~peers.qtest.transport.QemuOptions`."""
        layout = layout or BarLayout()
        self.qtest = QtestConnection(device_args, **qemu)
        try:
            self._probe(layout)
        except BaseException:
            self.qtest.close()
            raise

    @classmethod
    def doorbell(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        vectors: int = 1,
        **options: Unpack[VmOptions],
    ) -> QemuIvshmemVm:
        """A VM with ``ivshmem-doorbell,vectors=N`` on the server listening at ``socket_path``.

        The server must already be listening: QEMU blocks at start-up until it has received the
        version, its peer id and the shared memory. QEMU's doorbell device always has MSI-X
        (BAR1, one vector per ``vectors``). ``options`` go to the constructor.
        """
        path = os.fspath(socket_path)
        if "," in path:
            raise ValueError(f"QEMU cannot take a socket path with a comma: {path!r}")
        if not isinstance(vectors, int) or not 1 <= vectors <= MAX_MSIX_VECTORS:
            raise ValueError(f"vectors must be 1..{MAX_MSIX_VECTORS}, got {vectors!r}")
        args = [
            "-chardev",
            f"socket,id=ivshmem-server,path={path}",
            "-device",
            f"ivshmem-doorbell,chardev=ivshmem-server,vectors={vectors}",
        ]
        return cls(args, **options)

    @classmethod
    def plain(
        cls,
        mem_path: str | os.PathLike[str],
        size: int,
        **options: Unpack[VmOptions],
    ) -> QemuIvshmemVm:
        """A VM with ``ivshmem-plain`` on the file ``mem_path`` (shared, ``size`` bytes).

        For a POSIX shared-memory object NAME use ``/dev/shm/NAME``. QEMU creates the file if it
        does not exist.
        """
        path = os.fspath(mem_path)
        if "," in path:
            raise ValueError(f"QEMU cannot take a path with a comma: {path!r}")
        if not isinstance(size, int) or size < MIN_SHM_SIZE or size & (size - 1):
            raise ValueError(f"size must be a power of two >= {MIN_SHM_SIZE}, got {size!r}")
        args = [
            "-object",
            f"memory-backend-file,id=ivshmem-mem,size={size},share=on,mem-path={path}",
            "-device",
            "ivshmem-plain,memdev=ivshmem-mem",
        ]
        return cls(args, **options)

    # -- probe ---------------------------------------------------------------------------------

    def _probe(self, layout: BarLayout) -> None:
        pci = find_pci_function(self.qtest, IVSHMEM_VENDOR_ID, IVSHMEM_DEVICE_ID)
        self.pci = pci
        pci.write16(PCI_COMMAND, pci.read16(PCI_COMMAND) & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO))

        size, _ = pci.map_bar(0, layout.bar0)
        if size != BAR0_SIZE:
            raise QtestError(f"BAR0 is {size} bytes, expected {BAR0_SIZE}")
        self.bar0 = layout.bar0

        bar2_size, _, bar2_64 = pci.bar_info(2)
        if bar2_size == 0:
            raise QtestError("the ivshmem device has no BAR2 (shared memory)")
        bar2 = layout.bar2
        if bar2 is None:
            bar2 = _align_up(FOUR_GIB, bar2_size) if bar2_64 else BAR2_32BIT_GPA
        pci.map_bar(2, bar2)
        #: Guest-physical address and size of BAR2 (the shared memory).
        self.bar2 = bar2
        self.bar2_size = bar2_size

        self._msix_cap = pci.find_capability(PCI_CAP_ID_MSIX)
        self._msix_size = 0
        self.bar1: int | None = None
        if self._msix_cap:
            flags = pci.read16(self._msix_cap + MSIX_FLAGS)
            self._msix_size = (flags & MSIX_FLAGS_QSIZE) + 1
            table = pci.read32(self._msix_cap + MSIX_TABLE)
            pba = pci.read32(self._msix_cap + MSIX_PBA)
            if table & MSIX_BIR_MASK != 1 or pba & MSIX_BIR_MASK != 1:
                raise QtestError(f"MSI-X structures outside BAR1 (table {table:#x}, pba {pba:#x})")
            pci.map_bar(1, layout.bar1)
            self.bar1 = layout.bar1
            self._msix_table = layout.bar1 + (table & ~MSIX_BIR_MASK)
            self._msix_pba = layout.bar1 + (pba & ~MSIX_BIR_MASK)

        command = pci.read16(PCI_COMMAND) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        pci.write16(PCI_COMMAND, command)
        if pci.read16(PCI_COMMAND) & command != command:
            raise QtestError("the device refused memory decoding / bus mastering")

        if self._msix_cap:
            flags = pci.read16(self._msix_cap + MSIX_FLAGS)
            pci.write16(
                self._msix_cap + MSIX_FLAGS, (flags | MSIX_FLAGS_ENABLE) & ~MSIX_FLAGS_MASKALL
            )
            for vector in range(self._msix_size):
                self.msix_mask(vector)
        logger.debug(
            "QEMU %d: ivshmem at %02x.%d, BAR0 %#x, BAR1 %s, BAR2 %#x (+%#x)",
            self.qtest.pid,
            pci.slot,
            pci.function,
            self.bar0,
            None if self.bar1 is None else hex(self.bar1),
            self.bar2,
            self.bar2_size,
        )

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.qtest.pid

    def close(self) -> None:
        """Kill QEMU and reap it (idempotent)."""
        self.qtest.close()

    # -- BAR0 registers ------------------------------------------------------------------------

    def iv_position(self) -> int:
        """The IVPosition register: this VM's peer id (as the server assigned it)."""
        return self.qtest.readl(self.bar0 + REG_IVPOSITION)

    def read_intr_mask(self) -> int:
        """The IntrMask register."""
        return self.qtest.readl(self.bar0 + REG_INTRMASK)

    def write_intr_mask(self, value: int) -> None:
        """Set the IntrMask register."""
        self.qtest.writel(self.bar0 + REG_INTRMASK, value)

    def read_intr_status(self) -> int:
        """The IntrStatus register; the read clears it (device semantics)."""
        return self.qtest.readl(self.bar0 + REG_INTRSTATUS)

    def write_intr_status(self, value: int) -> None:
        """Set the IntrStatus register."""
        self.qtest.writel(self.bar0 + REG_INTRSTATUS, value)

    def ring(self, dest_peer: int, vector: int = 0) -> None:
        """Write the Doorbell register: ring ``vector`` of peer ``dest_peer``.

        QEMU's device only looks at the low 8 bits of the vector and ignores rings to unknown
        peers or unconnected vectors.
        """
        check_unsigned("dest_peer", dest_peer, 16)
        check_unsigned("vector", vector, 16)
        self.write_doorbell(dest_peer << 16 | vector)

    def write_doorbell(self, value: int) -> None:
        """Write a raw 32-bit value to the Doorbell register."""
        self.qtest.writel(self.bar0 + REG_DOORBELL, value)

    # -- BAR2: the shared memory ---------------------------------------------------------------

    def _check_bar2(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.bar2_size:
            raise ValueError(
                f"range {offset:#x}+{size:#x} is outside BAR2 (size {self.bar2_size:#x})"
            )

    def read_bar2(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the shared memory at ``offset``, through the guest's BAR2."""
        self._check_bar2(offset, size)
        return self.qtest.read(self.bar2 + offset, size)

    def write_bar2(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` into the shared memory at ``offset``, through the guest's BAR2."""
        self._check_bar2(offset, memoryview(data).nbytes)
        self.qtest.write(self.bar2 + offset, data)

    # -- MSI-X ---------------------------------------------------------------------------------

    def _msix_entry(self, vector: int) -> int:
        if not self._msix_cap:
            raise QtestError("this ivshmem device has no MSI-X (ivshmem-plain)")
        if not isinstance(vector, int) or not 0 <= vector < self._msix_size:
            raise ValueError(f"vector must be 0..{self._msix_size - 1}, got {vector!r}")
        return self._msix_table + vector * MSIX_ENTRY_SIZE

    def msix_table_size(self) -> int:
        """The number of MSI-X vectors (0 without MSI-X), read from the capability."""
        if not self._msix_cap:
            return 0
        return (self.pci.read16(self._msix_cap + MSIX_FLAGS) & MSIX_FLAGS_QSIZE) + 1

    def msix_pending(self, vector: int) -> bool:
        """Whether ``vector``'s bit is set in the pending-bit array.

        A masked vector that is signalled becomes pending; the bit stays set until the vector
        is unmasked (QEMU then delivers the message and clears it).
        """
        self._msix_entry(vector)
        word = self.qtest.readl(self._msix_pba + (vector // 32) * 4)
        return bool(word >> (vector % 32) & 1)

    def wait_msix_pending(self, vector: int, timeout: float | None = None) -> None:
        """Poll the pending-bit array until ``vector`` is pending, or raise :class:`QtestError`.

        Every poll is a qtest round trip, during which QEMU's main loop reads the device's
        eventfds; no sleeping is involved.
        """
        deadline = time.monotonic() + (self.qtest.timeout if timeout is None else timeout)
        while not self.msix_pending(vector):
            if time.monotonic() > deadline:
                raise QtestError(
                    f"MSI-X vector {vector} of QEMU {self.pid} did not become pending",
                    self.qtest.stderr_text(),
                )

    def msix_mask(self, vector: int) -> None:
        """Mask ``vector``: signals set its pending bit instead of sending a message."""
        entry = self._msix_entry(vector)
        ctrl = self.qtest.readl(entry + MSIX_ENTRY_VECTOR_CTRL)
        self.qtest.writel(entry + MSIX_ENTRY_VECTOR_CTRL, ctrl | MSIX_ENTRY_CTRL_MASKBIT)

    def msix_route(self, vector: int, gpa: int, data: int) -> None:
        """Send ``vector`` as a memory write of the 32-bit ``data`` to guest RAM at ``gpa``.

        Programs the table entry and unmasks it; a vector already pending is delivered at once.
        ``gpa`` must be in guest RAM (not in the 0xfee00000 interrupt window) to be observable
        with ``qtest.readl(gpa)``.
        """
        entry = self._msix_entry(vector)
        check_unsigned("gpa", gpa, 64)
        check_unsigned("data", data, 32)
        if gpa % 4:
            raise ValueError(f"an MSI-X address is 4-byte aligned, got {gpa:#x}")
        self.msix_mask(vector)
        self.qtest.writel(entry + MSIX_ENTRY_ADDR_LO, gpa & U32)
        self.qtest.writel(entry + MSIX_ENTRY_ADDR_HI, gpa >> 32)
        self.qtest.writel(entry + MSIX_ENTRY_DATA, data)
        ctrl = self.qtest.readl(entry + MSIX_ENTRY_VECTOR_CTRL)
        self.qtest.writel(entry + MSIX_ENTRY_VECTOR_CTRL, ctrl & ~MSIX_ENTRY_CTRL_MASKBIT)

    def wait_msix_message(self, gpa: int, data: int, timeout: float | None = None) -> None:
        """Poll guest RAM at ``gpa`` until it holds ``data`` (a routed vector fired)."""
        deadline = time.monotonic() + (self.qtest.timeout if timeout is None else timeout)
        while self.qtest.readl(gpa) != data:
            if time.monotonic() > deadline:
                raise QtestError(
                    f"no MSI-X message {data:#x} at {gpa:#x} in QEMU {self.pid}",
                    self.qtest.stderr_text(),
                )


def ring_until_pending(
    sender: QemuIvshmemVm, receiver: QemuIvshmemVm, vector: int, timeout: float | None = None
) -> int:
    """Ring ``vector`` of ``receiver`` from ``sender`` until the receiver sees it pending.

    Returns the number of rings it took. A VM learns the other peers' eventfds asynchronously:
    its start-up only waits for the version, its id and the shared memory, and join notices
    reach the VMs already running whenever their main loop gets to them. Until the sender's
    QEMU has processed them, its device drops doorbells to that peer, as for an unknown peer.
    Ringing again is harmless: eventfd counts add up and a pending bit is a level, so the
    receiver sees the same state as after one ring. The vector must be masked (the default).
    """
    dest = receiver.iv_position()
    deadline = time.monotonic() + (receiver.qtest.timeout if timeout is None else timeout)
    rings = 0
    while True:
        sender.ring(dest, vector)
        rings += 1
        for _ in range(POLLS_PER_RING):
            if receiver.msix_pending(vector):
                return rings
        if time.monotonic() > deadline:
            raise QtestError(
                f"vector {vector} of peer {dest} (QEMU {receiver.pid}) never became pending "
                f"after {rings} rings from QEMU {sender.pid}",
                receiver.qtest.stderr_text(),
            )
