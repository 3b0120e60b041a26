"""Multi-process tests: a real ivshmemd and real client processes with real eventfds."""

from __future__ import annotations

from typing import Any

from tests.peer_probe import StartProbe


async def test_clients_see_each_other_and_eventfds_connect(
    start_daemon: Any, probe: StartProbe
) -> None:
    async with start_daemon(vectors=2) as daemon:
        clients = [await probe(daemon.socket_path, 2) for _ in range(4)]
        ids = [c.peer_id for c in clients]
        assert ids == [0, 1, 2, 3]
        for index, client in enumerate(clients):
            # peers present at connect time come in the welcome, later ones as joins
            assert set(client.first_of["welcome"]["peers"]) == {str(p) for p in ids[:index]}
            for later in ids[index + 1 :]:
                await client.wait_event(event="joined", peer=later)
        # every pair, every vector: the interrupt arrives at exactly its target vector
        for source in clients:
            for target in clients:
                if target is source:
                    continue
                for vector in range(2):
                    before = len(target.matching(event="rung"))
                    await source.ring(target.peer_id, vector)
                    event = await target.wait_event(event="rung", vector=vector, counter=1)
                    rung = target.matching(event="rung")
                    assert len(rung) == before + 1 and rung[-1] == event
                    target.events.remove(event)
        await daemon.wait_log(r"peer 3 joined")


async def test_sigkill_gives_leave_notices(start_daemon: Any, probe: StartProbe) -> None:
    async with start_daemon(vectors=1) as daemon:
        a, b, c = [await probe(daemon.socket_path, 1) for _ in range(3)]
        await a.wait_event(event="joined", peer=c.peer_id)
        b.kill()
        await a.wait_event(event="left", peer=b.peer_id)
        await c.wait_event(event="left", peer=b.peer_id)
        await daemon.wait_log(rf"peer {b.peer_id} left")
        # a doorbell to the departed peer is refused client-side; survivors still connect
        await a.ring(b.peer_id, 0)
        assert (await a.wait_event(event="ringed"))["ok"] is False
        await a.ring(c.peer_id, 0)
        await c.wait_event(event="rung", vector=0)
