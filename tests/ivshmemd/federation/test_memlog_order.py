"""The memory-log side channel and the rings it precedes (issue 13), on in-process
federations: a peer queues its report, then rings; whatever relays that ring must have read
the report first, however the ring is reached (the data path's wakeup, or the relay the
daemon does when the ringing peer leaves, which comes before any wakeup read)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import trio

from ivshmemd.memlog import encode_dirty, encode_hello

from .hosts import all_see, all_up, ipc, make_config, start_node

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
