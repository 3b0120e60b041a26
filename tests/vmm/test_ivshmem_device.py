"""Tests for vmm.ivshmem (the ivshmem-doorbell device model) and vmm.pci.

Every register row of docs/ivshmem-protocol.md, MSI-X delivery/pending/unmask, the legacy
INTx mode, the peer table and doorbell filtering, PCI identity and BAR sizing.
"""

from __future__ import annotations

import gc
import mmap
import os
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from vmm.ivshmem import (
    BAR0_SIZE,
    INTX_VECTOR,
    REG_DOORBELL,
    REG_INTRMASK,
    REG_INTRSTATUS,
    REG_IVPOSITION,
    IvshmemDevice,
    doorbell_fields,
    doorbell_value,
)
from vmm.pci import (
    COMMAND_INTX_DISABLE,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK,
    Msix,
    PciAccessError,
)

if TYPE_CHECKING:
    from peers.qtest import PciFunction, QtestConnection

MIB = 1 << 20
PBA = 0x800


class Recorder:
    """Collects what the device hands to the runtime: doorbells and guest interrupts."""

    def __init__(self) -> None:
        self.doorbells: list[tuple[int, int]] = []
        self.interrupts: list[int] = []

    def notify(self, peer_id: int, vector: int) -> None:
        self.doorbells.append((peer_id, vector))

    def on_interrupt(self, vector: int) -> None:
        self.interrupts.append(vector)


def make_device(
    vectors: int = 2, own_id: int | None = 3, shm_size: int = MIB, **kw: bool
) -> tuple[IvshmemDevice, Recorder]:
    rec = Recorder()
    dev = IvshmemDevice(
        shm_size,
        vectors,
        own_id=own_id,
        notify=rec.notify,
        on_interrupt=rec.on_interrupt,
        **kw,
    )
    return dev, rec


def enable(dev: IvshmemDevice, bits: int = COMMAND_MEMORY | COMMAND_MASTER) -> None:
    """What a driver's pci_enable_device + pci_set_master do: a config write."""
    dev.config_write(0x04, 2, bits)


def msix_control_offset(dev: IvshmemDevice) -> int:
    cap = dev.config_read(0x34, 1)
    assert dev.config_read(cap, 1) == 0x11
    return cap + 2


def msix_enable(dev: IvshmemDevice, function_mask: bool = False) -> None:
    ctrl = msix_control_offset(dev)
    value = MSIX_CONTROL_ENABLE | (MSIX_CONTROL_FUNCTION_MASK if function_mask else 0)
    dev.config_write(ctrl, 2, value)


def program_vector(dev: IvshmemDevice, vector: int, addr: int, data: int, masked: bool) -> None:
    base = 16 * vector
    dev.msix.mmio_write(base + 0, 4, addr & 0xFFFFFFFF)
    dev.msix.mmio_write(base + 4, 4, addr >> 32)
    dev.msix.mmio_write(base + 8, 4, data)
    dev.msix.mmio_write(base + 12, 4, 1 if masked else 0)


# ---------------------------------------------------------------------- PCI identity


def test_config_identity() -> None:
    dev, _ = make_device(vectors=4)
    assert dev.config_read(0x00, 2) == 0x1AF4
    assert dev.config_read(0x02, 2) == 0x1110
    assert dev.config_read(0x00, 4) == 0x1110_1AF4
    assert dev.config_read(0x08, 1) == 1  # revision
    assert dev.config_read(0x09, 1) == 0  # prog-if
    assert dev.config_read(0x0A, 2) == 0x0500  # RAM controller
    assert dev.config_read(0x0E, 1) == 0  # header type 0
    assert dev.config_read(0x2C, 2) == 0x1AF4
    assert dev.config_read(0x2E, 2) == 0x1100
    assert dev.config_read(0x06, 2) & 0x10  # capability list
    assert dev.config_read(0x3D, 1) == 1  # INTA for the legacy INTx model
    assert dev.config_read(0x04, 2) == 0  # command after reset


