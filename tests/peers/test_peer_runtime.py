"""The peer runtime end to end: real daemon, real peer processes, both event loops."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from peers.pytest_plugin import DaemonFactory, PeerSpawner

PING_LINE = re.compile(r"^ping: 300 round trips, p50 [0-9.]+ us, p99 [0-9.]+ us$")


@pytest.mark.parametrize("loop", ["--fast-path", "--trio", "--fast-path --spin-us 20"])
async def test_two_peers_play_ping(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, loop: str
) -> None:
    async with start_daemon(vectors=1) as daemon:
        args, options = ["--count", "300"], loop.split()
        server = await ivshmem_peers(daemon, "ping", args, peer_args=options, wait_running=False)
        answerer = await ivshmem_peers(daemon, "ping", args, peer_args=options, wait_running=False)
        first = await server.wait_event(event="running")
        second = await answerer.wait_event(event="running")
        assert {first["peer_id"], second["peer_id"]} == {0, 1}
        assert first["loop"] == ("trio" if loop == "--trio" else "fast-path")
        leader = await server.wait_event(event="paired")  # the one that waited serves
        serving, answering = (server, answerer) if leader["leader"] else (answerer, server)
        done = await serving.wait_event(event="finished")
        assert done["ok"] is True and PING_LINE.match(done["summary"]), done
        answered = await answering.wait_event(event="finished")
        assert answered["summary"] == (
            f"ping: answered 500 rings from peer {serving.peer_id} (300 measured, 200 warm-up)"
        )
        assert await server.wait_exit() == 0
        assert await answerer.wait_exit() == 0


@pytest.mark.parametrize("loop", ["--fast-path", "--trio"])
async def test_sigterm_stops_a_peer_cleanly(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, loop: str
) -> None:
    async with start_daemon(vectors=1) as daemon:
        peer = await ivshmem_peers(daemon, "monitor", peer_args=[loop])
        peer.terminate()
        await peer.wait_event(event="stopped")
        assert await peer.wait_exit() == 0
        await daemon.wait_log("peer 0 left")


async def test_daemon_going_away_is_reported(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1) as daemon:
        peer = await ivshmem_peers(daemon, "monitor")
    gone = await peer.wait_event(event="server-gone")
    assert "closed the connection" in gone["message"]
    assert await peer.wait_exit() == 1


async def test_reconnect_after_the_daemon_restarts(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "stable.sock")
    async with start_daemon(vectors=1, socket_path=socket_path):
        peer = await ivshmem_peers(socket_path, "monitor", peer_args=["--reconnect"])
        assert peer.peer_id == 0
    await peer.wait_event(event="reconnecting")
    async with start_daemon(vectors=1, socket_path=socket_path) as daemon:
        await daemon.wait_log("peer 0 joined")
        again = await peer.wait_event(event="running", count=2)
        assert again["peer_id"] == 0  # a fresh daemon, a fresh id
        peer.terminate()
        assert await peer.wait_exit() == 0


async def test_interrupts_reach_the_plugin_through_msix(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    """A ping peer serving partner 1 rings a monitor peer, whose plugin gets vector 0."""
    async with start_daemon(vectors=2) as daemon:
        pinger = await ivshmem_peers(daemon, "ping", ["--partner", "1", "--count", "1"])
        assert pinger.peer_id == 0
        monitor = await ivshmem_peers(daemon, "monitor", ["--exit-after", "1"])
        assert monitor.peer_id == 1
        done = await monitor.wait_event(event="finished")
        assert done["summary"] == "monitor: 1 interrupt"
        await monitor.wait_event(event="monitor", text="interrupt on vector 0")
        assert await monitor.wait_exit() == 0
        # the pinger's partner left before answering: it fails and says so
        failed = await pinger.wait_event(event="finished")
        assert failed["ok"] is False and "partner 1 left" in failed["summary"]
        assert await pinger.wait_exit() == 1


async def test_a_ring_before_the_guest_starts_is_not_lost(start_daemon: Any) -> None:
    """A doorbell that lands before the plugin has enabled MSI-X stays pending in the
    eventfd, even when a leave notice is processed first, and is delivered once it runs."""
    from peers.client import PeerLeft, connect
    from peers.plugin import Guest, Plugin
    from peers.runtime import PeerMachine

    class Recorder(Plugin):
        def start(self, guest: Guest) -> None:
            super().start(guest)
            guest.enable_msix()
            self.vectors: list[int] = []

        def interrupt(self, vector: int) -> None:
            self.vectors.append(vector)

    async with start_daemon(vectors=1) as daemon:
        ringer = await connect(daemon.socket_path, vectors=1)
        leaver = await connect(daemon.socket_path, vectors=1)
        target = await connect(daemon.socket_path, vectors=1)
        plugin = Recorder(argparse.Namespace())
        machine = PeerMachine(target, plugin, vectors=1)
        try:
            while target.peer_id not in ringer.peers:  # the ringer learns of the target
                await ringer.next_event()
            assert ringer.ring(target.peer_id, 0)
            leaver.close()
            event = await target.next_event()
            assert event == PeerLeft(leaver.peer_id)
            machine.on_server_event(event)  # before the guest has started
            machine.start()
            assert machine.on_vector(0) is True  # what the event loop does next
            assert plugin.vectors == [0]
        finally:
            machine.stop()
            ringer.close()


async def test_a_departing_peers_last_doorbell_comes_before_its_leave(start_daemon: Any) -> None:
    """docs/plugins.md's guarantee: a peer may ring and exit at once; its partner gets the
    interrupt first, then peer_left (the runtime drains the eventfds before the leave)."""
    from peers.client import PeerLeft, connect
    from peers.plugin import Guest, Plugin
    from peers.runtime import PeerMachine

    seen: list[tuple[str, int]] = []

    class Recorder(Plugin):
        def start(self, guest: Guest) -> None:
            super().start(guest)
            guest.enable_msix()

        def interrupt(self, vector: int) -> None:
            seen.append(("interrupt", vector))

        def peer_left(self, peer_id: int) -> None:
            seen.append(("left", peer_id))

    async with start_daemon(vectors=1) as daemon:
        target = await connect(daemon.socket_path, vectors=1)
        machine = PeerMachine(target, Recorder(argparse.Namespace()), vectors=1)
        machine.start()
        try:
            ringer = await connect(daemon.socket_path, vectors=1)
            while ringer.peer_id not in machine.device.peers:  # the target learns of it
                machine.on_server_event(await target.next_event())
            assert ringer.ring(target.peer_id, 0)
            ringer.close()  # rings, then leaves at once
            event = await target.next_event()
            while not isinstance(event, PeerLeft):
                event = await target.next_event()
            machine.on_server_event(event)  # the leave, before the loop read the eventfd
            assert seen == [("interrupt", 0), ("left", ringer.peer_id)]
        finally:
            machine.stop()


async def test_rings_before_the_handler_runs_are_one_interrupt(start_daemon: Any) -> None:
    """docs/plugins.md: doorbells are not counted (an eventfd counts, MSI-X does not)."""
    from peers.client import connect
    from peers.plugin import Guest, Plugin
    from peers.runtime import PeerMachine

    vectors: list[int] = []

    class Recorder(Plugin):
        def start(self, guest: Guest) -> None:
            super().start(guest)
            guest.enable_msix()

        def interrupt(self, vector: int) -> None:
            vectors.append(vector)

    async with start_daemon(vectors=1) as daemon:
        target = await connect(daemon.socket_path, vectors=1)
        machine = PeerMachine(target, Recorder(argparse.Namespace()), vectors=1)
        machine.start()
        ringer = await connect(daemon.socket_path, vectors=1)
        try:
            for _ in range(3):
                assert ringer.ring(target.peer_id, 0)
            assert machine.on_vector(0) is True  # what the event loop does when it wakes
            assert machine.on_vector(0) is False
            assert vectors == [0]
        finally:
            machine.stop()
            ringer.close()
