"""The peer's event schema: every kind round-trips, bad objects are refused clearly, and
what a real peer prints decodes."""

from __future__ import annotations

import json

import pytest

from peers import report
from peers.pytest_plugin import DaemonFactory, PeerSpawner

EXAMPLES: list[report.Event | report.PluginEvent] = [
    report.Running(peer_id=3, pid=1234, shm_size=1 << 20, vectors=2, peers=(0, 1), loop="trio"),
    report.Log("running plugin ping"),
    report.Finished(ok=True, summary="ping: 5 round trips"),
    report.Finished(ok=False, summary=None),
    report.Stopped(signal="SIGTERM"),
    report.ServerGone("the server closed the connection"),
    report.Reconnecting(),
    report.Error("no ivshmem server answered"),
    report.PeerJoined(peer_id=7),
    report.PeerLeft(peer_id=7),
    report.Waiting("a partner running ping"),
    report.Progress(done=5, total=20, unit="round trips"),
    report.Paired(key="ring", partner=4, leader=True, offset=0x1000, size=0x101000),
    report.PluginEvent("ring", {"role": "consumer", "bytes": 10}),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_its_json_line(
    event: report.Event | report.PluginEvent,
) -> None:
    line = report.encode(event)
    assert "\n" not in line
    assert report.decode(json.loads(line)) == event


def test_every_runtime_kind_has_an_example() -> None:
    assert set(report.KINDS) == {
        type(e).KIND for e in EXAMPLES if not isinstance(e, report.PluginEvent)
    }


@pytest.mark.parametrize(
    "obj",
    [
        {"peer_id": 1},  # no kind
        {"event": "running", "peer_id": 1},  # missing fields
        {"event": "finished", "ok": 1, "summary": None},  # an int is not a bool
        {"event": "peer-left", "peer_id": True},  # nor a bool an int
        {
            "event": "running",
            "peer_id": 1,
            "pid": 2,
            "shm_size": 3,
            "vectors": 1,
            "peers": ["a"],
            "loop": "trio",
        },
    ],
)
def test_objects_that_do_not_fit_are_refused(obj: dict[str, object]) -> None:
    with pytest.raises(report.ReportError):
        report.decode(obj)


def test_a_plugin_cannot_pose_as_the_runtime() -> None:
    with pytest.raises(report.ReportError, match="runtime's kind"):
        report.encode(report.PluginEvent("finished", {"ok": True}))
    with pytest.raises(report.ReportError, match="expected a Running"):
        report.decode_as({"event": "log", "message": "x"}, report.Running)


async def test_what_a_real_peer_says_fits_the_schema(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1) as daemon:
        first = await ivshmem_peers(daemon, "monitor")
        second = await ivshmem_peers(daemon, "monitor")
        second.terminate()
        await first.wait_event(event="peer-left", peer_id=second.peer_id)
        first.terminate()
        assert await first.wait_exit() == 0
    kinds = [type(report.decode(e)) for e in first.events]
    assert kinds[0] is report.Running
    assert {report.Log, report.PeerJoined, report.PeerLeft, report.Stopped} <= set(kinds)
    assert report.PluginEvent in kinds  # the monitor plugin's own lines
