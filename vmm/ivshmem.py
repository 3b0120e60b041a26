"""The ivshmem-doorbell PCI device, as QEMU's ``hw/misc/ivshmem.c`` behaves from the guest.

What the guest sees (docs/ivshmem-protocol.md):

* PCI 1af4:1110 revision 1, class 0x0500, subsystem 1af4:1100; config space through
  :meth:`IvshmemDevice.config_read` / :meth:`IvshmemDevice.config_write`.
* BAR0, 256 bytes of 32-bit registers (the device itself is BAR0's MMIO handler); the
  offsets are public names here (:data:`REG_INTRMASK` ...), for drivers and tests:

  ========  ==========  ===========================================================
  offset    register    behaviour
  ========  ==========  ===========================================================
  0         IntrMask    read/write
  4         IntrStatus  read/write; a read returns the value and clears it
  8         IVPosition  read-only: own peer id (0xffffffff, i.e. -1, while unknown)
  12        Doorbell    write-only (reads 0): bits 31..16 peer id, bits 7..0 vector
                        (:func:`doorbell_value` / :func:`doorbell_fields`)
  ========  ==========  ===========================================================

  Other offsets read 0 and ignore writes. Every access size is accepted, exactly as QEMU
  7.2 serves a guest's MMIO exit (``address_space_rw`` then ``ivshmem_io_read/write``, with
  ``impl`` sizes 4..4 and no ``valid`` limits): the memory core splits an access into
  naturally aligned pieces of at most 4 bytes (a piece is also no wider than its address's
  alignment), low address first; each piece reaches the device as a 4-byte access at the
  piece's own offset. A read at an offset that is not a multiple of 4 returns 0 (QEMU's
  read handler sees no register there) and a write goes to the register of its dword
  (the handler masks the offset with 0xfc), with the piece's value zero-extended. So a
  qword read at 0 returns ``IntrStatus << 32 | IntrMask`` (and clears IntrStatus), a
  qword write at 8 rings the Doorbell with its high half, and a ``readl`` at offset 2
  returns ``IntrStatus << 16``. tests/vmm/test_ivshmem_device.py checks all of this
  against QEMU itself.
* BAR1, MSI-X with one vector per eventfd (table at 0, PBA at 0x800), served by
  :attr:`IvshmemDevice.msix`.
* BAR2, the shared memory (64-bit, prefetchable), mapped by :meth:`IvshmemDevice.attach`
  as a memslot on the shm backing, so the guest reaches it through the stage-2 tables.

Doorbells: a Doorbell write to a peer in the peer table, on a vector below that peer's
number of connected vectors, calls ``notify(peer_id, vector)`` (the peer runtime writes 1
to that eventfd); anything else is ignored, as QEMU does. Each destination is resolved
once into a *route*, a callable of no arguments that rings it (by default
``notify(peer_id, vector)``; ``doorbell_route(peer_id, vector)`` lets the owner of the
eventfds hand the device the write itself, e.g. ``functools.partial(os.eventfd_write, fd,
1)``). Routes are kept per Doorbell word until the peer table, ``notify`` or
``doorbell_route`` changes: a doorbell is one dict look-up and one call.

Incoming interrupts: the runtime calls :meth:`IvshmemDevice.ring` when one of its own
vector eventfds fires. With MSI-X enabled the vector is delivered through
``on_interrupt(vector)`` or, while masked, left pending in the PBA (unmasking delivers it).
A vector MSI-X would deliver now (enabled, unmasked, bus mastering on) goes straight to
``on_interrupt``, with no generic dispatch in between.
With MSI-X disabled the device falls back to the original ivshmem's legacy INTx model
(``intx_fallback=True``, the default): IntrStatus becomes 1 and the INTx line is asserted
while ``IntrStatus & IntrMask`` is non-zero (and command.INTX_DISABLE is clear);
``on_interrupt(INTX_VECTOR)`` is called on each rising edge. QEMU's current
ivshmem-doorbell drops rings while MSI-X is disabled instead; ``intx_fallback=False``
reproduces that.

Memory decoding follows the command register: with command.MEMORY clear, BAR0/BAR1 reads
return all ones and writes are dropped (a master abort). MSI-X messages need bus mastering
(command.MASTER) as in QEMU, where they are DMA writes. :meth:`IvshmemDevice.attach` plays
firmware and the driver's ``pci_enable_device``/``pci_set_master``: it programs the BARs and
sets both bits.

The model is pure and synchronous: no sockets, no threads, no event loop; drive one device
from one thread. tests/test_ivshmem_device.py runs the same guest script on QEMU 7.2's
ivshmem-doorbell (under qtest) and on this model and requires identical observations.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from vmm.pci import (
    CLASS_MEMORY_RAM,
    COMMAND,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    Msix,
    PciAccessError,
    PciConfigSpace,
)

__all__ = [
    "BAR0_SIZE",
    "DOORBELL_PEER_MASK",
    "DOORBELL_PEER_SHIFT",
    "DOORBELL_VECTOR_MASK",
    "INTX_VECTOR",
    "IVSHMEM_DEVICE_ID",
    "IVSHMEM_SUBSYSTEM_ID",
    "IVSHMEM_VENDOR_ID",
    "MAX_PEER_ID",
    "REG_DOORBELL",
    "REG_INTRMASK",
    "REG_INTRSTATUS",
    "REG_IVPOSITION",
    "DoorbellNotifier",
    "DoorbellRoute",
    "InterruptSink",
    "IvshmemDevice",
    "RouteResolver",
    "VmLike",
    "doorbell_fields",
    "doorbell_value",
]

IVSHMEM_VENDOR_ID = 0x1AF4  # Red Hat / Qumranet
IVSHMEM_DEVICE_ID = 0x1110
IVSHMEM_REVISION = 1
IVSHMEM_SUBSYSTEM_VENDOR_ID = 0x1AF4
IVSHMEM_SUBSYSTEM_ID = 0x1100

#: BAR0 offset of IntrMask (read/write): INTx is asserted while ``IntrStatus & IntrMask``.
REG_INTRMASK = 0
#: BAR0 offset of IntrStatus (read/write; reading it returns the value and clears it).
REG_INTRSTATUS = 4
#: BAR0 offset of IVPosition (read-only): this peer's id, 0xffffffff while unknown.
REG_IVPOSITION = 8
#: BAR0 offset of Doorbell (write-only, reads 0): ``doorbell_value(peer_id, vector)``.
REG_DOORBELL = 12
#: BAR0's size in bytes.
BAR0_SIZE = 0x100
#: Doorbell word: the destination peer id sits in bits 31..16 ...
DOORBELL_PEER_SHIFT = 16
DOORBELL_PEER_MASK = 0xFFFF
#: ... and the vector in bits 7..0 (bits 15..8 are ignored).
DOORBELL_VECTOR_MASK = 0xFF

REGISTERS_BAR = 0
MSIX_BAR = 1
SHM_BAR = 2

MAX_PEER_ID = 0xFFFF
MIN_SHM_SIZE = 4096
#: What IVPosition reads before the own peer id is known (-1 as a 32-bit register).
IVPOSITION_UNKNOWN = 0xFFFFFFFF
#: The "vector" passed to ``on_interrupt`` for a legacy INTx assertion.
INTX_VECTOR = -1

_REG_MASK = 0xFC
_ALL_ONES = 0xFFFFFFFF
_WIDTH_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
#: QEMU's memory core serves BAR0 in pieces of at most this many bytes (no ``valid`` limit)
_MAX_PIECE = 4

DoorbellNotifier = Callable[[int, int], None]
InterruptSink = Callable[[int], None]
#: What rings one destination (a peer's vector): called with no arguments.
DoorbellRoute = Callable[[], object]
#: Resolves a destination into its route once: ``doorbell_route(peer_id, vector)``.
RouteResolver = Callable[[int, int], DoorbellRoute]
#: The bits of a Doorbell word that name its destination (peer id and vector).
_DOORBELL_DESTINATION = 0xFFFF00FF


class VmLike(Protocol):
    """The part of ``vmm.Vm`` that :meth:`IvshmemDevice.attach` uses."""

    def register_mmio(self, gpa: int, size: int, handler: Any) -> Any: ...

    def unregister_mmio(self, gpa: int) -> Any: ...

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, backing: Any
    ) -> Any: ...


def _no_notifier(peer_id: int, vector: int) -> None:
    raise RuntimeError(
        f"ivshmem doorbell to peer {peer_id} vector {vector}, but the device has no "
        "doorbell notifier: pass notify= or set device.notify"
    )


def _ignore_interrupt(vector: int) -> None:
    """Default interrupt sink: a guest with no handler installed."""


def _pieces(offset: int, size: int) -> list[tuple[int, int, int]]:
    """``(position, offset, width)`` of the pieces QEMU's ``flatview_read/write_continue``
    cuts an access into (``memory_access_size``): at most 4 bytes, no wider than the
    address's alignment, a power of two."""
    out = []
    pos = 0
    while pos < size:
        addr = offset + pos
        width = min(size - pos, _MAX_PIECE, (addr & -addr) or _MAX_PIECE)
        width = 1 << (width.bit_length() - 1)
        out.append((pos, addr, width))
        pos += width
    return out


