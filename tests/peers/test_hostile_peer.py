"""A hostile peer clears O_NONBLOCK on another peer's eventfd (issue 8, point 14).

The flag lives in the open file description that the daemon and every peer holding that
eventfd share, so any of them can change it for all. The victim, a real ``ivshmem-peer``
process on each of its event loops, must never block on it: after the attack it still
answers SIGTERM at once (a victim stuck in a blocking ``eventfd_read`` never would: the read
is restarted after the signal handler runs).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.peerprocs import json_processes, peer_processes

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
    start_daemon: Any, case: str
) -> None:
    loop, mode = CASES[case]
    async with start_daemon(vectors=1) as daemon, peer_processes() as spawn:
        victim = await spawn(["-S", daemon.socket_path, "--plugin", "monitor", *loop])
        running = await victim.wait_event(event="running")
        hostile_cmd = [sys.executable, "-m", "tests.peers.hostile_peer", daemon.socket_path,
                       str(running["peer_id"]), mode]  # fmt: skip
        async with json_processes(hostile_cmd) as spawn_hostile:
            hostile = await spawn_hostile([], stdin=subprocess.PIPE)
            await hostile.wait_event(event="attacked")
            if mode == "leave":
                await victim.wait_event(event="monitor", text="peer 1 left")
            # the victim still serves its loop: it hears of a newcomer...
            newcomer = await spawn(["-S", daemon.socket_path, "--plugin", "monitor"])
            await newcomer.wait_event(event="running")
            await victim.wait_event(event="monitor", text="peer 2 joined")
            # ...and stops at once when asked
            victim.process.terminate()
            assert await victim.wait_exit(timeout=10) == 0
            assert victim.matching(event="stopped")


async def test_a_ring_never_waits_on_a_counter_another_process_filled(start_daemon: Any) -> None:
    """The hostile peer fills its own counter and clears O_NONBLOCK, then rings the victim:
    the victim's answer (a ring to the hostile peer) is dropped instead of blocking it."""
    async with start_daemon(vectors=1) as daemon, peer_processes() as spawn:
        hostile_cmd = [sys.executable, "-m", "tests.peers.hostile_peer", daemon.socket_path,
                       "-1", "saturate"]  # fmt: skip
        async with json_processes(hostile_cmd) as spawn_hostile:
            hostile = await spawn_hostile([], stdin=subprocess.PIPE)
            await hostile.wait_event(event="attacked")
            victim = await spawn(["-S", daemon.socket_path, "--plugin", "ping", "--partner",
                                  "0", "--count", "1", "--warmup", "0"])  # fmt: skip
            assert await victim.wait_exit(timeout=15) == 0
            assert victim.matching(event="finished", ok=True)
