"""Real QEMU VMs (``qemu-system-x86_64 -qtest stdio``) on our daemon and on the host's memory.

Each VM's ivshmem device is driven by :mod:`peers.qtest` exactly as QEMU's own
``tests/qtest/ivshmem-test.c`` does it (BARs placed by hand, MSI-X enabled with masked vectors,
doorbells observed as pending bits), against ``ivshmemd`` started through its command line.
Every test stops its VMs (killed and reaped) and the daemon (SIGTERM, waited), and unlinks its
shared memory, also when it fails. Skipped only when QEMU is not installed.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import pytest
import trio

from ivshmemd.supervise import DaemonProcess, SyncDaemon, unique_name
from peers.client import IvshmemClient, PeerVector, connect
from peers.qtest import (
    QEMU_BINARY,
    QemuIvshmemVm,
    QtestError,
    qemu_available,
    ring_until_pending,
)

pytestmark = pytest.mark.skipif(
    not qemu_available(), reason=f"{QEMU_BINARY} is not on PATH (install qemu-system-x86)"
)

SHM_SIZE = 1 << 20
VECTORS = 2
#: Guest RAM where routed MSI-X messages land (the VMs have 16 MiB of RAM).
MSI_GPA = 0x10000


def _unlink_shm(name: str) -> None:
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


def _view(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    assert buf is not None, "the shared memory is closed"
    return buf


def _qemu_children() -> list[int]:
    """Our child processes that are QEMU, zombies included (``/proc/PID/stat``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm.startswith("qemu-system"):
            found.append(int(entry.name))
    return found


def _attach_shm(name: str) -> shared_memory.SharedMemory:
    """Attach the daemon's POSIX shm without letting our resource tracker unlink it."""
    shm = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = unique_name("ivshmem-qemu-test")
    try:
        yield name
    finally:
        _unlink_shm(name)


@pytest.fixture
def daemon(
    ivshmem_daemon_sync: Callable[..., AbstractContextManager[SyncDaemon]],
) -> Iterator[SyncDaemon]:
    """Overrides conftest's async ``daemon``: these tests are synchronous, as the driver is."""
    with ivshmem_daemon_sync(vectors=VECTORS, size="1M") as server:
        yield server


@pytest.fixture
def vms() -> Iterator[list[QemuIvshmemVm]]:
    """A list the test appends its VMs to; every one is closed afterwards."""
    started: list[QemuIvshmemVm] = []
    try:
        yield started
    finally:
        for vm in started:
            vm.close()
    assert _qemu_children() == [], "a QEMU process outlived its VM object"


def _doorbell_vm(daemon: SyncDaemon, vms: list[QemuIvshmemVm]) -> QemuIvshmemVm:
    vm = QemuIvshmemVm.doorbell(daemon.socket_path, vectors=VECTORS)
    vms.append(vm)
    return vm


def _pending(vm: QemuIvshmemVm) -> list[bool]:
    return [vm.msix_pending(vector) for vector in range(VECTORS)]


# -- ivshmem-plain: no server, the host's file is the shared memory ------------------------------


def test_plain_vms_and_host_share_memory(shm_name: str, vms: list[QemuIvshmemVm]) -> None:
    host = shared_memory.SharedMemory(name=shm_name, create=True, size=SHM_SIZE)
    try:
        first = QemuIvshmemVm.plain(f"/dev/shm/{shm_name}", SHM_SIZE)
        vms.append(first)
        second = QemuIvshmemVm.plain(f"/dev/shm/{shm_name}", SHM_SIZE, machine="q35")
        vms.append(second)
        for vm in vms:
            assert vm.bar2_size == SHM_SIZE
            assert vm.msix_table_size() == 0
            assert vm.read_intr_mask() == 0

        _view(host)[:] = b"\x42" * SHM_SIZE
        assert first.read_bar2(0, SHM_SIZE) == b"\x42" * SHM_SIZE
        assert second.read_bar2(0, SHM_SIZE) == b"\x42" * SHM_SIZE

        pattern = bytes(range(256)) * (SHM_SIZE // 256)
        first.write_bar2(0, pattern)
        assert bytes(_view(host)) == pattern
        assert second.read_bar2(0, SHM_SIZE) == pattern

        second.write_bar2(SHM_SIZE - 5, b"tail!")
        assert bytes(_view(host)[SHM_SIZE - 5 :]) == b"tail!"
        assert first.read_bar2(SHM_SIZE - 8, 8) == pattern[SHM_SIZE - 8 : SHM_SIZE - 5] + b"tail!"
    finally:
        host.close()
        host.unlink()


def test_plain_vm_registers_and_bounds(shm_name: str, vms: list[QemuIvshmemVm]) -> None:
    vm = QemuIvshmemVm.plain(f"/dev/shm/{shm_name}", SHM_SIZE)
    vms.append(vm)
    # The register semantics of QEMU's device: IntrMask is read/write, a read of IntrStatus
    # clears it, IVPosition ignores writes.
    vm.write_intr_mask(0xFFFF_FFFF)
    assert vm.read_intr_mask() == 0xFFFF_FFFF
    vm.write_intr_status(1)
    assert vm.read_intr_status() == 1
    assert vm.read_intr_status() == 0
    position = vm.iv_position()
    vm.qtest.writel(vm.bar0 + 8, position + 1)
    assert vm.iv_position() == position
    with pytest.raises(ValueError, match="outside BAR2"):
        vm.read_bar2(SHM_SIZE - 4, 8)
    with pytest.raises(ValueError, match="dest_peer"):
        vm.ring(1 << 16, 0)
    with pytest.raises(QtestError, match="no MSI-X"):
        vm.msix_pending(0)


def test_async_irq_lines_are_recorded_and_refusals_are_clear(
    shm_name: str, vms: list[QemuIvshmemVm]
) -> None:
    vm = QemuIvshmemVm.plain(f"/dev/shm/{shm_name}", SHM_SIZE)
    vms.append(vm)
    vm.qtest.irq_intercept_in("ioapic")
    # QEMU prints "IRQ raise 5" before the OK of the command that raised it.
    vm.qtest.set_irq_in("ioapic", 5, 1)
    vm.qtest.set_irq_in("ioapic", 5, 0)
    assert vm.qtest.irq_events == [("raise", 5), ("lower", 5)]
    with pytest.raises(QtestError, match="FAIL Unknown device"):
        vm.qtest.set_irq_in("no-such-device", 0, 1)
    vm.write_bar2(0, b"still usable")
    assert vm.read_bar2(0, 12) == b"still usable"


def test_qemu_failure_is_reported_with_its_stderr(tmp_path: Path) -> None:
    absent = tmp_path / "no-server.sock"
    with pytest.raises(QtestError, match="QEMU exited") as failure:
        QemuIvshmemVm.doorbell(absent, vectors=VECTORS)
    assert str(absent) in failure.value.stderr


def test_qemu_that_never_answers_is_killed_and_reaped(tmp_path: Path) -> None:
    # A "server" that accepts no connection: QEMU blocks in the device's start-up forever.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(tmp_path / "silent.sock"))
        silent.listen()
        with pytest.raises(QtestError, match="did not answer"):
            QemuIvshmemVm.doorbell(tmp_path / "silent.sock", vectors=VECTORS, timeout=1.0)
    assert _qemu_children() == []


# -- ivshmem-doorbell on our daemon ---------------------------------------------------------------


def test_doorbells_between_two_vms(daemon: SyncDaemon, vms: list[QemuIvshmemVm]) -> None:
    vm1 = _doorbell_vm(daemon, vms)
    vm2 = _doorbell_vm(daemon, vms)
    id1, id2 = vm1.iv_position(), vm2.iv_position()
    assert (id1, id2) == (0, 1)  # the daemon's ids, in connection order
    assert vm1.msix_table_size() == VECTORS
    assert vm2.msix_table_size() == VECTORS
    assert vm1.bar2_size == SHM_SIZE
    assert _pending(vm1) == [False, False]
    assert _pending(vm2) == [False, False]

    # VM2 rings vm1 << 16 | 0: VM1's pending bit 0 rises, and only it.
    ring_until_pending(vm2, vm1, 0)
    assert _pending(vm1) == [True, False]
    assert _pending(vm2) == [False, False]

    # VM1 rings vm2 << 16 | 1: VM2's pending bit 1 rises, and only it.
    ring_until_pending(vm1, vm2, 1)
    assert _pending(vm2) == [False, True]
    assert _pending(vm1) == [True, False]


def test_msix_message_is_delivered_to_guest_ram(
    daemon: SyncDaemon, vms: list[QemuIvshmemVm]
) -> None:
    vm1 = _doorbell_vm(daemon, vms)
    vm2 = _doorbell_vm(daemon, vms)
    vm1.qtest.writel(MSI_GPA, 0)
    vm1.qtest.writel(MSI_GPA + 4, 0)

    # A ring while the vector is masked waits in the pending bit; unmasking delivers it.
    ring_until_pending(vm2, vm1, 0)
    assert vm1.qtest.readl(MSI_GPA) == 0
    vm1.msix_route(0, MSI_GPA, 0xC0DE_0000)
    assert vm1.qtest.readl(MSI_GPA) == 0xC0DE_0000
    assert _pending(vm1) == [False, False]

    # An unmasked vector is sent at once, as a memory write by the device (bus master).
    vm1.msix_route(1, MSI_GPA + 4, 0xC0DE_0001)
    vm1.qtest.writel(MSI_GPA, 0)
    vm2.ring(vm1.iv_position(), 1)
    vm1.wait_msix_message(MSI_GPA + 4, 0xC0DE_0001)
    assert vm1.qtest.readl(MSI_GPA) == 0
    assert _pending(vm1) == [False, False]


def test_doorbells_to_unknown_peers_and_vectors_are_ignored(
    daemon: SyncDaemon, vms: list[QemuIvshmemVm]
) -> None:
    vm1 = _doorbell_vm(daemon, vms)
    vm2 = _doorbell_vm(daemon, vms)
    id1, id2 = vm1.iv_position(), vm2.iv_position()
    # Both VMs know each other once a ring in each direction has arrived ...
    ring_until_pending(vm1, vm2, 1)
    ring_until_pending(vm2, vm1, 1)
    # ... then rings to no such peer or no such vector must change nothing.
    vm2.ring(7, 0)
    vm2.ring(0xFFFF, 0)
    vm2.ring(id1, VECTORS)
    vm1.ring(id2, 5)
    vm1.ring(id2, 0xFF)
    # A ring that does arrive, sent after the ignored ones: once it is seen, nothing else is.
    vm1.ring(id2, 0)
    vm2.wait_msix_pending(0)
    assert _pending(vm1) == [False, True]
    assert _pending(vm2) == [True, True]
    assert vm1.qtest.returncode is None and vm2.qtest.returncode is None
    assert daemon.process.poll() is None


def test_shared_memory_between_vms_and_host(daemon: SyncDaemon, vms: list[QemuIvshmemVm]) -> None:
    vm1 = _doorbell_vm(daemon, vms)
    vm2 = _doorbell_vm(daemon, vms)
    host = _attach_shm(daemon.shm_name)
    try:
        assert host.size >= SHM_SIZE
        data = os.urandom(SHM_SIZE)
        vm1.write_bar2(0, data)
        assert vm2.read_bar2(0, SHM_SIZE) == data
        assert bytes(_view(host)[:SHM_SIZE]) == data

        _view(host)[:SHM_SIZE] = b"\x44" * SHM_SIZE
        assert vm1.read_bar2(0, SHM_SIZE) == b"\x44" * SHM_SIZE
        assert vm2.read_bar2(0, SHM_SIZE) == b"\x44" * SHM_SIZE

        vm2.write_bar2(4096, b"from vm2")
        assert bytes(_view(host)[4096:4104]) == b"from vm2"
        assert vm1.read_bar2(4090, 16) == b"\x44" * 6 + b"from vm2" + b"\x44" * 2
    finally:
        host.close()


def test_daemon_keeps_serving_after_a_vm_is_killed(
    daemon: SyncDaemon, vms: list[QemuIvshmemVm]
) -> None:
    vm1 = _doorbell_vm(daemon, vms)
    vm2 = _doorbell_vm(daemon, vms)
    id1, id2 = vm1.iv_position(), vm2.iv_position()
    os.kill(vm2.pid, signal.SIGKILL)
    vm2.close()
    assert vm2.qtest.returncode == -signal.SIGKILL

    vm3 = _doorbell_vm(daemon, vms)
    id3 = vm3.iv_position()
    assert id3 not in (id1, id2)
    assert id3 == 2  # ids only move forward, as with QEMU's server
    assert daemon.process.poll() is None

    ring_until_pending(vm3, vm1, 0)
    ring_until_pending(vm1, vm3, 1)
    assert _pending(vm1) == [True, False]
    assert _pending(vm3) == [False, True]

    vm3.write_bar2(0, b"after the crash")
    assert vm1.read_bar2(0, 15) == b"after the crash"


def test_daemon_shutdown_leaves_running_vms_alone(
    daemon: SyncDaemon, vms: list[QemuIvshmemVm]
) -> None:
    vm1 = _doorbell_vm(daemon, vms)
    vm2 = _doorbell_vm(daemon, vms)
    vm1.write_bar2(0, b"before shutdown")
    assert daemon.stop() == 0
    assert not Path(daemon.socket_path).exists()
    assert not Path(f"/dev/shm/{daemon.shm_name}").exists()
    # QEMU keeps running on its own mapping of the memory.
    assert vm2.read_bar2(0, 15) == b"before shutdown"
    vm2.write_bar2(0, b"after shutdown!")
    assert vm1.read_bar2(0, 15) == b"after shutdown!"
    assert vm1.qtest.returncode is None and vm2.qtest.returncode is None


# -- a real QEMU VM and our own peer client on one daemon -----------------------------------------


async def test_qemu_vm_and_our_client_ring_each_other_and_share_memory(
    start_daemon: Callable[..., AbstractAsyncContextManager[DaemonProcess]],
) -> None:
    async with start_daemon(vectors=VECTORS) as server:
        client = await connect(server.socket_path, vectors=VECTORS)
        with client:
            # The driver is synchronous: its calls run in a worker thread, off the event loop.
            vm = await trio.to_thread.run_sync(
                lambda: QemuIvshmemVm.doorbell(server.socket_path, vectors=VECTORS)
            )
            try:
                await _client_and_vm_interoperate(client, vm)
            finally:
                await trio.to_thread.run_sync(vm.close)


async def _client_and_vm_interoperate(client: IvshmemClient, vm: QemuIvshmemVm) -> None:
    qemu_id = await trio.to_thread.run_sync(vm.iv_position)
    assert qemu_id != client.peer_id
    while qemu_id not in client.peers or len(client.peers[qemu_id]) < VECTORS:
        event = await client.next_event()
        assert isinstance(event, PeerVector) and event.peer_id == qemu_id

    # Our client rings QEMU's vector 1: its pending bit 1 rises, and only it.
    assert client.ring(qemu_id, 1)
    await trio.to_thread.run_sync(vm.wait_msix_pending, 1)
    assert await trio.to_thread.run_sync(_pending, vm) == [False, True]

    # QEMU rings our vector 0. QEMU learns our eventfds from a join notice it handles
    # asynchronously, and drops doorbells to peers it does not know yet: ring until it lands.
    vector0, vector1 = client.own_vectors
    with trio.fail_after(10):
        while True:
            await trio.to_thread.run_sync(vm.ring, client.peer_id, 0)
            with trio.move_on_after(0.1):
                await trio.lowlevel.wait_readable(vector0)
                break
    assert os.eventfd_read(vector0) >= 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(vector1)

    # Each sees what the other wrote in the shared memory.
    with mmap.mmap(client.shm_fd, client.shm_size) as memory:
        assert client.shm_size == vm.bar2_size == SHM_SIZE
        memory[100:109] = b"from peer"
        assert await trio.to_thread.run_sync(vm.read_bar2, 100, 9) == b"from peer"
        await trio.to_thread.run_sync(vm.write_bar2, 4096, b"from qemu")
        assert memory[4096:4105] == b"from qemu"
