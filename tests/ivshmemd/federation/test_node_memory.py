"""The driver's memory paths (issue 13), on in-process federations.

- A peer queues its memory report, then rings; whatever relays that ring must have read the
  report first, however the ring is reached (the data path's wakeup, or the relay the
  daemon does when the ringing peer leaves, which comes before any wakeup read).
- The background flush scans its round's share of the region (up to FLUSH_SCAN_BYTES), in
  slices, even while a writer nobody logs is connected; and a ring relayed meanwhile does
  not wait for the whole round.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import trio

from ivshmemd.federation import node as node_module
from ivshmemd.memlog import encode_dirty, encode_hello

from .hosts import Node, all_see, all_up, ipc, make_config, start_node

SIZE = 1 << 20
NPAGES = SIZE // 4096


async def test_a_report_queued_before_a_ring_is_read_before_that_ring_leaves(
    tmp_path: Path,
) -> None:
    regions = [np.zeros(SIZE, dtype=np.uint8) for _ in range(2)]
    memlog = str(tmp_path / "a.memlog")
    # no background flush within the test: only the ring's flush can carry the write
    quiet = {"memory": True, "flush": 3600.0}
    async with trio.open_nursery() as nursery:
        a = await start_node(
            nursery, make_config(ipc(tmp_path, "a"), 0, memlog=memlog, **quiet), regions[0]
        )
        config_b = make_config(ipc(tmp_path, "b"), 1, peers=(a.endpoint,), **quiet)
        b = await start_node(nursery, config_b, regions[1])
        await all_up([a, b])
        with trio.fail_after(20):
            await b.federation.memory_ready.wait()
        writer = a.host.add_local({"pid": os.getpid()})
        reader = b.host.add_local()
        await all_see([a, b])
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as channel:
            channel.connect(memlog)
            channel.send(encode_hello(writer.peer_id, 4096, NPAGES))
            memlogs = a.federation.memlogs
            assert memlogs is not None
            await a.host.wait_for(lambda: writer.peer_id in memlogs.logged, "the hello")
            page = 5
            regions[0][page * 4096 : page * 4096 + 11] = np.frombuffer(b"hello world", np.uint8)
            words = np.zeros(NPAGES // 64, dtype=np.uint64)
            words[page // 64] = np.uint64(1 << (page % 64))
            report = encode_dirty(words)
            assert report is not None
            channel.send(report)
            a.host.ring(reader.peer_id)
            a.host.remove_local(writer.peer_id)  # relays its ring at once, then its leave
            assert await b.host.read_ring(reader.peer_id) == 1
            assert bytes(regions[1][page * 4096 : page * 4096 + 11]) == b"hello world"
        nursery.cancel_scope.cancel()


async def _pair(
    nursery: trio.Nursery, tmp_path: Path, regions: list[np.ndarray], flush: float
) -> tuple[Node, Node]:
    """Two nodes replicating memory; A has a writer nobody logs, B a reader."""
    settings = {"memory": True, "flush": flush}
    a = await start_node(nursery, make_config(ipc(tmp_path, "a"), 0, **settings), regions[0])
    config_b = make_config(ipc(tmp_path, "b"), 1, peers=(a.endpoint,), **settings)
    b = await start_node(nursery, config_b, regions[1])
    await all_up([a, b])
    with trio.fail_after(20):
        await b.federation.memory_ready.wait()
    a.host.add_local()
    b.host.add_local()
    await all_see([a, b])
    return a, b


async def test_a_background_round_diffs_its_share_even_with_a_writer_nobody_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "FLUSH_SCAN_BYTES", 16 * 4096)  # a round: 16 pages
    regions = [np.zeros(SIZE, dtype=np.uint8) for _ in range(2)]
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery, tmp_path, regions, flush=0.01)
        replica_a, replica_b = a.federation.replica, b.federation.replica
        assert replica_a is not None and replica_b is not None
        diffs = replica_a.stats["diffs_sent"]
        regions[0][5 * 4096] = 1  # inside the first round's share
        regions[0][200 * 4096] = 2  # in the 13th round's
        await b.host.wait_for(lambda: regions[1][5 * 4096] == 1, "the first write")
        await b.host.wait_for(lambda: regions[1][200 * 4096] == 2, "the second write")
        # one diff per write: two rounds, neither scanned the whole region
        assert replica_a.stats["diffs_sent"] == diffs + 2
        nursery.cancel_scope.cancel()


async def test_a_ring_relayed_during_a_background_round_does_not_wait_for_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "FLUSH_SLICE_BYTES", 16 * 4096, raising=False)  # 16 slices
    regions = [np.zeros(SIZE, dtype=np.uint8) for _ in range(2)]
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery, tmp_path, regions, flush=0.01)
        replica = a.federation.replica
        assert replica is not None
        (reader,) = b.host.local_ids()
        scan = replica.twin.changed_pages
        relayed_by_round_end: list[int] = []
        rang: list[int] = []
        round_over = trio.Event()

        def changed_pages(first: int = 0, stop: int | None = None) -> np.ndarray:
            if stop is not None and not round_over.is_set():  # a background slice
                if first == 0:  # a round begins: ring now
                    a.host.ring(reader)
                    rang.append(first)
                if rang and stop == replica.twin.npages:  # that round's last slice
                    relayed_by_round_end.append(a.federation.relay.stats.as_dict()["relayed_rings"])
                    round_over.set()
            return scan(first, stop)

        monkeypatch.setattr(replica.twin, "changed_pages", changed_pages)
        with trio.fail_after(20):
            await round_over.wait()
        assert relayed_by_round_end == [1]
        assert await b.host.read_ring(reader) == 1
        nursery.cancel_scope.cancel()
