"""Testing the hello plugin (examples/hello-plugin) with real daemons and peer processes."""

import re

import pytest

from peers.harness import PeerError

GREETING = re.compile(r"hello: peer \d+ said 'hi from peer \d+'")
ANSWER = re.compile(r"hello: peer \d+ answered 'hi from peer \d+, and hello back from peer \d+'")


async def test_two_peers_greet_each_other(ivshmem_daemon, ivshmem_peers):
    async with ivshmem_daemon(vectors=1) as daemon:
        first, second = await ivshmem_peers.many(daemon, "hello", 2, ["--text", "hi"])
        summaries = [await first.wait_finished(), await second.wait_finished()]
        assert sum(bool(GREETING.fullmatch(s)) for s in summaries) == 1, summaries
        assert sum(bool(ANSWER.fullmatch(s)) for s in summaries) == 1, summaries
        assert await first.wait_exit() == await second.wait_exit() == 0


async def test_three_pairs_on_the_session_daemon(ivshmem_session_daemon, ivshmem_peers):
    peers = await ivshmem_peers.many(ivshmem_session_daemon, "hello", 6, ["--text", "hi"])
    summaries = [await peer.wait_finished() for peer in peers]
    assert sum(bool(GREETING.fullmatch(s)) for s in summaries) == 3, summaries
    assert sum(bool(ANSWER.fullmatch(s)) for s in summaries) == 3, summaries


async def test_a_lonely_peer_says_what_it_waits_for(ivshmem_daemon, ivshmem_peers):
    async with ivshmem_daemon(vectors=1) as daemon:
        alone = await ivshmem_peers(daemon, "hello")
        waiting = await alone.wait_event(event="waiting")
        assert waiting["what"] == "a partner running hello"
        alone.terminate()
        assert await alone.wait_exit() == 0


def test_plain_tests_use_the_sync_fixtures(ivshmem_daemon_sync, ivshmem_peers_sync):
    with ivshmem_daemon_sync(vectors=1) as daemon:
        peers = ivshmem_peers_sync.many(daemon, "hello", 2)
        for peer in peers:
            assert peer.wait_finished().startswith("hello: peer ")
        with pytest.raises(PeerError, match="expected 1 event"):
            peers[0].wait_event(event="no-such-event", timeout=0.1)  # it has exited