def doorbell_value(peer_id: int, vector: int = 0) -> int:
    """The 32-bit word a guest writes to :data:`REG_DOORBELL` to ring ``peer_id``'s
    ``vector``."""
    _check_peer_id(peer_id)
    if not isinstance(vector, int) or not 0 <= vector <= DOORBELL_VECTOR_MASK:
        raise ValueError(f"doorbell vector must be in 0..{DOORBELL_VECTOR_MASK}, got {vector!r}")
    return (peer_id << DOORBELL_PEER_SHIFT) | vector


def doorbell_fields(value: int) -> tuple[int, int]:
    """``(peer_id, vector)`` of a Doorbell word, as the device decodes it."""
    return (value >> DOORBELL_PEER_SHIFT) & DOORBELL_PEER_MASK, value & DOORBELL_VECTOR_MASK


def _check_peer_id(peer_id: int) -> None:
    if not isinstance(peer_id, int) or not 0 <= peer_id <= MAX_PEER_ID:
        raise ValueError(f"peer id must be in 0..{MAX_PEER_ID}, got {peer_id!r}")


class IvshmemDevice:
    """One ivshmem-doorbell function: config space, BAR0 registers, BAR1 MSI-X, BAR2 shm.

    ``shm_size`` is the shared memory's size (a power of two >= 4 KiB), ``vectors`` the
    device's MSI-X vector count (QEMU's ``vectors=`` property, 1 by default).
    """

    def __init__(
        self,
        shm_size: int,
        vectors: int = 1,
        *,
        own_id: int | None = None,
        notify: DoorbellNotifier | None = None,
        on_interrupt: InterruptSink | None = None,
        intx_fallback: bool = True,
        doorbell_route: RouteResolver | None = None,
    ) -> None:
        if not isinstance(shm_size, int) or shm_size < MIN_SHM_SIZE or shm_size & (shm_size - 1):
            raise ValueError(
                f"shared memory size must be a power of two >= {MIN_SHM_SIZE}, got {shm_size!r}"
            )
        if not isinstance(vectors, int) or vectors < 1:
            raise ValueError(f"the device needs at least 1 vector, got {vectors!r}")
        self.shm_size = shm_size
        self.vectors = vectors
        #: Doorbell word (destination bits) -> its route; see :attr:`notify`
        self._routes: dict[int, DoorbellRoute] = {}
        self._notify: DoorbellNotifier = notify or _no_notifier
        self._doorbell_route: RouteResolver | None = doorbell_route
        #: Called as ``on_interrupt(vector)`` for each interrupt the guest receives.
        self.on_interrupt: InterruptSink = on_interrupt or _ignore_interrupt
        self.intx_fallback = intx_fallback

        self.config = PciConfigSpace(
            vendor_id=IVSHMEM_VENDOR_ID,
            device_id=IVSHMEM_DEVICE_ID,
            revision=IVSHMEM_REVISION,
            class_code=CLASS_MEMORY_RAM,
            subsystem_vendor_id=IVSHMEM_SUBSYSTEM_VENDOR_ID,
            subsystem_id=IVSHMEM_SUBSYSTEM_ID,
            interrupt_pin=1 if intx_fallback else 0,
        )
        self.config.add_memory_bar(REGISTERS_BAR, BAR0_SIZE)
        self.msix = Msix(self.config, vectors, MSIX_BAR, self._deliver_msix)
        self._msix_notify = self.msix.notify
        self.config.add_memory_bar(MSIX_BAR, self.msix.bar_size)
        self.config.add_memory_bar(SHM_BAR, shm_size, mem64=True, prefetchable=True)
        self.config.seal()
        self.config.add_write_hook(self._config_written)

        self._peer_vectors: dict[int, int] = {}
        self._own_id: int | None = None
        if own_id is not None:
            self.own_id = own_id
        self._intr_mask = 0
        self._intr_status = 0
        self._intx_level = False
        self._decode = False
        self._master = False

    # ------------------------------------------------------------------ identity
    @property
    def own_id(self) -> int | None:
        """This peer's id (IVPosition), None until the server has sent it."""
        return self._own_id

    @own_id.setter
    def own_id(self, peer_id: int | None) -> None:
        if peer_id is not None:
            _check_peer_id(peer_id)
        self._own_id = peer_id

    # ------------------------------------------------------------------ doorbells out
    @property
    def notify(self) -> DoorbellNotifier:
        """Called as ``notify(peer_id, vector)`` for each accepted doorbell (unless
        :attr:`doorbell_route` resolves the destinations); setting it drops the routes."""
        return self._notify

    @notify.setter
    def notify(self, notify: DoorbellNotifier) -> None:
        self._notify = notify
        self._routes.clear()

    @property
    def doorbell_route(self) -> RouteResolver | None:
        """``doorbell_route(peer_id, vector)`` returns what rings that destination (called
        with no arguments); None: ``notify(peer_id, vector)``. Setting it drops the routes."""
        return self._doorbell_route

    @doorbell_route.setter
    def doorbell_route(self, resolver: RouteResolver | None) -> None:
        self._doorbell_route = resolver
        self._routes.clear()

    def _route(self, value: int) -> DoorbellRoute | None:
        """The route of the Doorbell word ``value``, resolved and kept; None if the
        destination is not in the peer table (the doorbell is ignored)."""
        dest, vector = doorbell_fields(value)
        connected = self._peer_vectors.get(dest)
        if connected is None or vector >= connected:
            return None
        resolver = self._doorbell_route
        if resolver is None:
            route: DoorbellRoute = partial(self._notify, dest, vector)
        else:
            route = resolver(dest, vector)
        self._routes[value & _DOORBELL_DESTINATION] = route
        return route

    # ------------------------------------------------------------------ peer table
    def add_peer_vector(self, peer_id: int, vector: int) -> None:
        """Record that ``peer_id``'s eventfd for ``vector`` arrived (protocol order).

        The n-th eventfd for a peer is its vector n-1, so ``vector`` must equal the number
        of vectors already connected. More eventfds than the device has vectors are refused,
        as QEMU does ("Too many eventfd received"): the caller closes that fd.
        """
        _check_peer_id(peer_id)
        connected = self._peer_vectors.get(peer_id, 0)
        if connected >= self.vectors:
            raise ValueError(
                f"too many eventfds for peer {peer_id}: the device has {self.vectors} vectors"
            )
        if vector != connected:
            raise ValueError(
                f"peer {peer_id}: vector {vector} announced out of order, "
                f"expected vector {connected}"
            )
        self._peer_vectors[peer_id] = connected + 1
        self._routes.clear()

    def set_peer(self, peer_id: int, nvectors: int) -> None:
        """Set ``peer_id``'s connected vector count at once (1..vectors)."""
        _check_peer_id(peer_id)
        if not isinstance(nvectors, int) or not 1 <= nvectors <= self.vectors:
            raise ValueError(
                f"peer {peer_id}: vector count must be in 1..{self.vectors}, got {nvectors!r}"
            )
        self._peer_vectors[peer_id] = nvectors
        self._routes.clear()

    def remove_peer(self, peer_id: int) -> bool:
        """Forget ``peer_id`` (it left); True if it was known.

        Doorbells to it are ignored from now on. Removing the own id is an error, as in
        QEMU (the server never announces the receiver's own leave).
        """
        _check_peer_id(peer_id)
        if peer_id == self._own_id:
            raise ValueError(f"peer {peer_id} is this device's own id and cannot leave")
        self._routes.clear()
        return self._peer_vectors.pop(peer_id, None) is not None

    def connected_vectors(self, peer_id: int) -> int:
        """How many of ``peer_id``'s vectors are connected (0 if unknown)."""
        return self._peer_vectors.get(peer_id, 0)

    @property
    def peers(self) -> dict[int, int]:
        """A copy of the peer table: peer id -> connected vectors."""
        return dict(self._peer_vectors)

    # ------------------------------------------------------------------ config space
    def config_read(self, offset: int, size: int) -> int:
        """Guest read of the PCI configuration space."""
        return self.config.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Guest write of the PCI configuration space."""
        self.config.config_write(offset, size, value)

    def _config_written(self, offset: int, size: int) -> None:
        self._decode = self.config.memory_enabled
        self._master = bool(self.config.data[COMMAND] & COMMAND_MASTER)
        self._update_intx()

    def reset(self) -> None:
        """Device reset: registers, config space and MSI-X back to power-on values.

        The peer table and own id are connection state, not guest-visible registers, and
        survive a reset (as in QEMU).
        """
        self.config.reset()
        self.msix.reset()
        self._intr_mask = 0
        self._intr_status = 0
        self._intx_level = False
        self._decode = False
        self._master = False
        self.config.set_interrupt_status(False)

    # ------------------------------------------------------------------ BAR0
    def mmio_read(self, offset: int, size: int) -> int:
        """Guest read of BAR0 (any size, split as QEMU's memory core splits it)."""
        if size == 4 and not offset & 3 and 0 <= offset < BAR0_SIZE:
            if not self._decode:
                return _ALL_ONES
            return self._read_register(offset)
        self._check_access(offset, size)
        if not self._decode:
            return (1 << (8 * size)) - 1
        value = 0
        for pos, piece, width in _pieces(offset, size):
            reg = self._read_register(piece) if not piece & 3 else 0
            value |= (reg & _WIDTH_MASKS[width]) << (8 * pos)
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Guest write of BAR0; the Doorbell path (an aligned 4-byte write at 12) is kept
        short: one dict look-up of the destination's route and one call."""
        if offset == 12 and size == 4:  # REG_DOORBELL, spelled as a constant on this path
            if self._decode:
                route = self._routes.get(value & 0xFFFF00FF) or self._route(value)
                if route is not None:
                    route()
            return
        self._check_access(offset, size)
        if not self._decode:
            return
        for pos, piece, width in _pieces(offset, size):
            self._write_register(piece & _REG_MASK, (value >> (8 * pos)) & _WIDTH_MASKS[width])

    def _read_register(self, offset: int) -> int:
        if offset == REG_INTRMASK:
            return self._intr_mask
        if offset == REG_INTRSTATUS:
            status = self._intr_status
            self._intr_status = 0  # reading the ISR clears all interrupts
            self._update_intx()
            return status
        if offset == REG_IVPOSITION:
            return IVPOSITION_UNKNOWN if self._own_id is None else self._own_id
        return 0  # Doorbell and unassigned offsets read 0

    def _write_register(self, register: int, value: int) -> None:
        if register == REG_INTRMASK:
            self._intr_mask = value
            self._update_intx()
        elif register == REG_INTRSTATUS:
            self._intr_status = value
            self._update_intx()
        elif register == REG_DOORBELL:
            route = self._routes.get(value & _DOORBELL_DESTINATION) or self._route(value)
            if route is not None:
                route()
        # IVPosition is read-only; other offsets ignore writes.

    @staticmethod
    def _check_access(offset: int, size: int) -> None:
        """Refuse what never reaches BAR0 from a guest (the MMIO bus checks the same)."""
        if size not in _WIDTH_MASKS:
            raise PciAccessError(f"ivshmem BAR0 accesses are 1, 2, 4 or 8 bytes, got {size}")
        if offset < 0 or offset + size > BAR0_SIZE:
            raise PciAccessError(
                f"ivshmem BAR0 access of {size} bytes at {offset:#x} is outside the "
                f"{BAR0_SIZE}-byte BAR"
            )

    # ------------------------------------------------------------------ interrupts
    def ring(self, vector: int) -> None:
        """One of this peer's own vector eventfds fired: signal ``vector`` to the guest."""
        if vector >= 0 and (self.msix.open_vectors >> vector) & 1 and self._master:
            self.on_interrupt(vector)  # what MSI-X would do now, without the dispatch
            return
        if not 0 <= vector < self.vectors:
            raise ValueError(f"vector {vector} is outside the device's {self.vectors} vectors")
        if self._msix_notify(vector):
            return
        if self.intx_fallback:
            self._intr_status = 1
            self._update_intx()
        # else: QEMU's ivshmem-doorbell drops a ring while MSI-X is disabled.

    def _deliver_msix(self, vector: int) -> None:
        # An MSI-X message is a DMA write: it goes nowhere without bus mastering.
        if self._master:
            self.on_interrupt(vector)

    @property
    def intr_status(self) -> int:
        """IntrStatus as the device holds it (reading it here does not clear it)."""
        return self._intr_status

    @property
    def intr_mask(self) -> int:
        """IntrMask as the device holds it."""
        return self._intr_mask

    @property
    def intx_level(self) -> bool:
        """Whether the INTx line is asserted now."""
        return self._intx_level

    def _update_intx(self) -> None:
        asserted = (
            self.intx_fallback
            and bool(self._intr_status & self._intr_mask)
            and not self.msix.enabled
        )
        self.config.set_interrupt_status(asserted)
        level = asserted and not self.config.intx_disabled
        rising = level and not self._intx_level
        self._intx_level = level
        if rising:
            self.on_interrupt(INTX_VECTOR)

    # ------------------------------------------------------------------ wiring
    def attach(
        self,
        vm: VmLike,
        slot: int,
        bar0_gpa: int,
        bar1_gpa: int,
        bar2_gpa: int,
        shm: Any,
        *,
        page_size: int = 4096,
    ) -> None:
        """Place the BARs at the given GPAs and plug the device into ``vm``.

        Registers BAR0 and BAR1 as MMIO regions, maps BAR2 as memslot ``slot`` on ``shm``
        (a ``vmm.memory.Backing``, or a buffer such as the shm mmap, wrapped with
        ``Backing.from_buffer(shm, page_size=page_size)``), then programs the BAR addresses
        and sets command.MEMORY|MASTER (firmware plus the driver's enable). If the VM
        refuses a region, what was already registered is undone and the error propagates.
        The mapping is fixed at attach time: a guest that later reprograms a BAR through
        config space does not move the VM's regions.
        """
        from vmm.memory import Backing  # the VMM's memory module; imported when wiring

        for index, gpa in ((REGISTERS_BAR, bar0_gpa), (MSIX_BAR, bar1_gpa), (SHM_BAR, bar2_gpa)):
            size = self.config.bar_size(index)
            if gpa < 0 or gpa % size:
                raise ValueError(f"BAR{index} at {gpa:#x} is not aligned to its size {size:#x}")
        if bar0_gpa >> 32 or bar1_gpa >> 32:
            raise ValueError("BAR0 and BAR1 are 32-bit BARs: place them below 4 GiB")
        if isinstance(shm, Backing):
            backing = shm
        else:
            nbytes = memoryview(shm).nbytes
            if nbytes != self.shm_size:
                raise ValueError(
                    f"shared memory buffer is {nbytes:#x} bytes, the device's BAR2 is "
                    f"{self.shm_size:#x}"
                )
            backing = Backing.from_buffer(shm, page_size=page_size)
        vm.register_mmio(bar0_gpa, BAR0_SIZE, self)
        try:
            vm.register_mmio(bar1_gpa, self.msix.bar_size, self.msix)
            try:
                vm.set_user_memory_region(slot, 0, bar2_gpa, self.shm_size, backing)
            except BaseException:
                vm.unregister_mmio(bar1_gpa)
                raise
        except BaseException:
            vm.unregister_mmio(bar0_gpa)
            raise
        self.config.set_bar_address(REGISTERS_BAR, bar0_gpa)
        self.config.set_bar_address(MSIX_BAR, bar1_gpa)
        self.config.set_bar_address(SHM_BAR, bar2_gpa)
        self.config.set_command_bits(COMMAND_MEMORY | COMMAND_MASTER)

    def __repr__(self) -> str:
        return (
            f"IvshmemDevice(own_id={self._own_id}, vectors={self.vectors}, "
            f"shm_size={self.shm_size:#x}, peers={len(self._peer_vectors)})"
        )