def test_config_msix_capability() -> None:
    dev, _ = make_device(vectors=4)
    cap = dev.config_read(0x34, 1)
    assert cap == 0x40
    assert dev.config_read(cap, 1) == 0x11
    assert dev.config_read(cap + 1, 1) == 0  # last capability
    assert dev.config_read(cap + 2, 2) == 4 - 1  # table size - 1, disabled, unmasked
    assert dev.config_read(cap + 4, 4) == 0x0 | 1  # table at 0 in BAR1
    assert dev.config_read(cap + 8, 4) == PBA | 1  # PBA at 0x800 in BAR1
    # the table size is read-only
    dev.config_write(cap + 2, 2, 0x07FF)
    assert dev.config_read(cap + 2, 2) == 3
    dev.config_write(cap + 2, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    assert dev.config_read(cap + 2, 2) == 0xC003
    assert dev.msix.enabled and dev.msix.function_masked


def test_config_bar_sizing() -> None:
    dev, _ = make_device(shm_size=4 * MIB)
    for bar in range(6):
        dev.config_write(0x10 + 4 * bar, 4, 0xFFFFFFFF)
    assert dev.config_read(0x10, 4) == 0xFFFFFF00  # 256 B, mem32
    assert dev.config_read(0x14, 4) == 0xFFFFF000  # 4 KiB, mem32
    assert dev.config_read(0x18, 4) == 0xFFC0000C  # 4 MiB, 64-bit prefetchable
    assert dev.config_read(0x1C, 4) == 0xFFFFFFFF
    assert dev.config_read(0x20, 4) == 0  # BAR4/5 unimplemented
    assert dev.config_read(0x24, 4) == 0
    dev.config_write(0x30, 4, 0xFFFFFFFF)
    assert dev.config_read(0x30, 4) == 0  # no expansion ROM
    # program addresses as firmware does and read them back
    dev.config_write(0x10, 4, 0xFEB0_0000)
    dev.config_write(0x14, 4, 0xFEB0_1000)
    dev.config_write(0x18, 4, 0x0000_0000)
    dev.config_write(0x1C, 4, 0x0000_0008)
    assert dev.config.bar_address(0) == 0xFEB0_0000
    assert dev.config.bar_address(1) == 0xFEB0_1000
    assert dev.config.bar_address(2) == 0x8_0000_0000
    assert dev.config_read(0x18, 4) == 0xC  # type bits stay


def test_config_bar_sizing_large_shm() -> None:
    dev, _ = make_device(shm_size=8 << 30)
    dev.config_write(0x18, 4, 0xFFFFFFFF)
    dev.config_write(0x1C, 4, 0xFFFFFFFF)
    assert dev.config_read(0x18, 4) == 0x0000000C
    assert dev.config_read(0x1C, 4) == 0xFFFFFFFE  # 8 GiB


def test_config_command_register_and_reset() -> None:
    dev, _ = make_device()
    dev.config_write(0x04, 2, 0xFFFF)
    assert dev.config_read(0x04, 2) == 0x0507  # IO MEM MASTER SERR INTX_DISABLE
    dev.config_write(0x3C, 1, 11)
    assert dev.config_read(0x3C, 1) == 11
    dev.config_write(0x00, 4, 0)  # identity is read-only
    assert dev.config_read(0x00, 4) == 0x1110_1AF4
    dev.config_write(0x10, 4, 0xFEB0_0000)
    dev.reset()
    assert dev.config_read(0x04, 2) == 0
    assert dev.config_read(0x3C, 1) == 0
    assert dev.config_read(0x10, 4) == 0


def test_config_bad_access() -> None:
    dev, _ = make_device()
    with pytest.raises(PciAccessError, match="1, 2 or 4"):
        dev.config_read(0, 8)
    with pytest.raises(PciAccessError, match="dword"):
        dev.config_read(2, 4)
    with pytest.raises(PciAccessError, match="outside"):
        dev.config_write(256, 1, 0)


def test_bar1_size_grows_with_vectors() -> None:
    dev, _ = make_device(vectors=200)  # 200 * 16 = 3200 > 0x800
    assert dev.msix.pba_offset == 3200
    assert dev.msix.bar_size == 4096
    dev.config_write(0x14, 4, 0xFFFFFFFF)
    assert dev.config_read(0x14, 4) == 0xFFFFF000


# ---------------------------------------------------------------------- BAR0 registers


def test_intrmask_read_write() -> None:
    dev, _ = make_device()
    enable(dev)
    assert dev.mmio_read(REG_INTRMASK, 4) == 0
    dev.mmio_write(REG_INTRMASK, 4, 0xDEADBEEF)
    assert dev.mmio_read(REG_INTRMASK, 4) == 0xDEADBEEF
    assert dev.mmio_read(REG_INTRMASK, 4) == 0xDEADBEEF  # reading does not clear it


def test_intrstatus_read_clears() -> None:
    dev, _ = make_device()
    enable(dev)
    dev.mmio_write(REG_INTRSTATUS, 4, 0x5A)
    assert dev.intr_status == 0x5A
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0x5A
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0


def test_ivposition_read_only_own_id() -> None:
    dev, _ = make_device(own_id=None)
    enable(dev)
    assert dev.mmio_read(REG_IVPOSITION, 4) == 0xFFFFFFFF  # -1 before the id is known
    dev.own_id = 7
    assert dev.mmio_read(REG_IVPOSITION, 4) == 7
    dev.mmio_write(REG_IVPOSITION, 4, 99)
    assert dev.mmio_read(REG_IVPOSITION, 4) == 7
    assert dev.mmio_read(REG_INTRMASK, 4) == 0  # the write went nowhere else either
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        dev.own_id = 65536


def test_doorbell_write_only_reads_zero() -> None:
    dev, rec = make_device()
    enable(dev)
    dev.set_peer(5, 2)
    dev.mmio_write(REG_DOORBELL, 4, (5 << 16) | 1)
    assert rec.doorbells == [(5, 1)]
    assert dev.mmio_read(REG_DOORBELL, 4) == 0


def test_other_offsets_read_zero_and_ignore_writes() -> None:
    dev, rec = make_device()
    enable(dev)
    dev.set_peer(0, 2)
    for offset in range(16, BAR0_SIZE, 4):
        dev.mmio_write(offset, 4, 0xFFFFFFFF)
        assert dev.mmio_read(offset, 4) == 0
    assert dev.mmio_read(REG_INTRMASK, 4) == 0
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0
    assert dev.mmio_read(REG_IVPOSITION, 4) == 3
    assert rec.doorbells == []


def test_narrow_accesses_follow_qemu() -> None:
    dev, rec = make_device()
    enable(dev)
    dev.mmio_write(REG_INTRMASK, 4, 0x11223344)
    assert dev.mmio_read(REG_INTRMASK, 1) == 0x44
    assert dev.mmio_read(REG_INTRMASK, 2) == 0x3344
    assert dev.mmio_read(REG_INTRMASK + 2, 2) == 0  # not a register address in QEMU
    dev.mmio_write(REG_INTRMASK + 1, 1, 0xAB)  # lands on IntrMask, zero-extended
    assert dev.mmio_read(REG_INTRMASK, 4) == 0xAB
    dev.set_peer(0, 2)
    dev.mmio_write(REG_DOORBELL, 1, 0x01)  # peer 0, vector 1
    assert rec.doorbells == [(0, 1)]


def test_bar0_accepts_every_size_as_qemu_splits_it() -> None:
    """QEMU 7.2: a qword is two dwords (low first); misaligned accesses are cut at their
    alignment; a piece at a non-register offset reads 0 (test_model_matches_real_qemu
    checks the same script against QEMU itself)."""
    dev, rec = make_device()
    enable(dev)
    dev.mmio_write(REG_INTRMASK, 4, 0xAB)
    dev.mmio_write(REG_INTRSTATUS, 4, 0x77)
    assert dev.mmio_read(REG_INTRMASK, 8) == 0x77 << 32 | 0xAB
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0  # the qword read cleared it
    dev.set_peer(5, 2)
    dev.mmio_write(REG_IVPOSITION, 8, (5 << 16 | 1) << 32 | 0xFFFF)  # high half rings
    assert rec.doorbells == [(5, 1)]
    dev.mmio_write(REG_INTRSTATUS, 4, 0x99)
    assert dev.mmio_read(2, 4) == 0x99 << 16  # a 2-byte piece at 2 (0), one at 4
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0
    assert dev.mmio_read(4, 8) == 3 << 32  # IntrStatus (now 0), IVPosition
    dev.mmio_write(1, 2, 0x11)  # bytes at 1 and 2: both land on IntrMask, the last wins
    assert dev.mmio_read(REG_INTRMASK, 4) == 0
    dev.mmio_write(14, 4, 5 << 16)  # pieces at 14 (value 0 to the Doorbell) and 16
    assert rec.doorbells == [(5, 1)]


def test_bar0_bad_access() -> None:
    dev, _ = make_device()
    enable(dev)
    with pytest.raises(PciAccessError, match="1, 2, 4 or 8"):
        dev.mmio_read(0, 3)
    with pytest.raises(PciAccessError, match="outside"):
        dev.mmio_read(BAR0_SIZE, 4)
    with pytest.raises(PciAccessError, match="outside"):
        dev.mmio_write(BAR0_SIZE - 4, 8, 0)


def test_doorbell_encoding_helpers() -> None:
    assert doorbell_value(5, 1) == 5 << 16 | 1
    assert doorbell_fields(doorbell_value(0xFFFF, 0xFF)) == (0xFFFF, 0xFF)
    assert doorbell_fields(5 << 16 | 0x0101) == (5, 1)  # bits 15..8 are ignored
    with pytest.raises(ValueError, match="vector"):
        doorbell_value(1, 256)
    with pytest.raises(ValueError, match="peer id"):
        doorbell_value(1 << 16)


def test_memory_decode_disabled_master_aborts() -> None:
    dev, rec = make_device()
    dev.set_peer(5, 1)
    dev.mmio_write(REG_DOORBELL, 4, 5 << 16)
    dev.mmio_write(REG_INTRMASK, 4, 1)
    assert dev.mmio_read(REG_IVPOSITION, 4) == 0xFFFFFFFF
    assert dev.mmio_read(REG_INTRMASK, 2) == 0xFFFF
    assert rec.doorbells == []
    enable(dev, COMMAND_MEMORY)
    assert dev.mmio_read(REG_INTRMASK, 4) == 0
    dev.mmio_write(REG_DOORBELL, 4, 5 << 16)
    assert rec.doorbells == [(5, 0)]


# ---------------------------------------------------------------------- doorbells, peers


def test_doorbell_unknown_peer_and_unconnected_vector_ignored() -> None:
    dev, rec = make_device(vectors=4)
    enable(dev)
    dev.add_peer_vector(9, 0)
    dev.add_peer_vector(9, 1)
    dev.mmio_write(REG_DOORBELL, 4, (10 << 16) | 0)  # unknown peer
    dev.mmio_write(REG_DOORBELL, 4, (9 << 16) | 2)  # vector 2 not connected
    dev.mmio_write(REG_DOORBELL, 4, (9 << 16) | 0xFF)
    assert rec.doorbells == []
    dev.mmio_write(REG_DOORBELL, 4, (9 << 16) | 0x0301)  # bits 15..8 are not the vector
    dev.mmio_write(REG_DOORBELL, 4, (9 << 16) | 0)
    assert rec.doorbells == [(9, 1), (9, 0)]
    dev.add_peer_vector(9, 2)
    dev.mmio_write(REG_DOORBELL, 4, (9 << 16) | 2)
    assert rec.doorbells[-1] == (9, 2)


def test_doorbell_to_self() -> None:
    dev, rec = make_device(own_id=3)
    enable(dev)
    dev.set_peer(3, 2)
    dev.mmio_write(REG_DOORBELL, 4, (3 << 16) | 1)
    assert rec.doorbells == [(3, 1)]


def test_peer_table_add_remove() -> None:
    dev, rec = make_device(vectors=2, own_id=1)
    enable(dev)
    assert dev.peers == {}
    dev.add_peer_vector(4, 0)
    assert dev.connected_vectors(4) == 1
    with pytest.raises(ValueError, match="out of order, expected vector 1"):
        dev.add_peer_vector(4, 0)
    dev.add_peer_vector(4, 1)
    with pytest.raises(ValueError, match="too many eventfds for peer 4"):
        dev.add_peer_vector(4, 2)
    dev.set_peer(65535, 1)
    assert dev.peers == {4: 2, 65535: 1}
    dev.mmio_write(REG_DOORBELL, 4, (65535 << 16) | 0)
    assert rec.doorbells == [(65535, 0)]
    assert dev.remove_peer(4) is True
    assert dev.remove_peer(4) is False
    assert dev.connected_vectors(4) == 0
    dev.mmio_write(REG_DOORBELL, 4, (4 << 16) | 0)  # gone: ignored
    assert rec.doorbells == [(65535, 0)]
    with pytest.raises(ValueError, match="own id"):
        dev.remove_peer(1)
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        dev.add_peer_vector(65536, 0)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        dev.set_peer(5, 3)


def test_no_notifier_is_a_clear_error() -> None:
    dev = IvshmemDevice(MIB, 1)
    enable(dev)
    dev.set_peer(2, 1)
    with pytest.raises(RuntimeError, match="no doorbell notifier"):
        dev.mmio_write(REG_DOORBELL, 4, 2 << 16)


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="power of two"):
        IvshmemDevice(3 * MIB)
    with pytest.raises(ValueError, match="power of two >= 4096"):
        IvshmemDevice(2048)
    with pytest.raises(ValueError, match="at least 1 vector"):
        IvshmemDevice(MIB, 0)


