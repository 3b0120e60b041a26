"""One shared memory across federated daemons, end to end (issue 13): a real QEMU VM, the
``ring`` plugin across hosts, and ``kill -9`` of a daemon in the middle of a transfer.

Every daemon is its own "host" (its own shm). What is checked is the guarantee itself: what
a writer put in its shared memory before ringing is in the rung reader's copy when its
interrupt arrives, on whatever host; a diff is applied whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from peers.pytest_plugin import FabricFactory, PeerSpawner
from peers.qtest import QEMU_BINARY, QemuIvshmemVm, qemu_available
from tests.integration.test_federation import first_ids

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
WAIT = 30.0

# -- a real QEMU VM on one host, our peer on another ---------------------------------------

#: Where our peer's note goes (it straddles BAR2's first page boundary) and what it says.
PEER_NOTE_AT = 0x0FC0
PEER_NOTE = b"from our peer on host B, across a page boundary, " * 2
#: Where QEMU's pattern goes: three pages' worth, not page-aligned, no NUL in it.
QEMU_PATTERN_AT = 0x1F00
QEMU_PATTERN = bytes(0x41 + (i * 7 + i // 4096) % 26 for i in range(3 * 4096))


@pytest.mark.skipif(not qemu_available(), reason=f"{QEMU_BINARY} is not on PATH")
async def test_a_qemu_vm_and_our_peer_on_two_hosts_see_what_the_other_wrote_at_its_doorbell(
    ivshmem_fabric: FabricFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with ivshmem_fabric(2, vectors=2, size="1M") as (a, b):
        qemu_id, peer_id = first_ids(2)
        vm = await trio.to_thread.run_sync(lambda: QemuIvshmemVm.doorbell(a.socket_path, vectors=2))
        try:
            assert await trio.to_thread.run_sync(vm.iv_position) == qemu_id
            # our peer on B writes its note through its vCPU, then rings QEMU's vector 1
            peer = await ivshmem_peers(b, "mailbox", [
                "--to", str(qemu_id), "--vector", "1", "--text", PEER_NOTE.decode(),
                "--offset", hex(PEER_NOTE_AT), "--reply-offset", hex(QEMU_PATTERN_AT),
                "--reply-len", str(len(QEMU_PATTERN)),
            ], pythonpath=[PLUGIN_DIR])  # fmt: skip
            assert peer.peer_id == peer_id
            await peer.wait_event(event="mailbox-rang", to=qemu_id, vector=1)
            # the MSI-X vector is pending: the note is in host A's copy, read through BAR2
            await trio.to_thread.run_sync(vm.wait_msix_pending, 1)
            note = await trio.to_thread.run_sync(vm.read_bar2, PEER_NOTE_AT, len(PEER_NOTE))
            assert note == PEER_NOTE
            # QEMU writes its pattern through BAR2 (qtest) and rings our peer, which reads it
            # in its interrupt handler. QEMU learns of our peer asynchronously and drops
            # doorbells to peers it does not know: ring until the plugin reports.
            await trio.to_thread.run_sync(vm.write_bar2, QEMU_PATTERN_AT, QEMU_PATTERN)
            for _attempt in range(100):
                await trio.to_thread.run_sync(vm.ring, peer_id, 0)
                with trio.move_on_after(0.2):
                    done = await peer.wait_event(event="finished")
                    break
            else:
                raise AssertionError(f"our peer never got QEMU's doorbell: {peer.events}")
            assert done["ok"], done
            assert done["summary"] == f"mailbox: vector 0: {QEMU_PATTERN.decode()}"
        finally:
            await trio.to_thread.run_sync(vm.close)


# -- the ring plugin, producer and consumer on two hosts -----------------------------------


@pytest.mark.parametrize(
    ("total", "message", "more", "consumer_host"),
    [
        # the figure: 100 MB in 64 KiB messages through the default 1 MiB ring
        (100 << 20, 64 << 10, [], 1),
        # a ring of two pages that wraps all the time, odd messages checksummed one by one
        (300_007, 1001, ["--ring-size", "8K", "--checksum", "crc32"], 1),
        # the same handshake between two peers of one host
        (4 << 20, 64 << 10, [], 0),
    ],
    ids=["100MB-across-hosts", "small-wrapping-ring-across-hosts", "one-host"],
)
async def test_the_ring_plugin_with_its_partner_on_another_host_moves_every_byte_checksummed(
    ivshmem_fabric: FabricFactory,
    ivshmem_peers: PeerSpawner,
    total: int,
    message: int,
    more: list[str],
    consumer_host: int,
) -> None:
    async with ivshmem_fabric(2, vectors=2, size="2M") as daemons:
        producer_id = first_ids(2)[0]
        consumer_id = first_ids(2)[consumer_host] + (consumer_host == 0)
        options = ["--bytes", str(total), "--message-size", str(message), *more]
        a, consumer_daemon = daemons[0], daemons[consumer_host]
        producer = await ivshmem_peers(a, "ring", [*options, "--partner", str(consumer_id)])
        consumer = await ivshmem_peers(
            consumer_daemon, "ring", [*options, "--partner", str(producer_id)]
        )
        assert (producer.peer_id, consumer.peer_id) == (producer_id, consumer_id)
        messages = -(-total // message)
        for peer, role in ((consumer, "consumer"), (producer, "producer")):
            summary = await peer.wait_finished()
            assert await peer.wait_exit() == 0, peer.describe()
            (figures,) = peer.matching(event="ring")
            assert figures["role"] == role
            assert (figures["bytes"], figures["messages"]) == (total, messages)
            assert figures["checksum_errors"] == 0
            assert summary is not None and summary.startswith(
                f"ring: {total} bytes in {messages} messages, 0 checksum errors, "
            ), summary
