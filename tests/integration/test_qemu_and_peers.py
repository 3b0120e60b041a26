"""A real QEMU VM and one of our peers on one daemon: doorbells both ways, shared memory.

QEMU (``ivshmem-doorbell,vectors=2`` under ``-qtest``) joins first and gets id 0; our peer
process (the test-only ``mailbox`` plugin, the VMM model behind it) joins as id 1, writes a
note into BAR2 through its vCPU and rings QEMU's vector 1: QEMU's pending bit 1 rises and
QEMU reads the note. QEMU writes a reply through its BAR2 and rings our vector 0: the
plugin's interrupt handler reads the reply. The host sees both notes in the shm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from ivshmemd.shm import attach_posix_shm
from peers.qtest import QEMU_BINARY, QemuIvshmemVm, qemu_available
from tests.peerprocs import peer_processes

pytestmark = pytest.mark.skipif(
    not qemu_available(), reason=f"{QEMU_BINARY} is not on PATH (install qemu-system-x86)"
)

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
PEER_NOTE = b"hello from the emulated peer"
QEMU_NOTE = b"hello from QEMU"


async def test_qemu_vm_and_our_peer_ring_each_other_and_share_memory(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(PLUGIN_DIR), os.environ.get("PYTHONPATH")])))  # fmt: skip
    async with start_daemon(vectors=2, size="1M") as daemon, peer_processes() as spawn:
        vm = await trio.to_thread.run_sync(
            lambda: QemuIvshmemVm.doorbell(daemon.socket_path, vectors=2)
        )
        try:
            assert await trio.to_thread.run_sync(vm.iv_position) == 0
            peer = await spawn([
                "-S", daemon.socket_path, "--plugin", "mailbox", "--to", "0", "--vector", "1",
                "--text", PEER_NOTE.decode(), "--offset", "0x1000",
                "--reply-offset", "0x2000", "--reply-len", str(len(QEMU_NOTE)),
            ])  # fmt: skip
            running = await peer.wait_event(event="running")
            assert running["peer_id"] == 1
            await peer.wait_event(event="mailbox-rang", to=0, vector=1)
            # our doorbell reached QEMU's vector 1 (and only it); QEMU reads our note
            await trio.to_thread.run_sync(vm.wait_msix_pending, 1)
            assert not await trio.to_thread.run_sync(vm.msix_pending, 0)
            note = await trio.to_thread.run_sync(vm.read_bar2, 0x1000, len(PEER_NOTE))
            assert note == PEER_NOTE
            # QEMU answers through its BAR2 and rings our vector 0; QEMU learns of our
            # peer asynchronously, so ring again until the plugin reports the interrupt
            await trio.to_thread.run_sync(vm.write_bar2, 0x2000, QEMU_NOTE)
            for _attempt in range(50):
                await trio.to_thread.run_sync(vm.ring, 1, 0)
                with trio.move_on_after(0.2):
                    done = await peer.wait_event(event="finished")
                    break
            else:
                raise AssertionError(f"our peer never got QEMU's doorbell: {peer.events}")
            assert done == {
                "event": "finished", "ok": True,
                "summary": f"mailbox: vector 0: {QEMU_NOTE.decode()}",
            }  # fmt: skip
            assert await peer.wait_exit() == 0
            # and the host sees both notes in the one shared memory
            shm = attach_posix_shm(daemon.shm_name)
            try:
                assert bytes(shm.buf[0x1000 : 0x1000 + len(PEER_NOTE)]) == PEER_NOTE
                assert bytes(shm.buf[0x2000 : 0x2000 + len(QEMU_NOTE)]) == QEMU_NOTE
            finally:
                shm.close()
        finally:
            await trio.to_thread.run_sync(vm.close)