# ---------------------------------------------------------------------- MSI-X


def test_msix_table_reset_state_and_message() -> None:
    dev, _ = make_device(vectors=2)
    enable(dev)
    for v in range(2):
        assert dev.msix.mmio_read(16 * v + 12, 4) == 1  # masked at reset
        assert dev.msix.mmio_read(16 * v, 8) == 0
    program_vector(dev, 1, 0xFEE0_0000_1234_5000, 0x4041, masked=True)
    assert dev.msix.mmio_read(16, 8) == 0xFEE0_0000_1234_5000
    assert dev.msix.mmio_read(24, 4) == 0x4041
    assert dev.msix.message(1) == (0xFEE0_0000_1234_5000, 0x4041)
    dev.msix.mmio_write(0, 8, 0x1_0000_2000)
    assert dev.msix.mmio_read(0, 4) == 0x2000
    assert dev.msix.mmio_read(4, 4) == 1


def test_msix_deliver_when_unmasked() -> None:
    dev, rec = make_device(vectors=2)
    enable(dev)
    msix_enable(dev)
    program_vector(dev, 0, 0xFEE00000, 0x30, masked=False)
    program_vector(dev, 1, 0xFEE00000, 0x31, masked=False)
    dev.ring(1)
    dev.ring(0)
    assert rec.interrupts == [1, 0]
    assert dev.msix.mmio_read(PBA, 4) == 0
    assert dev.intr_status == 0  # MSI-X mode does not touch IntrStatus
    assert not dev.intx_level
    enable(dev, COMMAND_MEMORY)  # no bus mastering: the message (a DMA write) goes nowhere
    dev.ring(0)
    assert rec.interrupts == [1, 0] and dev.msix.mmio_read(PBA, 4) == 0
    for vector in (2, -1):
        with pytest.raises(ValueError, match="outside the device's 2 vectors"):
            dev.ring(vector)


