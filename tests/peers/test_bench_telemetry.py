"""Smoke tests of the telemetry benchmarks (tiny runs: they print figures, assert none)."""

from __future__ import annotations

import os

from peers.bench_telemetry import MODES, bench_routes, bench_telemetry
from peers.bench_top import bench_top


def test_bench_telemetry_runs_every_mode_and_every_route() -> None:
    result = bench_telemetry(count=200, rounds=1, cpu=max(os.sched_getaffinity(0)))
    assert set(result["runs"]) == set(MODES)
    assert all(len(runs) == 1 and runs[0][0] > 0 for runs in result["runs"].values())
    assert set(result["ratio_p50"]) == {"on", "watched"}
    assert set(bench_routes(calls=100, repeat=1)) == {"plain", "list_slot", "closure"}


def test_bench_top_measures_top_and_top_quits_cleanly() -> None:
    result = bench_top(peers=2, duration=0.5, interval=0.2, plugin="monitor", warmup=0.5)
    assert result["top_exit_status"] == 0
    assert result["screen_bytes"] > 0
    assert result["top_cpu_seconds"] >= 0
