"""The telemetry schema and aggregation (sans-I/O), the Prometheus families and the view."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from ivshmemd.metrics import render as render_metrics
from ivshmemd.telemetry import (
    HEATMAP_BUCKETS,
    NO_TELEMETRY,
    Aggregator,
    ReportError,
    telemetry_endpoints_for,
    validate_report,
)
from ivshmemd.top import snapshot_data, svg_of
from ivshmemd.topview import format_rate, rate_style, render

STATUS = {"shm": {"size": 1 << 20}, "pid": 1, "uptime": 5.0, "vectors": 1, "peers": 3}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _report(peer: int, t: float, rung: list[list[int]], **more: Any) -> Any:
    return validate_report(
        {"peer": peer, "pid": 1000 + peer, "plugin": "ping", "t": t, "rung": rung, **more}
    )


def _registry(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "pid": 1000 + i, "connected_at": 0.0, "vectors": 1} for i in ids]


def test_rates_come_from_two_reports_and_totals_are_cumulative() -> None:
    clock = Clock()
    agg = Aggregator(clock)
    agg.watch("me", 0.5)
    agg.add_report(_report(0, 1.0, [[1, 0, 100]], interrupts=[7]))
    clock.now += 0.5
    agg.add_report(_report(0, 2.0, [[1, 0, 300]], interrupts=[9],
                           counters={"messages": 4}))  # fmt: skip
    snap = agg.snapshot(_registry(0, 1), STATUS)
    assert snap["doorbells"] == [{"src": 0, "dst": 1, "vector": 0, "total": 300, "rate": 200.0}]
    row0, row1 = snap["peers"]
    assert row0["interrupts_total"] == 9 and row0["interrupts_per_s"] == 2.0
    assert row0["counters"] == {"messages": {"total": 4, "rate": 4.0}}  # from 0
    assert row1["telemetry"] is False and row1["silent"] != NO_TELEMETRY  # still waiting
    clock.now += 2  # the same watching period (the lease renewed): past the grace
    agg.watch("me", 0.5)
    assert agg.snapshot(_registry(0, 1), STATUS)["peers"][1]["silent"] == NO_TELEMETRY


def test_a_peer_that_left_keeps_its_last_counts_for_a_while() -> None:
    clock = Clock()
    agg = Aggregator(clock)
    agg.add_report(_report(3, 1.0, [[4, 0, 12]]))
    snap = agg.snapshot(_registry(), STATUS)
    assert [(p["id"], p["state"]) for p in snap["peers"]] == [(3, "left")]
    assert snap["doorbells"][0]["total"] == 12
    clock.now += 3600
    assert agg.snapshot(_registry(), STATUS)["peers"] == []


def test_a_new_process_under_a_reused_id_starts_afresh() -> None:
    agg = Aggregator(Clock())
    agg.add_report(_report(0, 5.0, [[1, 0, 50]]))
    fresh = validate_report({"peer": 0, "pid": 4242, "t": 1.0, "rung": [[1, 0, 2]]})
    agg.add_report(fresh)
    snap = agg.snapshot([{"id": 0, "pid": 4242}], STATUS)
    assert snap["doorbells"][0]["total"] == 2


def test_leases_expire_and_the_shortest_interval_wins() -> None:
    clock = Clock()
    agg = Aggregator(clock)
    assert agg.interval() is None
    agg.watch("a", 1.0, 10)
    agg.watch("b", 0.25, 2)
    assert agg.interval() == 0.25
    clock.now += 5
    assert agg.interval() == 1.0
    clock.now += 10
    assert agg.interval() is None


def test_the_heatmap_sums_the_peers_dirty_pages_per_region() -> None:
    clock = Clock()
    agg = Aggregator(clock)
    bucket = (1 << 20) // HEATMAP_BUCKETS
    for peer, (first, second) in {0: (1, 3), 1: (0, 2)}.items():
        agg.add_report(
            _report(peer, 1.0, [], dirty={"bucket_bytes": bucket, "buckets": [first] + [0] * 63})
        )
        agg.add_report(
            _report(peer, 2.0, [], dirty={"bucket_bytes": bucket, "buckets": [second] + [0] * 63})
        )
    heat = agg.snapshot(_registry(0, 1), STATUS)["heatmap"]
    assert heat["pages_total"][0] == 5 and heat["pages_per_s"][0] == 4.0
    assert sum(heat["pages_total"]) == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"peer": -1, "pid": 1, "t": 0},
        {"peer": 1, "pid": 1, "t": "now"},
        {"peer": 1, "pid": 1, "t": 0, "rung": [[1, 0]]},
        {"peer": 1, "pid": 1, "t": 0, "rung": [[1, 0, -5]]},
        {"peer": 1, "pid": 1, "t": 0, "rung": [[1, 0, 1]] * 5000},
        {"peer": 1, "pid": 1, "t": 0, "counters": {str(i): 1 for i in range(100)}},
        {"peer": 1, "pid": 1, "t": 0, "counters": {"x" * 100: 1}},
        {"peer": 1, "pid": 1, "t": 0, "dirty": {"buckets": [1] * 65}},
        [1, 2, 3],
    ],
)
def test_malformed_reports_are_refused(bad: Any) -> None:
    with pytest.raises(ReportError):
        validate_report(bad)


def test_telemetry_endpoints_follow_the_convention() -> None:
    eps = telemetry_endpoints_for("ipc:///run/x.sock.telemetry")
    assert eps.ticks == "ipc:///run/x.sock.ticks"
    assert telemetry_endpoints_for("tcp://h:7000").ticks == "tcp://h:7001"
    with pytest.raises(ValueError):
        telemetry_endpoints_for("ipc:///run/elsewhere")


def _snapshot(peers: int) -> dict[str, Any]:
    agg = Aggregator(Clock())
    for peer in range(peers):
        agg.add_report(_report(peer, 1.0, [[(peer + 1) % peers, 0, 10 * peer]]))
    return agg.snapshot(_registry(*range(peers)), STATUS)


def test_metrics_cap_the_peer_labels_and_sum_the_rest() -> None:
    text = render_metrics(_snapshot(4), max_peers=2).decode()
    rings = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ivshmem_doorbells_total"
    }
    assert rings == {
        (("dst", "1"), ("src", "0"), ("vector", "0")): 0.0,
        (("dst", "other"), ("src", "1"), ("vector", "0")): 10.0,
        (("dst", "other"), ("src", "other"), ("vector", "0")): 20.0,
        (("dst", "0"), ("src", "other"), ("vector", "0")): 30.0,
    }
    peers_labelled = {
        s.labels["peer"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "peer" in s.labels
    }
    assert peers_labelled <= {"0", "1", "other"}


def test_the_view_fits_the_terminal_it_is_given() -> None:
    snap = _snapshot(64)
    for width, height in ((120, 50), (60, 24)):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(render(snap, width, height))
        lines = console.export_text().splitlines()
        assert all(len(line) <= width for line in lines)
        assert any(line.startswith("doorbells/s") for line in lines)
        console.file.close()


def test_rates_are_short_and_coloured_by_decade() -> None:
    assert [format_rate(v) for v in (0, 5, 950, 12_345, 1_500_000)] == [
        "·", "5.0", "950", "12.3k", "1.5M",
    ]  # fmt: skip
    assert rate_style(0) != rate_style(5) != rate_style(50_000)


def test_an_svg_carries_its_snapshot() -> None:
    snap = _snapshot(3)
    svg = svg_of(snap)
    assert svg.startswith("<svg") and "</svg>" in svg
    assert snapshot_data(svg)["doorbells"] == snap["doorbells"]


def test_federation_members_are_exported_once_the_status_has_them() -> None:
    agg = Aggregator(Clock())
    status = {**STATUS, "federation": {"members": [
        {"endpoint": "tcp://10.0.0.2:7300", "state": "up"},
        {"endpoint": "tcp://10.0.0.3:7300", "state": "dead"},
    ]}}  # fmt: skip
    text = render_metrics(agg.snapshot([], status)).decode()
    members = {
        s.labels["member"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ivshmem_federation_member_up"
    }
    assert members == {"tcp://10.0.0.2:7300": 1.0, "tcp://10.0.0.3:7300": 0.0}


def test_the_replicated_memory_is_exported_as_counters() -> None:
    agg = Aggregator(Clock())
    memory = {"holder": True, "diffs_sent": 4, "bytes_sent": 8192, "rings_held": 1}
    status = {**STATUS, "federation": {"members": [], "memory": memory}}
    text = render_metrics(agg.snapshot([], status)).decode()
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ivshmem_federation_memory")
    }
    assert samples["ivshmem_federation_memory_diffs_sent_total"] == 4
    assert samples["ivshmem_federation_memory_bytes_sent_total"] == 8192
    assert samples["ivshmem_federation_memory_rings_held_total"] == 1
    assert samples["ivshmem_federation_memory_holder"] == 1.0