def test_msix_masked_sets_pending_and_unmask_delivers() -> None:
    dev, rec = make_device(vectors=2)
    enable(dev)
    msix_enable(dev)
    dev.ring(1)  # vectors start masked
    assert rec.interrupts == []
    assert dev.msix.mmio_read(PBA, 4) == 0b10
    assert dev.msix.mmio_read(PBA, 8) == 0b10
    assert dev.msix.is_pending(1)
    dev.msix.mmio_write(PBA, 4, 0)  # the PBA is read-only
    assert dev.msix.mmio_read(PBA, 4) == 0b10
    program_vector(dev, 0, 0xFEE00000, 0x30, masked=False)  # unmasking 0: nothing pending
    assert rec.interrupts == []
    dev.msix.mmio_write(16 + 12, 4, 0)  # unmask vector 1
    assert rec.interrupts == [1]
    assert dev.msix.mmio_read(PBA, 4) == 0
    dev.msix.mmio_write(16 + 12, 4, 1)  # mask again: no new delivery
    assert rec.interrupts == [1]


def test_msix_function_mask() -> None:
    dev, rec = make_device(vectors=2)
    enable(dev)
    msix_enable(dev, function_mask=True)
    program_vector(dev, 0, 0xFEE00000, 0x30, masked=False)
    program_vector(dev, 1, 0xFEE00000, 0x31, masked=True)
    dev.ring(0)
    dev.ring(1)
    assert rec.interrupts == []
    assert dev.msix.pending_bits == 0b11
    msix_enable(dev, function_mask=False)  # 0 unmasked now; 1 still masked by its bit
    assert rec.interrupts == [0]
    assert dev.msix.pending_bits == 0b10
    dev.msix.mmio_write(16 + 12, 4, 0)
    assert rec.interrupts == [0, 1]
    assert dev.msix.pending_bits == 0


def test_msix_without_bus_master_is_lost() -> None:
    dev, rec = make_device(vectors=1)
    enable(dev, COMMAND_MEMORY)
    msix_enable(dev)
    program_vector(dev, 0, 0xFEE00000, 0x30, masked=False)
    dev.ring(0)
    assert rec.interrupts == []
    assert dev.msix.pending_bits == 0
    enable(dev)
    dev.ring(0)
    assert rec.interrupts == [0]


def test_msix_bad_access() -> None:
    dev, _ = make_device()
    enable(dev)
    with pytest.raises(PciAccessError, match="4 or 8"):
        dev.msix.mmio_read(0, 2)
    with pytest.raises(PciAccessError, match="aligned"):
        dev.msix.mmio_read(4, 8)
    with pytest.raises(PciAccessError, match="outside"):
        dev.msix.mmio_write(4096, 4, 0)
    assert dev.msix.mmio_read(0x400, 4) == 0  # hole between table and PBA


def test_ring_bad_vector() -> None:
    dev, _ = make_device(vectors=2)
    with pytest.raises(ValueError, match="outside the device's 2 vectors"):
        dev.ring(2)


# ---------------------------------------------------------------------- INTx


def test_intx_mode_status_mask_and_edges() -> None:
    dev, rec = make_device(vectors=2)
    enable(dev)
    dev.ring(1)
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 1  # QEMU writes 1, whatever the vector
    dev.ring(0)
    assert not dev.intx_level  # IntrMask is 0: no interrupt
    assert rec.interrupts == []
    dev.mmio_write(REG_INTRMASK, 4, 1)  # unmasking raises the pending status
    assert dev.intx_level
    assert rec.interrupts == [INTX_VECTOR]
    assert dev.config_read(0x06, 2) & 0x08  # status.INTERRUPT
    dev.ring(1)  # already asserted: no new edge
    assert rec.interrupts == [INTX_VECTOR]
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 1  # the handler reads and clears
    assert not dev.intx_level
    assert not dev.config_read(0x06, 2) & 0x08
    dev.ring(0)
    assert rec.interrupts == [INTX_VECTOR, INTX_VECTOR]
    dev.mmio_write(REG_INTRSTATUS, 4, 0)  # a write to IntrStatus also lowers the line
    assert not dev.intx_level
    dev.mmio_write(REG_INTRSTATUS, 4, 0x4)  # bits outside IntrMask do not assert
    assert not dev.intx_level
    assert rec.interrupts == [INTX_VECTOR, INTX_VECTOR]


def test_intx_disable_bit_gates_the_line() -> None:
    dev, rec = make_device(vectors=1)
    enable(dev, COMMAND_MEMORY | COMMAND_INTX_DISABLE)
    dev.mmio_write(REG_INTRMASK, 4, 1)
    dev.ring(0)
    assert not dev.intx_level
    assert rec.interrupts == []
    assert dev.config_read(0x06, 2) & 0x08  # the function still reports its state
    enable(dev, COMMAND_MEMORY)
    assert dev.intx_level
    assert rec.interrupts == [INTX_VECTOR]


def test_msix_enabled_means_no_intx() -> None:
    dev, rec = make_device(vectors=1)
    enable(dev)
    msix_enable(dev)
    dev.mmio_write(REG_INTRMASK, 4, 1)
    dev.mmio_write(REG_INTRSTATUS, 4, 1)
    dev.ring(0)  # masked vector -> pending, not INTx
    assert not dev.intx_level
    assert rec.interrupts == []
    assert dev.msix.pending_bits == 1


def test_no_intx_fallback_drops_ring_like_qemu_doorbell() -> None:
    dev, rec = make_device(vectors=1, intx_fallback=False)
    enable(dev)
    assert dev.config_read(0x3D, 1) == 0  # no interrupt pin
    dev.mmio_write(REG_INTRMASK, 4, 1)
    dev.ring(0)
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0
    assert rec.interrupts == []
    assert dev.msix.pending_bits == 0


def test_reset_returns_to_power_on_state() -> None:
    dev, _ = make_device(vectors=2)
    enable(dev)
    dev.set_peer(5, 1)
    dev.mmio_write(REG_INTRMASK, 4, 1)
    dev.ring(0)
    msix_enable(dev)
    dev.ring(1)
    dev.reset()
    assert not dev.intx_level
    assert not dev.msix.enabled
    assert dev.msix.pending_bits == 0
    assert dev.config_read(0x04, 2) == 0
    enable(dev)
    assert dev.mmio_read(REG_INTRMASK, 4) == 0
    assert dev.mmio_read(REG_INTRSTATUS, 4) == 0
    assert dev.peers == {5: 1}  # connection state survives a device reset


# ---------------------------------------------------------------------- two devices


