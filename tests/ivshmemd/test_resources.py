"""No client can make the daemon hoard fds, fill its log, or run it out of what it needs
(issue 8, points 5-7)."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import trio

from ivshmemd.ratelimit import LogLimiter
from tests.rawclient import RawClient


async def test_a_slow_reader_makes_the_daemon_hoard_no_fds(start_daemon: Any) -> None:
    """A peer that reads nothing while 300 peers join and leave: the join notices queued
    for it are withdrawn with the leaves (their eventfds closed at once), the daemon's fd
    count stays put, newcomers keep being served, and when the slow peer finally reads,
    its stream is consistent: it ends knowing exactly the peers that are there."""
    vectors, cycles = 4, 300
    async with start_daemon(vectors=vectors, args=["--send-timeout", "60"]) as daemon:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slow.connect(daemon.socket_path)
            await daemon.wait_log("peer 0 joined")
            fds_before = daemon.fd_count()
            for _ in range(cycles):
                churner = await RawClient.connect(daemon.socket_path)
                try:
                    head = await churner.read(3 + 2 * vectors)  # served in full
                    assert head[1][0] >= 1
                finally:
                    churner.close()
                await daemon.wait_log(rf"peer {head[1][0]} left")
            assert daemon.fd_count() <= fds_before + 2
            sentinel = await RawClient.connect(daemon.socket_path)
            try:
                sentinel_id = (await sentinel.read(3 + 2 * vectors))[1][0]
                slow.setblocking(False)
                reader = RawClient(slow)
                reader.close_fds_as_they_come = True
                await reader.read_until((sentinel_id, True), count=vectors)
                assert reader.view() == {sentinel_id: vectors}
                assert daemon.count("left") == cycles  # the slow peer was never dropped
            finally:
                sentinel.close()
        finally:
            slow.close()


async def test_refusals_are_logged_at_most_once_a_second(start_daemon: Any) -> None:
    async with start_daemon(vectors=1, args=["--max-peers", "1"]) as daemon:
        first = await RawClient.connect(daemon.socket_path)
        try:
            await first.read(4)
            start = time.monotonic()
            for _ in range(300):
                refused = await RawClient.connect(daemon.socket_path)
                try:
                    assert await refused.read_eof() == []
                finally:
                    refused.close()
            elapsed = time.monotonic() - start
            await daemon.wait_log("refused")
            assert daemon.count("refused") <= 2 + elapsed
        finally:
            first.close()


def test_the_log_limiter_says_how_many_it_held_back(caplog: Any) -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("test-limiter"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test-limiter"):
        assert limiter.log("k", logging.WARNING, "refused: %s", "full")
        for _ in range(5):
            assert not limiter.log("k", logging.WARNING, "refused: %s", "full")
        assert limiter.log("other", logging.WARNING, "another kind")
        now[0] = 1.5
        assert limiter.log("k", logging.WARNING, "refused: %s", "full")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused: full",
        "another kind",
        "refused: full (and 5 more like it in the last 2 s)",
    ]


async def test_a_peer_that_reads_slowly_is_not_taken_for_one_that_does_not(
    start_daemon: Any,
) -> None:
    """--send-timeout is for peers that read nothing. One that reads a little now and then
    (never enough for the kernel to call its socket writable again) is kept."""
    vectors = 4
    async with start_daemon(vectors=vectors, args=["--send-timeout", "1"]) as daemon:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slow.connect(daemon.socket_path)
            slow.setblocking(False)
            await daemon.wait_log("peer 0 joined")
            reader = RawClient(slow)
            reader.close_fds_as_they_come = True

            async def churn() -> None:
                while True:
                    churner = await RawClient.connect(daemon.socket_path)
                    try:
                        await churner.read(3 + 2 * vectors)
                    finally:
                        churner.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn)
                for _ in range(12):  # about 3.6 s: more than three --send-timeout periods
                    await trio.sleep(0.3)  # the slow peer's pace
                    await reader.read(20)
                nursery.cancel_scope.cancel()
            assert not daemon.count("peer 0 left"), [
                line for line in daemon.log if "peer 0 left" in line
            ]
        finally:
            slow.close()
