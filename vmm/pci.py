"""A conventional PCI function's configuration space and its MSI-X table, as a guest sees them.

Two pieces, each with one job:

* :class:`PciConfigSpace` — the 256-byte type-0 header plus capabilities. Every byte has a
  write mask (and a write-one-to-clear mask), as in QEMU's ``pci.c``: a config write keeps the
  read-only bits and replaces the writable ones. BAR sizing then falls out of the masks the
  way it does in hardware: a BAR's low address bits (below its size) are hard-wired to zero, so
  writing all ones reads back the size mask with the type bits.
* :class:`Msix` — an MSI-X capability in that config space plus its table and pending-bit
  array (PBA) in a BAR, served as an MMIO handler (``mmio_read``/``mmio_write``). A vector that
  fires while masked (by its vector-control bit or by the function mask) sets its pending bit;
  unmasking a vector whose pending bit is set delivers it and clears the bit, as the PCI spec
  requires.

Nothing here allocates or sleeps on the interrupt path: :meth:`Msix.notify` is a few attribute
reads and one call of the delivery sink.

Accesses the hardware would not accept (a bad size, a misaligned offset, an offset outside the
space) raise :class:`PciAccessError`, a :class:`vmm.errors.MmioError` (so a ``ValueError``)
with a message.
"""

from __future__ import annotations

from collections.abc import Callable

from vmm.errors import MmioError

__all__ = [
    "CAP_ID_MSIX",
    "CLASS_MEMORY_RAM",
    "COMMAND",
    "COMMAND_INTX_DISABLE",
    "COMMAND_IO",
    "COMMAND_MASTER",
    "COMMAND_MEMORY",
    "MSIX_CONTROL_ENABLE",
    "MSIX_CONTROL_FUNCTION_MASK",
    "MSIX_ENTRY_SIZE",
    "MSIX_VECTOR_MASKED",
    "Msix",
    "PciAccessError",
    "PciConfigSpace",
]

CONFIG_SPACE_SIZE = 256

# Type-0 header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40
NUM_BARS = 6

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
# What QEMU lets a guest change in the command register (checked on QEMU 7.2).
_COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE
)

STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010
# Error bits a driver clears by writing one (never set by this model, kept for fidelity).
_STATUS_W1C = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000

BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

#: Class code 0x0500: memory controller, RAM (what ivshmem reports).
CLASS_MEMORY_RAM = 0x0500

CAP_ID_MSIX = 0x11
MSIX_CAP_LENGTH = 12
MSIX_CONTROL_ENABLE = 0x8000
MSIX_CONTROL_FUNCTION_MASK = 0x4000
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 0x1
MSIX_MAX_VECTORS = 2048
#: Where an exclusive MSI-X BAR puts the PBA when the table fits below it (QEMU's layout).
MSIX_EXCLUSIVE_BAR_PBA_OFFSET = 0x800
MSIX_EXCLUSIVE_BAR_MIN_SIZE = 4096

ConfigWriteHook = Callable[[int, int], None]


class PciAccessError(MmioError):
    """A configuration or BAR access that the bus would not accept (a ``ValueError``)."""


def _check_config_access(offset: int, size: int) -> None:
    if size not in (1, 2, 4):
        raise PciAccessError(f"config access size must be 1, 2 or 4 bytes, got {size}")
    if not 0 <= offset < CONFIG_SPACE_SIZE:
        raise PciAccessError(f"config offset {offset:#x} is outside the 256-byte space")
    if (offset & 3) + size > 4:
        raise PciAccessError(
            f"config access of {size} bytes at {offset:#x} crosses a dword boundary"
        )


