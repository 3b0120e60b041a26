"""PCI helpers over qtest: configuration mechanism #1 (ports 0xcf8/0xcfc) on bus 0, BAR
sizing and placement, capability lookup, and the MSI-X layout, as a guest's PCI core does
them. Nothing here is specific to ivshmem; the constants are the PCI Local Bus spec's, kept
independent of the device model (:mod:`vmm.pci`) so that the QEMU side of the differential
tests is driven by the spec, not by the model it checks."""

from __future__ import annotations

from dataclasses import dataclass

from .transport import U32, QtestConnection, QtestError

__all__ = ["FOUR_GIB", "MAX_MSIX_VECTORS", "PciFunction", "find_pci_function"]

# PCI configuration mechanism #1 (the PC's 0xcf8/0xcfc ports).
PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_CONFIG_ENABLE = 0x8000_0000
PCI_CONFIG_SIZE = 0x100
PCI_SLOTS = 32
PCI_FUNCTIONS = 8
PCI_NUM_BARS = 6

# Configuration-space offsets and bits (PCI Local Bus spec).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS_CAP_LIST = 0x10
PCI_HEADER_MULTI_FUNCTION = 0x80
PCI_BAR_SPACE_IO = 0x1
PCI_BAR_MEM_TYPE_MASK = 0x6
PCI_BAR_MEM_TYPE_64 = 0x4
PCI_BAR_MEM_FLAGS = 0xF
PCI_BAR_IO_FLAGS = 0x3
PCI_CAP_ID_MSIX = 0x11
#: A capability pointer's low two bits are reserved.
PCI_CAP_POINTER_MASK = 0xFC
#: Vendor id of an empty slot.
PCI_NO_DEVICE = 0xFFFF

# MSI-X capability and table layout.
MSIX_FLAGS = 2  # message control, 16 bits
MSIX_TABLE = 4  # table offset | BIR
MSIX_PBA = 8  # PBA offset | BIR
MSIX_FLAGS_ENABLE = 0x8000
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_QSIZE = 0x07FF
MSIX_BIR_MASK = 0x7
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_ADDR_LO = 0
MSIX_ENTRY_ADDR_HI = 4
MSIX_ENTRY_DATA = 8
MSIX_ENTRY_VECTOR_CTRL = 12
MSIX_ENTRY_CTRL_MASKBIT = 0x1
#: The largest MSI-X table a PCI function can have.
MAX_MSIX_VECTORS = 2048

FOUR_GIB = 1 << 32


@dataclass(frozen=True)
class PciFunction:
    """One function on PCI bus 0, with 32/16/8-bit configuration access through 0xcf8/0xcfc."""

    qtest: QtestConnection
    devfn: int

    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7

    def _select(self, offset: int, size: int) -> int:
        if not 0 <= offset <= PCI_CONFIG_SIZE - size or offset % size:
            raise ValueError(f"bad {size}-byte config offset {offset:#x}")
        address = PCI_CONFIG_ENABLE | self.devfn << 8 | (offset & ~3)
        self.qtest.outl(PCI_CONFIG_ADDRESS, address)
        return PCI_CONFIG_DATA + (offset & 3)

    def read8(self, offset: int) -> int:
        return self.qtest.inb(self._select(offset, 1))

    def read16(self, offset: int) -> int:
        return self.qtest.inw(self._select(offset, 2))

    def read32(self, offset: int) -> int:
        return self.qtest.inl(self._select(offset, 4))

    def write8(self, offset: int, value: int) -> None:
        self.qtest.outb(self._select(offset, 1), value)

    def write16(self, offset: int, value: int) -> None:
        self.qtest.outw(self._select(offset, 2), value)

    def write32(self, offset: int, value: int) -> None:
        self.qtest.outl(self._select(offset, 4), value)

    def find_capability(self, cap_id: int) -> int:
        """Offset of the first capability ``cap_id`` in the capability list, or 0."""
        if not self.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST:
            return 0
        offset = self.read8(PCI_CAPABILITY_LIST) & PCI_CAP_POINTER_MASK
        seen: set[int] = set()
        while offset and offset not in seen:
            seen.add(offset)
            if self.read8(offset) == cap_id:
                return offset
            offset = self.read8(offset + 1) & PCI_CAP_POINTER_MASK
        return 0

    def bar_info(self, index: int) -> tuple[int, bool, bool]:
        """Size BAR ``index``: ``(size, is_io, is_64bit)``; size 0 means not implemented.

        Writes all-ones to the BAR (and its upper half for a 64-bit BAR) and reads back the
        size mask; the BAR is left unprogrammed, so call this with decoding disabled.
        """
        if not 0 <= index < PCI_NUM_BARS:
            raise ValueError(f"BAR index must be 0..{PCI_NUM_BARS - 1}, got {index}")
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        self.write32(reg, U32)
        low = self.read32(reg)
        if low == 0:
            return 0, False, False
        if low & PCI_BAR_SPACE_IO:
            mask = low & ~PCI_BAR_IO_FLAGS & 0xFFFF
            return (mask & -mask), True, False
        is_64 = (low & PCI_BAR_MEM_TYPE_MASK) == PCI_BAR_MEM_TYPE_64
        mask = low & ~PCI_BAR_MEM_FLAGS & U32
        if is_64:
            self.write32(reg + 4, U32)
            mask |= self.read32(reg + 4) << 32
        if mask == 0:
            return 0, False, is_64
        return (mask & -mask), False, is_64

    def map_bar(self, index: int, gpa: int) -> tuple[int, bool]:
        """Size memory BAR ``index`` and place it at ``gpa``: returns ``(size, is_64bit)``."""
        size, is_io, is_64 = self.bar_info(index)
        if size == 0:
            raise QtestError(f"PCI {self.slot:02x}.{self.function} has no BAR{index}")
        if is_io:
            raise QtestError(f"BAR{index} of PCI {self.slot:02x}.{self.function} is an I/O BAR")
        if gpa % size:
            raise ValueError(f"BAR{index} at {gpa:#x} is not aligned to its size {size:#x}")
        if not is_64 and gpa + size > FOUR_GIB:
            raise ValueError(f"32-bit BAR{index} cannot be placed at {gpa:#x}")
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        self.write32(reg, gpa & U32)
        if is_64:
            self.write32(reg + 4, gpa >> 32)
        return size, is_64


def find_pci_function(qtest: QtestConnection, vendor_id: int, device_id: int) -> PciFunction:
    """The first function on bus 0 with these ids (slot by slot, function by function)."""
    for slot in range(PCI_SLOTS):
        for function in range(PCI_FUNCTIONS):
            candidate = PciFunction(qtest, slot << 3 | function)
            ids = candidate.read32(PCI_VENDOR_ID)
            if ids & 0xFFFF == PCI_NO_DEVICE:
                if function == 0:
                    break
                continue
            if ids == device_id << 16 | vendor_id:
                return candidate
            if function == 0 and not candidate.read8(PCI_HEADER_TYPE) & PCI_HEADER_MULTI_FUNCTION:
                break
    raise QtestError(f"no PCI device {vendor_id:04x}:{device_id:04x} on bus 0", qtest.stderr_text())
