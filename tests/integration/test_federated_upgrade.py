"""A federated daemon upgraded in place (issues 12 and 14): its federation process runs on
across the ``execve`` (same pid, same link), so members see nothing, local peers see no
leave or join of remote peers, rings across hosts keep working, and peers that come and go
afterwards are told on both sides."""

from __future__ import annotations

import signal
from pathlib import Path

from ivshmemd.supervise import DaemonProcess
from ivshmemd.supervise.fabric import fabric_process, federation_pid
from tests.handover_tools import upgrade
from tests.integration.test_federation import (
    clients,
    first_ids,
    joined,
    ring,
    rung,
    sees,
)

#: lines that would mean a member, or a remote peer, was lost on the way
LOSS = (
    r"federation: member .* (left|is dead)|federation process (stopped|gone)"
    r"|remote peers announced"
)


def _lost(*daemons: DaemonProcess) -> list[str]:
    return [line for daemon in daemons for line in daemon.log_matching(LOSS)]


async def test_upgrade_in_place_keeps_the_federation_and_its_remote_peers(
    tmp_path: Path,
) -> None:
    async with fabric_process(tmp_path, 2, timeout=2) as (a, b):
        first_a, first_b = first_ids(2)
        async with clients(a.socket_path, b.socket_path) as (on_a, on_b):
            await joined(on_a, first_b)
            await joined(on_b, first_a)
            helper = federation_pid(a.pid)
            # a ring sent while the daemon re-executes goes through: the federation
            # process relays it, not the daemon
            a.process.send_signal(signal.SIGUSR2)
            ring(on_b, first_a, count=2)
            await a.wait_log("upgraded in place")
            assert await rung(on_a) == 2
            assert federation_pid(a.pid) == helper
            # no leave, no second join, on either side (after the greeting: version, id,
            # shm); the same eventfds ring
            assert on_a.stream[3:].count((first_b, False)) == 0
            assert on_b.stream[3:].count((first_a, False)) == 0
            await sees(on_a, {first_b: 1})
            await sees(on_b, {first_a: 1})
            ring(on_a, first_b, count=3)
            assert await rung(on_b) == 3
            # a newcomer on the upgraded daemon sees the remote peer and rings it; the
            # other host hears of it through the adopted federation process
            async with clients(a.socket_path) as (newcomer,):
                await sees(newcomer, {first_a: 1, first_b: 1})
                await joined(on_b, first_a + 1)
                ring(newcomer, first_b, count=4)
                assert await rung(on_b) == 4
                ring(on_b, first_a + 1, count=5)
                assert await rung(newcomer) == 5
            await on_b.wait_for((first_a + 1, False))
            # a newcomer on the other host is registered by the upgraded daemon
            async with clients(b.socket_path) as (late,):
                await joined(on_a, first_b + 1)
                ring(on_a, first_b + 1, count=6)
                assert await rung(late) == 6
            await on_a.wait_for((first_b + 1, False))
        assert _lost(a, b) == []
        # a second upgrade adopts what the first one adopted
        await upgrade(a, 2)
        assert federation_pid(a.pid) == helper
        async with clients(a.socket_path, b.socket_path) as (on_a, on_b):
            await joined(on_a, first_b + 2)
            await joined(on_b, first_a + 2)
            ring(on_b, first_a + 2, count=7)
            assert await rung(on_a) == 7
        assert _lost(a, b) == []
