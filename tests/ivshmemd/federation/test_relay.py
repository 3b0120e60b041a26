"""Tests of the relay's eventfd side, with real eventfds made by the registry."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

from ivshmemd.federation.relay import DoorbellRelay
from ivshmemd.registry import Registry, SharedFd


def fds_open() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def relay() -> Iterator[DoorbellRelay]:
    made = DoorbellRelay()
    try:
        yield made
    finally:
        made.close()


def vectors(count: int = 2) -> tuple[SharedFd, ...]:
    return Registry(count, 16).create_vectors()


def release(shared: tuple[SharedFd, ...]) -> None:
    for handle in shared:
        handle.release()


def test_drain_reads_what_each_eventfd_accumulated(relay: DoorbellRelay) -> None:
    a, b = vectors(), vectors()
    relay.watch("m1", 1000, a)
    relay.watch("m2", 2000, b)
    assert relay.drain() == []
    os.eventfd_write(a[1].fd, 1)
    os.eventfd_write(a[1].fd, 2)  # coalesces, as an eventfd does
    os.eventfd_write(b[0].fd, 7)
    assert sorted(relay.drain()) == [("m1", 1000, 1, 3), ("m2", 2000, 0, 7)]
    assert relay.drain() == []
    assert relay.stats.relayed_frames == 2 and relay.stats.relayed_rings == 10
    assert relay.remote_peers() == {1000: "m1", 2000: "m2"}
    release(a)
    release(b)


def test_the_epoll_fd_is_readable_exactly_when_something_was_rung(relay: DoorbellRelay) -> None:
    a = vectors()
    relay.watch("m1", 5, a)
    poller = select.poll()
    poller.register(relay.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    os.eventfd_write(a[0].fd, 1)
    assert poller.poll(0) != []
    relay.drain()
    assert poller.poll(0) == []
    release(a)


def test_unwatch_stops_reporting_even_if_a_peer_still_holds_the_eventfd(
    relay: DoorbellRelay,
) -> None:
    a = vectors(1)
    relay.watch("m1", 5, a)
    held = os.dup(a[0].fd)  # a local peer process still has it
    try:
        assert relay.unwatch(5) == "m1"
        assert relay.unwatch(5) is None
        release(a)  # the registry drops it too: our fd number is closed
        os.eventfd_write(held, 1)  # the peer rings the departed remote peer
        poller = select.poll()
        poller.register(relay.fileno(), select.POLLIN)
        assert poller.poll(0) == []  # no ghost left in the epoll set (it would spin the loop)
        assert relay.drain() == []
    finally:
        os.close(held)


def test_references_keep_the_fd_open_until_the_relay_lets_go(relay: DoorbellRelay) -> None:
    a = vectors(1)
    fd = a[0].fd
    relay.watch("m1", 5, a)
    a[0].release()  # the registry's reference
    os.fstat(fd)  # still open: the relay holds one
    relay.unwatch(5)
    assert a[0].closed
    with pytest.raises(OSError):
        os.fstat(fd)


def test_watching_the_same_remote_peer_twice_is_refused(relay: DoorbellRelay) -> None:
    a = vectors()
    relay.watch("m1", 5, a)
    with pytest.raises(ValueError, match="already watched"):
        relay.watch("m1", 5, a)
    release(a)


def test_deliver_writes_the_count_into_the_local_eventfd(relay: DoorbellRelay) -> None:
    local = vectors()
    relay.add_local(3, local)
    assert relay.local_peers() == {3: 2}
    assert relay.deliver(3, 1, 5)
    assert relay.deliver(3, 1, 2)
    assert os.eventfd_read(local[1].fd) == 7
    assert not relay.deliver(4, 0, 1)  # not a local peer (any more)
    assert not relay.deliver(3, 2, 1)  # no such vector
    assert relay.stats.delivered_rings == 7 and relay.stats.stale_rings == 2
    relay.remove_local(3)
    assert not relay.deliver(3, 0, 1)
    release(local)


def test_a_full_eventfd_counter_drops_the_ring_instead_of_blocking(relay: DoorbellRelay) -> None:
    local = vectors(1)
    relay.add_local(3, local)
    os.eventfd_write(local[0].fd, 0xFFFFFFFFFFFFFFFE)
    assert not relay.deliver(3, 0, 1)
    release(local)


def test_close_releases_every_reference_and_leaks_no_fd() -> None:
    before = fds_open()
    relay = DoorbellRelay()
    remote, local = vectors(4), vectors(4)
    relay.watch("m1", 1, remote)
    relay.add_local(2, local)
    release(remote)
    release(local)
    assert fds_open() == before + 1 + 8  # epoll + the eventfds the relay still holds
    relay.close()
    assert fds_open() == before
    assert all(handle.closed for handle in (*remote, *local))