def test_two_devices_ring_each_other_through_real_eventfds() -> None:
    """QEMU's ivshmem-test scenario, with the runtime's part played by real eventfds."""
    eventfds = {
        (peer, v): os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for peer in (0, 1)
        for v in range(2)
    }
    try:

        def write_eventfd(peer_id: int, vector: int) -> None:
            os.eventfd_write(eventfds[(peer_id, vector)], 1)

        devs: dict[int, IvshmemDevice] = {}
        recs: dict[int, Recorder] = {}
        for peer in (0, 1):
            rec = Recorder()
            dev = IvshmemDevice(
                MIB, 2, own_id=peer, notify=write_eventfd, on_interrupt=rec.on_interrupt
            )
            for other in (0, 1):
                for v in range(2):
                    dev.add_peer_vector(other, v)
            enable(dev)
            msix_enable(dev)
            devs[peer], recs[peer] = dev, rec

        def pump(peer: int) -> None:
            """The runtime's event loop: read own eventfds and ring the device."""
            for v in range(2):
                try:
                    count = os.eventfd_read(eventfds[(peer, v)])
                except BlockingIOError:
                    continue
                assert count >= 1
                devs[peer].ring(v)

        assert devs[0].mmio_read(REG_IVPOSITION, 4) != devs[1].mmio_read(REG_IVPOSITION, 4)
        devs[1].mmio_write(REG_DOORBELL, 4, 0 << 16)  # VM2 rings VM1 vector 0
        pump(0)
        assert devs[0].msix.mmio_read(PBA, 4) == 0b01  # masked: pending bit 0 rises
        devs[0].mmio_write(REG_DOORBELL, 4, (1 << 16) | 1)  # VM1 rings VM2 vector 1
        pump(1)
        assert devs[1].msix.mmio_read(PBA, 4) == 0b10
        program_vector(devs[1], 1, 0xFEE00000, 0x41, masked=False)
        assert recs[1].interrupts == [1]
        devs[0].remove_peer(1)
        devs[0].mmio_write(REG_DOORBELL, 4, (1 << 16) | 1)  # peer left: ignored
        with pytest.raises(BlockingIOError):
            os.eventfd_read(eventfds[(1, 1)])
    finally:
        for fd in eventfds.values():
            os.close(fd)


# ---------------------------------------------------------------------- against real QEMU
#
# The same guest-side script runs on QEMU 7.2's ivshmem-doorbell (under qtest, no guest OS)
# and on the model; every value the guest reads, every doorbell that reaches an eventfd and
# every MSI-X message that lands in guest RAM must be the same on both.

QEMU_OWN_ID = 3
#: Peers the test server announces: id -> number of eventfds (vectors) it sends.
QEMU_PEERS = {5: 2, 6: 1}
QEMU_VECTORS = 2
QEMU_BAR0 = 0xE000_0000
QEMU_BAR1 = 0xE000_1000
QEMU_BAR2 = 0x1_0000_0000
#: Guest RAM where the script routes MSI-X messages (the VM has 16 MiB of RAM).
QEMU_MSI_GPA = 0x10000
QEMU_SYNC_TIMEOUT = 10.0

qemu_required = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


class Side(Protocol):
    """A guest's view of one ivshmem device, plus what left it (doorbells, messages)."""

    def cfg_read(self, offset: int, size: int) -> int: ...
    def cfg_write(self, offset: int, size: int, value: int) -> None: ...
    def read(self, gpa: int, size: int) -> int: ...
    def write(self, gpa: int, size: int, value: int) -> None: ...
    def ring_own(self, vector: int) -> None: ...
    def settle(self) -> None: ...
    def doorbells(self) -> list[tuple[int, int]]: ...


