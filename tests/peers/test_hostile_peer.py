"""A hostile peer clears O_NONBLOCK on another peer's eventfd (issue 8, point 14).

The flag lives in the open file description that the daemon and every peer holding that
eventfd share, so any of them can change it for all. The victim, a real ``ivshmem-peer``
process on each of its event loops, must never block on it: after the attack it still
answers SIGTERM at once (a victim stuck in a blocking ``eventfd_read`` never would: the read
is restarted after the signal handler runs).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

import pytest
import trio

from ivshmemd.supervise import Child, open_supervisor
from peers.client import connect
from peers.plugin import Plugin
from peers.pytest_plugin import DaemonFactory, PeerSpawner
from peers.runtime import PeerMachine

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a read may take before the test calls it blocked (it returns at once when right).
TIMEOUT = 5.0


def hostile_peer(socket_path: str, victim: int, mode: str) -> Child:
    """The hostile peer process (``tests.peers.hostile_peer``), to start with stdin=True."""
    return Child([sys.executable, "-m", "tests.peers.hostile_peer", socket_path, str(victim),
                  mode])  # fmt: skip


#: (victim's loop options, how the hostile peer gets it to read an empty eventfd)
CASES = {
    # the spinning fast path reads its eventfds without waiting for readiness
    "fast-path-spin-ring": (["--fast-path", "--spin-us", "100000"], "ring"),
    # every loop reads its eventfds when a peer leaves, to deliver that peer's last rings
    "fast-path-leave": (["--fast-path"], "leave"),
    "trio-leave": (["--trio"], "leave"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_peer_never_blocks_on_an_eventfd_another_process_controls(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, case: str
) -> None:
    loop, mode = CASES[case]
    async with start_daemon(vectors=1) as daemon, open_supervisor() as supervisor:
        victim = await ivshmem_peers(daemon, "monitor", peer_args=loop)
        hostile = hostile_peer(daemon.socket_path, await victim.wait_running(), mode)
        await supervisor.start(hostile, events=True, stdin=True, cwd=ROOT)
        await hostile.wait_event(event="attacked")
        if mode == "leave":
            await victim.wait_event(event="monitor", text="peer 1 left")
        # the victim still serves its loop: it hears of a newcomer...
        await ivshmem_peers(daemon, "monitor")
        await victim.wait_event(event="monitor", text="peer 2 joined")
        # ...and stops at once when asked
        victim.terminate()
        assert await victim.wait_exit() == 0
        assert victim.matching(event="stopped")


async def test_a_ring_never_waits_on_a_counter_another_process_filled(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    """The hostile peer fills its own counter and clears O_NONBLOCK, then rings the victim:
    the victim's answer (a ring to the hostile peer) is dropped instead of blocking it."""
    async with start_daemon(vectors=1) as daemon, open_supervisor() as supervisor:
        hostile = hostile_peer(daemon.socket_path, -1, "saturate")
        await supervisor.start(hostile, events=True, stdin=True, cwd=ROOT)
        await hostile.wait_event(event="attacked")
        ping = ["--partner", "0", "--count", "1", "--warmup", "0"]
        victim = await ivshmem_peers(daemon, "ping", ping, wait_running=False)
        assert await victim.wait_exit() == 0, victim.describe()
        assert victim.matching(event="finished", ok=True)


async def test_the_fast_paths_vector_handler_never_waits_on_a_drained_eventfd(
    start_daemon: DaemonFactory,
) -> None:
    """The fast-path loop reads an eventfd that poll(2) reported readable, but another
    holder may drain it and clear O_NONBLOCK in between: the handler the loop calls
    (:meth:`PeerMachine.vector_handler`) must find it empty, not wait for the next ring."""
    async with start_daemon(vectors=1) as daemon:
        client = await connect(daemon.socket_path, vectors=1)
        machine = PeerMachine(client, Plugin(argparse.Namespace()), vectors=1)
        try:
            fd = machine.own_fds[0]
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            with trio.move_on_after(TIMEOUT) as stuck:
                rung = await trio.to_thread.run_sync(
                    machine.vector_handler(0), abandon_on_cancel=True
                )
            if stuck.cancelled_caught:
                os.eventfd_write(fd, 1)  # let the stuck thread go
                pytest.fail("the vector handler blocked on an empty eventfd")
            assert rung is False
        finally:
            machine.stop()
