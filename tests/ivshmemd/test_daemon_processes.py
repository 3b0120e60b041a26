"""Multi-process tests: a real ivshmemd and real client processes with real eventfds."""

from __future__ import annotations

import signal
from typing import Any

from tests.probes import probe_id, probes


async def test_clients_see_each_other_and_eventfds_connect(start_daemon: Any) -> None:
    async with start_daemon(vectors=2) as daemon, probes(daemon.socket_path, 2) as spawn:
        clients = [await spawn() for _ in range(4)]
        ids = [probe_id(c) for c in clients]
        assert ids == [0, 1, 2, 3]
        for index, client in enumerate(clients):
            # peers present at connect time come in the welcome, later ones as joins
            assert set(client.matching(event="welcome")[0]["peers"]) == {
                str(p) for p in ids[:index]
            }
            for later in ids[index + 1 :]:
                await client.wait_event(event="joined", peer=later)
        # every pair, every vector: the interrupt arrives at exactly its target vector
        for source in clients:
            for target in clients:
                if target is source:
                    continue
                for vector in range(2):
                    before = len(target.matching(event="rung"))
                    await source.send(f"ring {probe_id(target)} {vector}")
                    event = await target.wait_event(event="rung", vector=vector, count=1)
                    rung = target.matching(event="rung")
                    assert len(rung) == before + 1 and rung[-1] == event
                    target.events.remove(event)
        await daemon.wait_log(r"peer 3 joined")


async def test_sigkill_gives_leave_notices(start_daemon: Any) -> None:
    async with start_daemon(vectors=1) as daemon, probes(daemon.socket_path, 1) as spawn:
        a, b, c = [await spawn() for _ in range(3)]
        await a.wait_event(event="joined", peer=probe_id(c))
        b.process.send_signal(signal.SIGKILL)
        await a.wait_event(event="left", peer=probe_id(b))
        await c.wait_event(event="left", peer=probe_id(b))
        await daemon.wait_log(rf"peer {probe_id(b)} left")
        # a doorbell to the departed peer is refused client-side; survivors still connect
        await a.send(f"ring {probe_id(b)} 0")
        assert (await a.wait_event(event="ringed"))["ok"] is False
        await a.send(f"ring {probe_id(c)} 0")
        await c.wait_event(event="rung", vector=0)