class PciConfigSpace:
    """The 256-byte configuration space of one conventional PCI function (header type 0)."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        revision: int,
        class_code: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        interrupt_pin: int = 0,
    ) -> None:
        """``class_code`` is base class << 8 | subclass (prog-if 0), e.g. 0x0500."""
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._bar_sizes: list[int] = [0] * NUM_BARS
        self._bar_flags: list[int] = [0] * NUM_BARS
        self._last_capability = 0
        self._next_capability_offset = FIRST_CAPABILITY
        self._write_hooks: list[ConfigWriteHook] = []

        self.set_field(VENDOR_ID, 2, vendor_id)
        self.set_field(DEVICE_ID, 2, device_id)
        self.set_field(REVISION_ID, 1, revision)
        self.set_field(CLASS_PROG, 1, 0)
        self.set_field(CLASS_PROG + 1, 2, class_code)
        self.set_field(HEADER_TYPE, 1, 0)
        self.set_field(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set_field(SUBSYSTEM_ID, 2, subsystem_id)
        self.set_field(INTERRUPT_PIN, 1, interrupt_pin)
        self._put_mask(self.wmask, COMMAND, 2, _COMMAND_WRITABLE)
        self._put_mask(self.w1cmask, STATUS, 2, _STATUS_W1C)
        self.wmask[CACHE_LINE_SIZE] = 0xFF
        self.wmask[INTERRUPT_LINE] = 0xFF
        self._reset_image: bytes = bytes(self.data)

    # ------------------------------------------------------------------ building
    def set_field(self, offset: int, size: int, value: int) -> None:
        """Device-side store of a little-endian field (ignores the guest write masks)."""
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    @staticmethod
    def _put_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset : offset + size] = value.to_bytes(size, "little")

    def field(self, offset: int, size: int) -> int:
        """Device-side load of a little-endian field."""
        return int.from_bytes(self.data[offset : offset + size], "little")

    def add_memory_bar(
        self, index: int, size: int, *, mem64: bool = False, prefetchable: bool = False
    ) -> None:
        """Declare a memory BAR of ``size`` bytes (a power of two >= 16)."""
        last = index + 1 if mem64 else index
        if index < 0 or last >= NUM_BARS:
            raise ValueError(f"BAR index {index} does not fit in the six BAR slots")
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR size must be a power of two >= 16, got {size:#x}")
        if not mem64 and size > 1 << 31:
            raise ValueError(f"a 32-bit BAR cannot be {size:#x} bytes; use mem64")
        if self._bar_sizes[index] or (mem64 and self._bar_sizes[index + 1]):
            raise ValueError(f"BAR {index} is already declared")
        flags = (BAR_MEM_TYPE_64 if mem64 else 0) | (BAR_MEM_PREFETCH if prefetchable else 0)
        self._bar_sizes[index] = size
        self._bar_flags[index] = flags
        address_mask = ~(size - 1)
        offset = BAR0 + 4 * index
        self.set_field(offset, 4, flags)
        self._put_mask(self.wmask, offset, 4, address_mask & 0xFFFFFFF0)
        if mem64:
            self._bar_sizes[index + 1] = -1  # upper half of a 64-bit BAR
            self.set_field(offset + 4, 4, 0)
            self._put_mask(self.wmask, offset + 4, 4, (address_mask >> 32) & 0xFFFFFFFF)
        self._reset_image = bytes(self.data)

    def add_capability(self, cap_id: int, length: int) -> int:
        """Append a capability of ``length`` bytes to the list; return its offset."""
        offset = self._next_capability_offset
        if offset + length > CONFIG_SPACE_SIZE:
            raise ValueError("no room left in config space for another capability")
        self.set_field(offset, 1, cap_id)
        self.set_field(offset + 1, 1, 0)
        if self._last_capability:
            self.set_field(self._last_capability + 1, 1, offset)
        else:
            self.set_field(CAPABILITY_LIST, 1, offset)
            self.set_field(STATUS, 2, self.field(STATUS, 2) | STATUS_CAP_LIST)
        self._last_capability = offset
        self._next_capability_offset = (offset + length + 3) & ~3
        self._reset_image = bytes(self.data)
        return offset

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        """Make the bits in ``mask`` of the field at ``offset`` writable by the guest."""
        self._put_mask(self.wmask, offset, size, mask)

    def seal(self) -> None:
        """Record the current contents as the image :meth:`reset` returns to."""
        self._reset_image = bytes(self.data)

    def add_write_hook(self, hook: ConfigWriteHook) -> None:
        """Call ``hook(offset, size)`` after every guest config write."""
        self._write_hooks.append(hook)

    # ------------------------------------------------------------------ guest access
    def config_read(self, offset: int, size: int) -> int:
        """A guest config read (CF8/CFC or ECAM) of 1, 2 or 4 bytes."""
        _check_config_access(offset, size)
        return int.from_bytes(self.data[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest config write: writable bits replaced, write-one-to-clear bits cleared."""
        _check_config_access(offset, size)
        data, wmask, w1c = self.data, self.wmask, self.w1cmask
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            pos = offset + i
            keep = data[pos] & ~wmask[pos] & 0xFF
            data[pos] = (keep | (byte & wmask[pos])) & ~(byte & w1c[pos]) & 0xFF
        for hook in self._write_hooks:
            hook(offset, size)

    # ------------------------------------------------------------------ device side
    def reset(self) -> None:
        """Return every register to its power-on value (command 0, BARs unassigned)."""
        self.data[:] = self._reset_image

    @property
    def command(self) -> int:
        """The command register."""
        return self.field(COMMAND, 2)

    @property
    def memory_enabled(self) -> bool:
        """Whether the function decodes its memory BARs (command bit 1)."""
        return bool(self.data[COMMAND] & COMMAND_MEMORY)

    @property
    def intx_disabled(self) -> bool:
        """Whether the driver disabled INTx (command bit 10)."""
        return bool(self.field(COMMAND, 2) & COMMAND_INTX_DISABLE)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Reflect the function's INTx state in status bit 3 (read-only to the guest)."""
        status = self.field(STATUS, 2)
        status = status | STATUS_INTERRUPT if asserted else status & ~STATUS_INTERRUPT
        self.set_field(STATUS, 2, status)

    def bar_size(self, index: int) -> int:
        """Declared size of BAR ``index`` (0 when the slot is unused)."""
        return max(self._bar_sizes[index], 0)

    def bar_address(self, index: int) -> int:
        """The address the guest (or firmware) programmed into BAR ``index``."""
        if self._bar_sizes[index] <= 0:
            raise ValueError(f"BAR {index} is not a declared BAR")
        low = self.field(BAR0 + 4 * index, 4) & 0xFFFFFFF0
        if self._bar_flags[index] & BAR_MEM_TYPE_64:
            return low | (self.field(BAR0 + 4 * index + 4, 4) << 32)
        return low

    def set_bar_address(self, index: int, address: int) -> None:
        """Program BAR ``index`` as firmware would (address must be aligned to its size)."""
        size = self._bar_sizes[index]
        if size <= 0:
            raise ValueError(f"BAR {index} is not a declared BAR")
        if address % size:
            raise ValueError(
                f"BAR {index} address {address:#x} is not aligned to its size {size:#x}"
            )
        mem64 = bool(self._bar_flags[index] & BAR_MEM_TYPE_64)
        if address >> (64 if mem64 else 32):
            raise ValueError(f"BAR {index} address {address:#x} does not fit the BAR")
        offset = BAR0 + 4 * index
        self.set_field(offset, 4, (address & 0xFFFFFFF0) | self._bar_flags[index])
        if mem64:
            self.set_field(offset + 4, 4, address >> 32)

    def set_command_bits(self, bits: int) -> None:
        """Set command bits as firmware or a driver's enable does (write hooks run)."""
        self.set_field(COMMAND, 2, self.field(COMMAND, 2) | bits)
        for hook in self._write_hooks:
            hook(COMMAND, 2)