class ModelSide:
    """The model, wired as the peer runtime wires it; MSI-X messages land in a RAM dict."""

    def __init__(self) -> None:
        self.dev = IvshmemDevice(
            MIB,
            QEMU_VECTORS,
            own_id=QEMU_OWN_ID,
            notify=self._notify,
            on_interrupt=self._interrupt,
            intx_fallback=False,  # QEMU 7.2's doorbell device has no INTx path
        )
        for peer, n in [(QEMU_OWN_ID, QEMU_VECTORS), *QEMU_PEERS.items()]:
            for v in range(n):
                self.dev.add_peer_vector(peer, v)
        self.ram: dict[int, int] = {}
        self._sent: list[tuple[int, int]] = []
        self._own_rings: list[int] = []

    def _notify(self, peer: int, vector: int) -> None:
        if peer == QEMU_OWN_ID:
            self._own_rings.append(vector)  # the runtime writes its own eventfd
        else:
            self._sent.append((peer, vector))

    def _interrupt(self, vector: int) -> None:
        addr, data = self.dev.msix.message(vector)
        self.ram[addr] = data

    def cfg_read(self, offset: int, size: int) -> int:
        return self.dev.config_read(offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.dev.config_write(offset, size, value)

    def _route(self, gpa: int) -> tuple[IvshmemDevice | Msix | None, int]:
        cfg = self.dev.config
        if cfg.memory_enabled:
            for bar, handler in ((0, self.dev), (1, self.dev.msix)):
                base = cfg.bar_address(bar)
                if base <= gpa < base + cfg.bar_size(bar):
                    return handler, gpa - base
        return None, gpa

    def read(self, gpa: int, size: int) -> int:
        handler, offset = self._route(gpa)
        if handler is None:
            return self.ram.get(gpa, 0)
        return handler.mmio_read(offset, size)

    def write(self, gpa: int, size: int, value: int) -> None:
        handler, offset = self._route(gpa)
        if handler is None:
            self.ram[gpa] = value
        else:
            handler.mmio_write(offset, size, value)

    def ring_own(self, vector: int) -> None:
        self.dev.ring(vector)

    def settle(self) -> None:
        while self._own_rings:
            self.dev.ring(self._own_rings.pop(0))

    def doorbells(self) -> list[tuple[int, int]]:
        sent, self._sent = sorted(self._sent), []
        return sent


class QemuSide:
    """QEMU's device through qtest; our test server holds every peer's eventfds."""

    def __init__(
        self, qtest: QtestConnection, fn: PciFunction, eventfds: dict[tuple[int, int], int]
    ):
        self.qtest = qtest
        self.fn = fn
        self.eventfds = eventfds

    def cfg_read(self, offset: int, size: int) -> int:
        return {1: self.fn.read8, 2: self.fn.read16, 4: self.fn.read32}[size](offset)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        {1: self.fn.write8, 2: self.fn.write16, 4: self.fn.write32}[size](offset, value)

    def read(self, gpa: int, size: int) -> int:
        q = self.qtest
        return {1: q.readb, 2: q.readw, 4: q.readl, 8: q.readq}[size](gpa)

    def write(self, gpa: int, size: int, value: int) -> None:
        q = self.qtest
        {1: q.writeb, 2: q.writew, 4: q.writel, 8: q.writeq}[size](gpa, value)

    def _wait_consumed(self, fd: int) -> None:
        """Until QEMU has read (and acted on) the eventfd: its counter is back to 0."""
        deadline = time.monotonic() + QEMU_SYNC_TIMEOUT
        while select.select([fd], [], [], 0)[0]:
            if time.monotonic() > deadline:
                raise AssertionError("QEMU did not consume its vector eventfd")
            self.qtest.command("endianness")  # one main-loop turn

    def ring_own(self, vector: int) -> None:
        fd = self.eventfds[(QEMU_OWN_ID, vector)]
        os.eventfd_write(fd, 1)
        self._wait_consumed(fd)

    def settle(self) -> None:
        for v in range(QEMU_VECTORS):
            self._wait_consumed(self.eventfds[(QEMU_OWN_ID, v)])

    def doorbells(self) -> list[tuple[int, int]]:
        sent = []
        for (peer, vector), fd in self.eventfds.items():
            if peer == QEMU_OWN_ID:
                continue
            try:
                count = os.eventfd_read(fd)
            except BlockingIOError:
                continue
            sent += [(peer, vector)] * count
        return sorted(sent)


def guest_script(side: Side) -> list[tuple[str, object]]:
    """What a guest driver does with the device; returns every observation, labelled."""
    out: list[tuple[str, object]] = []

    def rd(label: str, gpa: int, size: int = 4) -> None:
        out.append((label, side.read(gpa, size)))

    # identity, capability, BAR sizing, command register
    out += [(f"cfg {o:#04x}", side.cfg_read(o, 4)) for o in range(0, 0x100, 4)]
    out += [("cfg 0x42/2", side.cfg_read(0x42, 2)), ("cfg 0x0e/1", side.cfg_read(0x0E, 1))]
    for reg in (*range(0x10, 0x28, 4), 0x30):
        side.cfg_write(reg, 4, 0xFFFFFFFF)
        out.append((f"size {reg:#04x}", side.cfg_read(reg, 4)))
    side.cfg_write(0x04, 2, 0xFFFF)
    out.append(("command all ones", side.cfg_read(0x04, 4)))
    side.cfg_write(0x04, 2, 0)
    side.cfg_write(0x10, 4, QEMU_BAR0)
    side.cfg_write(0x14, 4, QEMU_BAR1)
    side.cfg_write(0x18, 4, QEMU_BAR2 & 0xFFFFFFFF)
    side.cfg_write(0x1C, 4, QEMU_BAR2 >> 32)
    out += [(f"bar {o:#04x}", side.cfg_read(o, 4)) for o in range(0x10, 0x28, 4)]
    side.cfg_write(0x04, 2, COMMAND_MEMORY | COMMAND_MASTER)

    # BAR0 registers, 4-byte and narrow accesses
    rd("IntrMask reset", QEMU_BAR0)
    side.write(QEMU_BAR0, 4, 0xDEADBEEF)
    rd("IntrMask", QEMU_BAR0)
    rd("IntrMask b0", QEMU_BAR0, 1)
    rd("IntrMask w0", QEMU_BAR0, 2)
    rd("IntrMask w2", QEMU_BAR0 + 2, 2)
    rd("IntrMask b3", QEMU_BAR0 + 3, 1)
    side.write(QEMU_BAR0 + 1, 1, 0xAB)
    rd("IntrMask after byte write", QEMU_BAR0)
    side.write(QEMU_BAR0 + 4, 4, 0x5A)
    rd("IntrStatus", QEMU_BAR0 + 4)
    rd("IntrStatus cleared", QEMU_BAR0 + 4)
    side.write(QEMU_BAR0 + 4, 2, 0x1234)
    rd("IntrStatus w", QEMU_BAR0 + 4, 2)
    rd("IntrStatus w cleared", QEMU_BAR0 + 4)
    rd("IVPosition", QEMU_BAR0 + 8)
    side.write(QEMU_BAR0 + 8, 4, 99)
    rd("IVPosition after write", QEMU_BAR0 + 8)
    rd("Doorbell", QEMU_BAR0 + 12)
    for offset in range(0x10, 0x100, 4):
        side.write(QEMU_BAR0 + offset, 4, 0xFFFFFFFF)
        rd(f"BAR0 {offset:#04x}", QEMU_BAR0 + offset)
    rd("IntrMask untouched", QEMU_BAR0)

    # 8-byte accesses are split into two dword accesses, low half first; misaligned
    # accesses are invalid for the memory core: reads return 0, writes are dropped
    side.write(QEMU_BAR0 + 4, 4, 0x77)
    rd("qword 0: IntrStatus << 32 | IntrMask", QEMU_BAR0, 8)
    rd("IntrStatus cleared by the qword read", QEMU_BAR0 + 4)
    rd("qword 8: Doorbell << 32 | IVPosition", QEMU_BAR0 + 8, 8)
    side.write(QEMU_BAR0, 8, 0x66 << 32 | 0x1357)
    rd("IntrMask after a qword write", QEMU_BAR0)
    rd("IntrStatus after a qword write", QEMU_BAR0 + 4)
    rd("qword 0x10", QEMU_BAR0 + 0x10, 8)
    side.write(QEMU_BAR0 + 4, 4, 0x99)
    rd("misaligned dword at 2", QEMU_BAR0 + 2)
    rd("misaligned word at 3", QEMU_BAR0 + 3, 2)
    rd("misaligned qword at 4", QEMU_BAR0 + 4, 8)
    rd("IntrStatus after misaligned reads", QEMU_BAR0 + 4)
    side.write(QEMU_BAR0 + 2, 4, 0x2468)
    side.write(QEMU_BAR0 + 1, 2, 0x11)
    rd("IntrMask after misaligned writes", QEMU_BAR0)

    # doorbells: known/unknown peers, connected/unconnected vectors, vector = low 8 bits
    for value in (
        5 << 16 | 1,
        5 << 16,
        5 << 16 | 0x0101,
        5 << 16 | 2,
        6 << 16 | 1,
        6 << 16,
        7 << 16,
        0xFFFF << 16,
    ):
        side.write(QEMU_BAR0 + 12, 4, value)
    side.write(QEMU_BAR0 + 14, 2, 5)  # narrow: the value 5 itself is the doorbell word
    out.append(("doorbells", side.doorbells()))
    side.write(QEMU_BAR0 + 8, 8, (5 << 16 | 1) << 32 | 0xFFFF)  # the high half rings
    side.write(QEMU_BAR0 + 14, 4, 6 << 16)  # misaligned: dropped
    out.append(("qword doorbell", side.doorbells()))

    # MSI-X: reset table, pending while masked, delivery on unmask, function mask
    for offset in range(0, 32, 4):
        rd(f"table {offset:#04x}", QEMU_BAR1 + offset)
    rd("PBA reset", QEMU_BAR1 + 0x800)
    side.cfg_write(0x42, 2, MSIX_CONTROL_ENABLE)
    out.append(("msix control", side.cfg_read(0x40, 4)))
    side.ring_own(1)
    rd("PBA v1", QEMU_BAR1 + 0x800)
    side.ring_own(0)
    rd("PBA v0 v1", QEMU_BAR1 + 0x800)
    side.write(QEMU_BAR1 + 16, 4, QEMU_MSI_GPA + 4)
    side.write(QEMU_BAR1 + 20, 4, 0)
    side.write(QEMU_BAR1 + 24, 4, 0x4041)
    rd("msg v1 before unmask", QEMU_MSI_GPA + 4)
    side.write(QEMU_BAR1 + 28, 4, 0)  # unmask vector 1: its pending message goes out
    rd("msg v1", QEMU_MSI_GPA + 4)
    rd("PBA after unmask", QEMU_BAR1 + 0x800)
    side.cfg_write(0x42, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    side.write(QEMU_BAR1 + 0, 4, QEMU_MSI_GPA)
    side.write(QEMU_BAR1 + 8, 4, 0x77)
    side.write(QEMU_BAR1 + 12, 4, 0)
    rd("msg v0 function-masked", QEMU_MSI_GPA)
    side.cfg_write(0x42, 2, MSIX_CONTROL_ENABLE)
    rd("msg v0", QEMU_MSI_GPA)
    rd("PBA empty", QEMU_BAR1 + 0x800)
    side.write(QEMU_MSI_GPA + 4, 4, 0)
    side.ring_own(1)
    rd("msg v1 unmasked ring", QEMU_MSI_GPA + 4)
    rd("table v1 q", QEMU_BAR1 + 16, 8)
    side.write(QEMU_BAR1 + 0x800, 4, 0xFF)
    rd("PBA read-only", QEMU_BAR1 + 0x800)

    # a doorbell to ourselves comes back as our own vector
    side.write(QEMU_MSI_GPA + 4, 4, 0)
    side.write(QEMU_BAR0 + 12, 4, QEMU_OWN_ID << 16 | 1)
    side.settle()
    rd("msg v1 self doorbell", QEMU_MSI_GPA + 4)
    out.append(("doorbells at end", side.doorbells()))
    return out


def _serve_setup(
    listener: socket.socket, shm_fd: int, eventfds: dict[tuple[int, int], int]
) -> None:
    """The server side of the protocol for one QEMU: version, id, shm, then every eventfd."""
    conn, _ = listener.accept()
    with conn:

        def send(value: int, fd: int | None = None) -> None:
            payload = [struct.pack("<q", value)]
            if fd is None:
                conn.sendmsg(payload)
            else:
                socket.send_fds(conn, payload, [fd])

        send(0)
        send(QEMU_OWN_ID)
        send(-1, shm_fd)
        for (peer, _vector), fd in eventfds.items():  # own vectors first, then the peers
            send(peer, fd)
        # keep the connection open until QEMU goes away (EOF means the server left)
        conn.recv(1)


@qemu_required
def test_model_matches_real_qemu(tmp_path: Path) -> None:
    from peers.qtest import QtestConnection, find_pci_function

    eventfds: dict[tuple[int, int], int] = {}
    for peer, n in [(QEMU_OWN_ID, QEMU_VECTORS), *QEMU_PEERS.items()]:
        for v in range(n):
            eventfds[(peer, v)] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    shm_fd = os.memfd_create("ivshmem-test", os.MFD_CLOEXEC)
    os.ftruncate(shm_fd, MIB)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.settimeout(QEMU_SYNC_TIMEOUT)
    sock_path = tmp_path / "ivshmem.sock"
    listener.bind(str(sock_path))
    listener.listen(1)
    server = threading.Thread(target=_serve_setup, args=(listener, shm_fd, eventfds), daemon=True)
    server.start()
    qtest = None
    try:
        qtest = QtestConnection(
            [
                "-chardev",
                f"socket,id=chr0,path={sock_path}",
                "-device",
                f"ivshmem-doorbell,chardev=chr0,vectors={QEMU_VECTORS}",
            ]
        )
        fn = find_pci_function(qtest, 0x1AF4, 0x1110)
        qemu = QemuSide(qtest, fn, eventfds)
        # QEMU reads the eventfd messages after start-up, in order: once the last peer's
        # vector rings, every earlier message (our own vectors included) has been taken.
        fn.write32(0x10, QEMU_BAR0)
        fn.write16(0x04, COMMAND_MEMORY)
        last = max(QEMU_PEERS)
        deadline = time.monotonic() + QEMU_SYNC_TIMEOUT
        while not select.select([eventfds[(last, 0)]], [], [], 0)[0]:
            assert time.monotonic() < deadline, "QEMU never took the peers' eventfds"
            qtest.writel(QEMU_BAR0 + 12, last << 16)
        os.eventfd_read(eventfds[(last, 0)])
        fn.write16(0x04, 0)
        fn.write32(0x10, 0)

        expected = guest_script(qemu)
        got = guest_script(ModelSide())
        mismatches = [(e, g) for e, g in zip(expected, got, strict=True) if e != g]
        assert not mismatches, "model differs from QEMU:\n" + "\n".join(
            f"  {e[0]}: qemu {e[1]!r}, model {g[1]!r}" for e, g in mismatches
        )
    finally:
        if qtest is not None:
            qtest.close()
        listener.close()
        server.join(QEMU_SYNC_TIMEOUT)
        for fd in (*eventfds.values(), shm_fd):
            os.close(fd)


# ---------------------------------------------------------------------- through a Vm's vCPU

VM_BAR0 = 0x4000_0000
VM_BAR1 = 0x4000_1000
VM_BAR2 = 0x8000_0000


def test_guest_drives_device_through_vcpu_only() -> None:
    """Two VMs share one real memfd as BAR2; every guest access goes through vcpu.read/write."""
    fd = os.memfd_create("ivshmem-vm-test", os.MFD_CLOEXEC)
    maps: list[mmap.mmap] = []
    try:
        os.ftruncate(fd, MIB)
        _two_vms_on_one_shm(fd, maps)
    finally:
        gc.collect()  # the VMs' backings and TLB entries hold views on the maps
        for m in maps:
            try:
                m.close()
            except BufferError:
                pass  # still viewed from a failure's traceback: unmapped when collected
        os.close(fd)


def _two_vms_on_one_shm(fd: int, maps: list[mmap.mmap]) -> None:
    from vmm import Vm

    host = mmap.mmap(fd, MIB)
    maps.append(host)
    recs = [Recorder(), Recorder()]
    devs: list[IvshmemDevice] = []
    vms: list[Vm] = []
    for peer in (0, 1):
        shm = mmap.mmap(fd, MIB)
        maps.append(shm)
        vm = Vm()
        vms.append(vm)
        dev = IvshmemDevice(
            MIB, 2, own_id=peer, notify=recs[peer].notify, on_interrupt=recs[peer].on_interrupt
        )
        dev.attach(vm, 1, VM_BAR0, VM_BAR1, VM_BAR2, shm)
        for other in (0, 1):
            dev.set_peer(other, 2)
        devs.append(dev)
    cpu0, cpu1 = (vm.create_vcpu(0) for vm in vms)

    # BAR0 registers through MMIO dispatch
    assert cpu0.read32(VM_BAR0 + REG_IVPOSITION) == 0
    assert cpu1.read32(VM_BAR0 + REG_IVPOSITION) == 1
    cpu0.write32(VM_BAR0 + REG_INTRMASK, 0xFFFF)
    assert cpu0.read32(VM_BAR0 + REG_INTRMASK) == 0xFFFF
    assert cpu0.read(VM_BAR0 + REG_INTRMASK, 1) == b"\xff"
    assert cpu0.read32(VM_BAR0 + REG_DOORBELL) == 0
    assert cpu0.read64(VM_BAR0) == 0xFFFF  # IntrStatus (0) << 32 | IntrMask

    # BAR2: shared memory through the stage-2 tables, seen by the other VM and the host
    cpu0.write(VM_BAR2 + 0x1FF0, b"hello from vm0, across a page")
    assert host[0x1FF0 : 0x1FF0 + 29] == b"hello from vm0, across a page"
    assert cpu1.read(VM_BAR2 + 0x1FF0, 29) == b"hello from vm0, across a page"
    host[MIB - 4 :] = b"host"
    assert cpu0.read(VM_BAR2 + MIB - 4, 4) == b"host"

    # a doorbell from vm1 to vm0 vector 1 reaches the notifier ...
    cpu1.write32(VM_BAR0 + REG_DOORBELL, 0 << 16 | 1)
    assert recs[1].doorbells == [(0, 1)]
    cpu1.write32(VM_BAR0 + REG_DOORBELL, 9 << 16)  # unknown peer: ignored
    assert recs[1].doorbells == [(0, 1)]
    # ... and the runtime rings vm0's device; MSI-X programmed by vm0 through BAR1
    msix_enable(devs[0])
    devs[0].ring(1)
    assert cpu0.read32(VM_BAR1 + PBA) == 0b10  # masked at reset: pending
    cpu0.write32(VM_BAR1 + 16, 0xFEE0_0000)
    cpu0.write32(VM_BAR1 + 24, 0x41)
    cpu0.write32(VM_BAR1 + 28, 0)  # unmask vector 1
    assert recs[0].interrupts == [1]
    assert cpu0.read32(VM_BAR1 + PBA) == 0
    assert cpu0.read64(VM_BAR1 + 16) == 0xFEE0_0000
    assert devs[0].msix.message(1) == (0xFEE0_0000, 0x41)
    for vm in vms:
        vm.close()


def test_attach_refuses_bad_placement() -> None:
    from vmm import Vm

    vm = Vm()
    try:
        dev, _ = make_device()
        shm = bytearray(MIB)
        with pytest.raises(ValueError, match="not aligned"):
            dev.attach(vm, 1, VM_BAR0 + 0x80, VM_BAR1, VM_BAR2, shm)
        with pytest.raises(ValueError, match="BAR2 is 0x100000"):
            dev.attach(vm, 1, VM_BAR0, VM_BAR1, VM_BAR2, bytearray(4096))
        # the VM refuses BAR2 (it overlaps BAR0): nothing stays registered
        with pytest.raises(ValueError, match="overlap"):
            dev.attach(vm, 1, VM_BAR0, VM_BAR1, VM_BAR0 & ~(MIB - 1), shm)
        assert len(vm.mmio) == 0
        dev.attach(vm, 1, VM_BAR0, VM_BAR1, VM_BAR2, shm)
        assert dev.config.bar_address(2) == VM_BAR2
    finally:
        vm.close()


# ---------------------------------------------------------------------- doorbell routes


def test_doorbell_routes_are_resolved_once_and_follow_the_peer_table() -> None:
    dev, rec = make_device(vectors=2)
    enable(dev)
    resolved: list[tuple[int, int]] = []
    rung: list[tuple[str, int, int]] = []

    def resolver(peer_id: int, vector: int) -> Callable[[], None]:
        resolved.append((peer_id, vector))
        generation = len(resolved)
        return lambda: rung.append((f"route {generation}", peer_id, vector))

    dev.doorbell_route = resolver
    dev.set_peer(7, 2)
    for _ in range(3):
        dev.mmio_write(REG_DOORBELL, 4, doorbell_value(7, 1))
    dev.mmio_write(REG_DOORBELL, 4, doorbell_value(7, 1) | 0xAB00)  # bits 15..8 ignored
    assert resolved == [(7, 1)] and rung == [("route 1", 7, 1)] * 4
    dev.mmio_write(REG_DOORBELL, 4, doorbell_value(7, 2))  # no such vector: ignored
    dev.mmio_write(REG_DOORBELL, 4, doorbell_value(8, 0))  # no such peer: ignored
    assert len(rung) == 4 and resolved == [(7, 1)]
    dev.remove_peer(7)
    dev.mmio_write(REG_DOORBELL, 4, doorbell_value(7, 1))  # gone: its route with it
    assert len(rung) == 4
    dev.add_peer_vector(7, 0)  # back, with new eventfds: resolved again
    dev.mmio_write(REG_DOORBELL, 4, doorbell_value(7, 0))
    assert resolved[-1] == (7, 0) and rung[-1] == ("route 2", 7, 0)
    dev.doorbell_route = None  # back to notify(peer_id, vector)
    dev.mmio_write(0x8, 8, doorbell_value(7, 0) << 32)  # a qword write rings with its high half
    assert rec.doorbells == [(7, 0)]
    seen: list[tuple[int, int]] = []
    dev.notify = lambda peer_id, vector: seen.append((peer_id, vector))
    dev.mmio_write(REG_DOORBELL, 4, doorbell_value(7, 0))
    assert seen == [(7, 0)] and rec.doorbells == [(7, 0)]
