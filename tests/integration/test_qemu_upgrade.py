"""Two real QEMU VMs (ivshmem-doorbell under -qtest) across an upgrade in place (issue 14):
their doorbells keep working, and a peer that joins after the upgrade is announced to them
(they ring it), without either VM noticing the daemon was re-executed."""

from __future__ import annotations

import os

import pytest
import trio

from peers.pytest_plugin import DaemonFactory
from peers.qtest import QEMU_BINARY, QemuIvshmemVm, qemu_available
from peers.qtest.ivshmem import ring_until_pending
from tests.handover_tools import upgrade
from tests.rawclient import RawClient

pytestmark = pytest.mark.skipif(
    not qemu_available(), reason=f"{QEMU_BINARY} is not on PATH (install qemu-system-x86)"
)

#: how many times a VM rings a newcomer before it must have learnt of it
RINGS = 2000


def _ring_newcomer(vm: QemuIvshmemVm, newcomer: RawClient, new_id: int) -> int:
    """Ring the newcomer's vector 0 from the VM until it arrives; returns the count read.
    The VM learns of a newcomer asynchronously: rings before that are dropped by QEMU."""
    own = newcomer.vector_fds(new_id)[0]
    for _ in range(RINGS):
        vm.ring(new_id, 0)
        vm.iv_position()  # a qtest round trip: QEMU's main loop runs, the write happens
        try:
            return os.eventfd_read(own)
        except BlockingIOError:
            continue
    raise AssertionError(f"QEMU {vm.pid} never rang peer {new_id}")


async def test_two_qemu_vms_ring_each_other_across_an_upgrade(
    start_daemon: DaemonFactory,
) -> None:
    async with start_daemon(vectors=2, size="1M") as daemon:
        first = await trio.to_thread.run_sync(
            lambda: QemuIvshmemVm.doorbell(daemon.socket_path, vectors=2)
        )
        second = None
        try:
            second = await trio.to_thread.run_sync(
                lambda: QemuIvshmemVm.doorbell(daemon.socket_path, vectors=2)
            )
            assert await trio.to_thread.run_sync(second.iv_position) == 1
            await trio.to_thread.run_sync(ring_until_pending, first, second, 0)
            await trio.to_thread.run_sync(ring_until_pending, second, first, 0)
            await upgrade(daemon, 1)
            # the doorbells between the VMs still work (on a vector not rung yet)
            await trio.to_thread.run_sync(ring_until_pending, first, second, 1)
            await trio.to_thread.run_sync(ring_until_pending, second, first, 1)
            # a newcomer after the upgrade: it sees both VMs, and both VMs ring it
            newcomer = await RawClient.connect(daemon.socket_path)
            try:
                await newcomer.read(3 + 2 * 3)
                new_id = newcomer.stream[1][0]
                assert new_id == 2 and newcomer.view() == {0: 2, 1: 2}
                for vm in (first, second):
                    assert await trio.to_thread.run_sync(_ring_newcomer, vm, newcomer, new_id)
                assert daemon.count(r"peer \d+ left") == 0  # no VM noticed anything
            finally:
                newcomer.close()
        finally:
            if second is not None:
                await trio.to_thread.run_sync(second.close)
            await trio.to_thread.run_sync(first.close)
