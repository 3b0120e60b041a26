"""One shared memory across federated daemons, end to end (issue 13): a real QEMU VM, the
``ring`` plugin across hosts, and ``kill -9`` of a daemon in the middle of a transfer.

Every daemon is its own "host" (its own shm). What is checked is the guarantee itself: what
a writer put in its shared memory before ringing is in the rung reader's copy when its
interrupt arrives, on whatever host; a diff is applied whole or not at all.
"""

from __future__ import annotations

import mmap
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio

from ivshmemd.federation.twin import PAGE_SIZE
from ivshmemd.supervise import DaemonProcess, daemon_process
from ivshmemd.supervise.fabric import MEMBER_UP, federation_pid
from peers.pytest_plugin import FabricFactory, PeerSpawner
from peers.qtest import QEMU_BINARY, QemuIvshmemVm, qemu_available
from tests.integration.test_federation import (
    PLUGIN_DIR,
    WAIT,
    clients,
    federation_status,
    first_ids,
    joined,
    member_row,
    proxied_host,
    qemu_rings_until_finished,
    ring,
    rung,
)
from tests.ivshmemd.federation.proxy import TcpProxy
from tests.rawclient import RawClient

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
            # in its interrupt handler
            await trio.to_thread.run_sync(vm.write_bar2, QEMU_PATTERN_AT, QEMU_PATTERN)
            done = await qemu_rings_until_finished(vm, peer)
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


# -- kill -9 of a daemon in the middle of a transfer ---------------------------------------

#: The region: a round rewrites all of it, so its diff is many parts (frames of at most
#: :data:`~ivshmemd.federation.schema.DIFF_PART_BYTES`).
KILL_SIZE = 4 << 20
#: Full rounds before the one the writer's host dies in.
FULL_ROUNDS = 3
#: What each link carries of the last round before its host dies: a few parts of its diff.
KILL_AFTER = KILL_SIZE // 3
#: Seconds of silence before a member is dead: short, but longer than a flush of the whole
#: region takes on a loaded machine (the federation process sends no heartbeat meanwhile).
MEMBER_TIMEOUT = "2"


