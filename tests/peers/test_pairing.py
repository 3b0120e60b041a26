"""Partners found through the shared-memory directory, in real peers on a real daemon
(issue 11, items 3 and 4): pairs agree on both sides whatever the ids, each pair has its own
region, an odd peer says at once what it waits for, and ping works beside other plugins on
a daemon whose ids do not start at 0.
"""

from __future__ import annotations

import re
from pathlib import Path

from peers.pytest_plugin import DaemonFactory, PeerSpawner

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"


async def test_pairs_agree_have_their_own_regions_and_the_leader_speaks_first(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1, size="1M") as daemon:
        peers = await ivshmem_peers.many(
            daemon, "pair-probe", 4, ["--size", "65536"], pythonpath=[PLUGIN_DIR]
        )
        pairs = {p.peer_id: await p.wait_event(event="pair") for p in peers}
        # both sides name each other, one leads, and they share one region
        for me, pair in pairs.items():
            other = pairs[pair["partner"]]
            assert other["partner"] == me
            assert other["leader"] != pair["leader"]
            assert (other["offset"], other["size"]) == (pair["offset"], pair["size"])
        regions = sorted({(p["offset"], p["size"]) for p in pairs.values()})
        assert len(regions) == 2 and regions[0][0] + regions[0][1] <= regions[1][0]
        assert all(size == 65536 for _, size in regions)
        # the leader's doorbell and note reach its partner
        for peer in peers:
            pair = pairs[peer.peer_id]
            if not pair["leader"]:
                rung = await peer.wait_event(event="rung")
                assert (rung["vector"], rung["note"]) == (0, pair["partner"])
        # a fifth has nobody: it says so at once, and which plugin it waits for
        odd = await ivshmem_peers(daemon, "pair-probe", pythonpath=[PLUGIN_DIR])
        waiting = await odd.wait_event(event="waiting")
        assert waiting["what"] == "a partner running pair-probe"
        await odd.wait_event(
            event="log", message="waiting for a partner running pair-probe (none is free yet)"
        )
        assert not odd.matching(event="pair")


async def test_ping_pairs_beside_a_monitor_whatever_the_ids(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    """Ids 1 and 2 (a monitor took 0) used to wait for ever: pairing was id XOR 1."""
    async with start_daemon(vectors=1) as daemon:
        monitor = await ivshmem_peers(daemon, "monitor")
        assert monitor.peer_id == 0
        first = await ivshmem_peers(daemon, "ping", ["--count", "100"])
        second = await ivshmem_peers(daemon, "ping", ["--count", "100"])
        assert {first.peer_id, second.peer_id} == {1, 2}
        summaries = [await p.wait_finished() for p in (first, second)]
        served = [s for s in summaries if s and re.match(r"ping: 100 round trips, p50", s)]
        answered = [s for s in summaries if s and s.startswith("ping: answered 300 rings")]
        assert len(served) == len(answered) == 1, summaries
        for peer in (first, second):
            assert await peer.wait_exit() == 0
        assert not monitor.matching(event="monitor", text="interrupt on vector 0")


async def test_a_partner_that_leaves_while_paired_fails_its_partner_clearly(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1) as daemon:
        a = await ivshmem_peers(daemon, "ping", ["--count", "100000000"])
        b = await ivshmem_peers(daemon, "ping", ["--count", "100000000"])
        await a.wait_event(event="paired")
        await b.wait_event(event="paired")
        b.kill()
        finished = await a.wait_event(event="finished")
        assert finished["ok"] is False
        assert re.fullmatch(rf"ping: partner {b.peer_id} left after \d+ of \d+ rounds",
                            finished["summary"])  # fmt: skip
        assert await a.wait_exit() == 1