class Msix:
    """An MSI-X capability with its table and PBA in an exclusive BAR (QEMU's layout).

    The table sits at BAR offset 0 and the PBA at 0x800 (or right after a larger table);
    the BAR is 4 KiB or the next power of two that holds both. ``deliver(vector)`` is called
    for each message the function sends.
    """

    def __init__(
        self,
        config: PciConfigSpace,
        nvectors: int,
        bar: int,
        deliver: Callable[[int], None],
    ) -> None:
        if not 1 <= nvectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X needs 1..{MSIX_MAX_VECTORS} vectors, got {nvectors}")
        self.nvectors = nvectors
        self.bar = bar
        self.deliver = deliver
        self.table_size = nvectors * MSIX_ENTRY_SIZE
        self.pba_offset = max(MSIX_EXCLUSIVE_BAR_PBA_OFFSET, self.table_size)
        self.pba_size = (nvectors + 63) // 64 * 8
        bar_size = MSIX_EXCLUSIVE_BAR_MIN_SIZE
        while bar_size < self.pba_offset + self.pba_size:
            bar_size *= 2
        self.bar_size = bar_size

        self._config = config
        self.cap_offset = config.add_capability(CAP_ID_MSIX, MSIX_CAP_LENGTH)
        self._control_offset = self.cap_offset + 2
        config.set_field(self._control_offset, 2, nvectors - 1)
        config.set_field(self.cap_offset + 4, 4, 0 | bar)
        config.set_field(self.cap_offset + 8, 4, self.pba_offset | bar)
        config.set_writable(
            self._control_offset, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK
        )
        config.seal()
        config.add_write_hook(self._config_written)

        # Table as dwords: [addr_lo, addr_hi, data, vector_control] per entry.
        self._table: list[int] = []
        self._pending = 0
        self.enabled = False
        self.function_masked = False
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Power-on state: disabled, every vector masked, nothing pending."""
        self._table = [0, 0, 0, MSIX_VECTOR_MASKED] * self.nvectors
        self._pending = 0
        self.enabled = False
        self.function_masked = False
        #: bit v set: vector v's own mask bit is clear (the table's vector-control bit 0)
        self._unmasked = 0
        #: bit v set: a notify of vector v is delivered now (enabled, no function mask,
        #: unmasked): what a device's interrupt fast path tests
        self.open_vectors = 0

    def _control(self) -> int:
        return self._config.field(self._control_offset, 2)

    def _update_open(self) -> None:
        self.open_vectors = self._unmasked if self.enabled and not self.function_masked else 0

    def vector_masked(self, vector: int) -> bool:
        """The vector's own mask bit (vector control bit 0)."""
        return not (self._unmasked >> vector) & 1

    def is_masked(self, vector: int) -> bool:
        """Masked by its own bit, by the function mask, or because MSI-X is disabled."""
        return not (self.open_vectors >> vector) & 1

    def is_pending(self, vector: int) -> bool:
        """The vector's bit in the PBA."""
        return bool((self._pending >> vector) & 1)

    @property
    def pending_bits(self) -> int:
        """The whole PBA as an integer (bit v = vector v)."""
        return self._pending

    def message(self, vector: int) -> tuple[int, int]:
        """The (address, data) pair the guest programmed for ``vector``."""
        base = 4 * vector
        t = self._table
        return t[base] | (t[base + 1] << 32), t[base + 2]

    # ------------------------------------------------------------------ signalling
    def notify(self, vector: int) -> bool:
        """Signal ``vector``: deliver it, or set its pending bit while it is masked.

        Returns False without doing anything when MSI-X is disabled (the caller decides what
        the function does then), True otherwise.
        """
        if not self.enabled:
            return False
        if self.is_masked(vector):
            self._pending |= 1 << vector
        else:
            self.deliver(vector)
        return True

    def _deliver_unmasked_pending(self) -> None:
        """Deliver (and clear) every pending vector that is no longer masked."""
        pending = self._pending
        while pending:
            low = pending & -pending
            vector = low.bit_length() - 1
            pending ^= low
            if not self.is_masked(vector):
                self._pending &= ~low
                self.deliver(vector)

    def _config_written(self, offset: int, size: int) -> None:
        if offset + size <= self._control_offset or offset >= self._control_offset + 2:
            return
        control = self._control()
        self.enabled = bool(control & MSIX_CONTROL_ENABLE)
        self.function_masked = bool(control & MSIX_CONTROL_FUNCTION_MASK)
        self._update_open()
        self._deliver_unmasked_pending()

    # ------------------------------------------------------------------ BAR access
    def _check(self, offset: int, size: int) -> None:
        if size not in (4, 8):
            raise PciAccessError(f"MSI-X BAR access must be 4 or 8 bytes, got {size}")
        if offset % size:
            raise PciAccessError(
                f"MSI-X BAR access of {size} bytes at {offset:#x} is not naturally aligned"
            )
        if not 0 <= offset <= self.bar_size - size:
            raise PciAccessError(
                f"MSI-X BAR offset {offset:#x} is outside the {self.bar_size:#x}-byte BAR"
            )

    def _read_dword(self, offset: int) -> int:
        if offset < self.table_size:
            return self._table[offset >> 2]
        if self.pba_offset <= offset < self.pba_offset + self.pba_size:
            return (self._pending >> (8 * (offset - self.pba_offset))) & 0xFFFFFFFF
        return 0

    def _write_dword(self, offset: int, value: int) -> None:
        if offset >= self.table_size:
            return  # PBA is read-only; holes ignore writes
        index = offset >> 2
        self._table[index] = value & 0xFFFFFFFF
        if index & 3 == 3:  # vector control: keep the mask bits in step with the table
            bit = 1 << (index >> 2)
            if value & MSIX_VECTOR_MASKED:
                self._unmasked &= ~bit
            else:
                self._unmasked |= bit
            self._update_open()
            if not value & MSIX_VECTOR_MASKED:
                self._deliver_unmasked_pending()

    def mmio_read(self, offset: int, size: int) -> int:
        """Guest read of the table or the PBA."""
        self._check(offset, size)
        value = self._read_dword(offset)
        if size == 8:
            value |= self._read_dword(offset + 4) << 32
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Guest write of the table (the PBA and the holes ignore writes)."""
        self._check(offset, size)
        self._write_dword(offset, value & 0xFFFFFFFF)
        if size == 8:
            self._write_dword(offset + 4, (value >> 32) & 0xFFFFFFFF)