class GatedProxy(TcpProxy):
    """A :class:`TcpProxy` that can stop a link in the middle of a stream: once armed
    (:meth:`arm`), each direction of each connection forwards ``limit`` more bytes, then
    holds what follows (:attr:`held` is set) until :meth:`drop` closes the connections it
    holds, as the death of the sending host would (what it had not yet sent is lost). It
    captures nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.limit: int | None = None
        self.held = trio.Event()
        self._forwarded: dict[int, int] = {}
        self._holding: list[trio.CancelScope] = []

    def arm(self, limit: int) -> None:
        self.limit = limit
        self._forwarded = {}

    def drop(self) -> None:
        """Close the held connections; the others forward freely again."""
        self.limit = None
        for scope in self._holding:
            scope.cancel()

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        done: trio.CancelScope,
        inbound: bool = False,
    ) -> None:
        key = id(source)
        try:
            async for chunk in source:
                while chunk:
                    if self.limit is not None:
                        room = self.limit - self._forwarded.setdefault(key, 0)
                        if room <= 0:
                            self._holding.append(done)
                            self.held.set()
                            await trio.sleep_forever()
                        self._forwarded[key] += min(room, len(chunk))
                        piece, chunk = chunk[:room], chunk[room:]
                    else:
                        piece, chunk = chunk, b""
                    await sink.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


def words(client: RawClient, size: int) -> npt.NDArray[np.uint64]:
    """``client``'s view of its daemon's shm as 64-bit words (the mapping goes with the
    array: numpy holds it)."""
    return np.frombuffer(mmap.mmap(client.shm_fd(), size, mmap.MAP_SHARED), np.uint64)


def stamped_pages(mem: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The region as (page, word) words."""
    return mem.reshape(-1, PAGE_SIZE // 8)


def stamps(mem: npt.NDArray[np.uint64]) -> set[int]:
    """The stamps the region holds: every page must be one stamp throughout (a page that
    is not is reported as -1)."""
    pages = stamped_pages(mem)
    first = pages[:, 0]
    whole = (pages == first[:, None]).all(axis=1)
    return {int(x) for x in np.unique(first[whole])} | ({-1} if not whole.all() else set())


async def drained(client: RawClient, scope: trio.CancelScope) -> None:
    """``client`` drains what its daemon sends until ``scope`` is cancelled."""
    with scope:
        await client.drain()


async def test_kill_9_of_the_writers_daemon_mid_diff_leaves_no_partial_diff_and_the_rest_serve(
    tmp_path: Path,
) -> None:
    a_end = f"ipc://{tmp_path}/a.fed"
    # no background flush: each write reaches the others as one diff, ahead of its ring
    common = ["--federation-timeout", MEMBER_TIMEOUT, "--federation-flush", "3600"]
    a_args = ["--peer-ids", "0-999", "--federation-listen", a_end, *common]
    joining = [*common, "--federation-peer", a_end]
    gates = {"b": GatedProxy(), "c": GatedProxy()}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        a: DaemonProcess = await stack.enter_async_context(
            daemon_process(tmp_path, args=a_args, size=KILL_SIZE)
        )
        b, _ = await stack.enter_async_context(
            proxied_host(tmp_path, nursery, "b", "1000-1999", joining, proxy=gates["b"],
                         size=str(KILL_SIZE))
        )  # fmt: skip
        c, _ = await stack.enter_async_context(
            proxied_host(tmp_path, nursery, "c", "2000-2999", joining, proxy=gates["c"],
                         size=str(KILL_SIZE))
        )  # fmt: skip
        for daemon in (a, b, c):
            await daemon.wait_log(MEMBER_UP, 2)
        on_b, on_c = await stack.enter_async_context(clients(b.socket_path, c.socket_path))
        writer = await RawClient.connect(a.socket_path)
        stack.callback(writer.close)
        await writer.read(3)
        draining = trio.CancelScope()  # until its daemon dies (its stream ends there)
        nursery.start_soon(drained, writer, draining)
        for client, others in ((writer, (1000, 2000)), (on_b, (0, 2000)), (on_c, (0, 1000))):
            for other in others:
                await joined(client, other)
        mem_a, mem_b, mem_c = (words(client, KILL_SIZE) for client in (writer, on_b, on_c))
        # full rounds: the whole region stamped, then a ring to B and to C; each sees all of
        # it at its interrupt
        for round_ in range(1, FULL_ROUNDS + 1):
            mem_a[:] = round_
            ring(writer, 1000)
            ring(writer, 2000)
            for reader, mem in ((on_b, mem_b), (on_c, mem_c)):
                assert await rung(reader) == 1
                assert stamps(mem) == {round_}
        # the last round: its diff is on its way when A's host dies (A's daemon and its
        # federation process killed, what its links had not carried yet lost)
        for gate in gates.values():
            gate.arm(KILL_AFTER)
        mem_a[:] = FULL_ROUNDS + 1
        ring(writer, 1000)
        ring(writer, 2000)
        with trio.fail_after(WAIT):
            for gate in gates.values():
                await gate.held.wait()
        assert stamps(mem_b) == stamps(mem_c) == {FULL_ROUNDS}  # parts are in, not applied
        draining.cancel()
        os.kill(federation_pid(a.pid), signal.SIGKILL)
        a.send_signal(signal.SIGKILL)
        await a.wait_exit()
        a.remove_leftovers()
        for gate in gates.values():
            gate.drop()
        # B and C find A dead and its peer gone; the diff they had parts of is dropped
        await on_b.wait_for((0, False))
        await on_c.wait_for((0, False))
        for mem in (mem_b, mem_c):
            assert stamps(mem) == {FULL_ROUNDS}
        for reader in (on_b, on_c):  # the last round's rings never came either
            with pytest.raises(BlockingIOError):
                os.eventfd_read(reader.vector_fds(reader.stream[1][0])[0])
        # and they serve on: B and C ring each other, with memory
        note = np.frombuffer(b"from B, after A died".ljust(64, b"."), np.uint64)
        mem_b[: note.shape[0]] = note
        ring(on_b, 2000)
        assert await rung(on_c) == 1
        assert (mem_c[: note.shape[0]] == note).all()
        ring(on_c, 1000, count=2)
        assert await rung(on_b) == 2
        # healthy: the other survivor up, A not, nothing held; B applied A's full rounds,
        # C those and B's note
        for survivor, other, applied in ((b, "c", FULL_ROUNDS), (c, "b", FULL_ROUNDS + 1)):
            assert survivor.alive

            def settled(federation: dict[str, Any], applied: int = applied) -> bool:
                a_row = member_row(federation, a_end)
                return federation["memory"]["diffs_applied"] == applied and (
                    a_row is None or a_row["state"] != "up"
                )

            status = await federation_status(survivor, settled)
            row = member_row(status, gates[other].endpoint)
            assert row is not None and row["state"] == "up", status
            assert status["memory"]["held_now"] == 0, status["memory"]
