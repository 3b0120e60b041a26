"""The federated-memory benchmark runs end to end and reports every figure (they are not
checked: benchmarks print; what the run checks itself is that every interrupt found its
data, or it fails)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ivshmemd.federation.bench_memory import print_human

BENCH = [sys.executable, "-m", "ivshmemd.federation.bench", "memory"]


def test_a_short_run_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    result = subprocess.run(
        [*BENCH, "--transport", "ipc", "--size", "8M", "--ring", "4M", "--rounds", "1",
         "--per-round", "5", "--throughput-rounds", "1", "--seconds", "0.2", "--json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    micro = figures["micro"]
    assert micro["scan_us_per_mib"] > 0 and micro["flush_few_us_per_mib"] > 0
    for shape in ("page", "word"):
        assert list(micro["diff_us_per_page"][shape]) == ["1", "4", "16", "64", "256", "1024"]
        for cost in micro["diff_us_per_page"][shape].values():
            assert cost["total"] > 0
    ipc = figures["transports"]["ipc"]
    assert set(ipc["throughput"]) == {"4096", "65536", "1048576"}
    for entry in ipc["throughput"].values():
        assert entry["raw_zmq_mb_s"] > 0 and entry["log_mb_s"] > 0 and entry["scan_mb_s"] > 0
        assert entry["log_over_raw"] > 0 and entry["scan_over_raw"] > 0
    latency = ipc["latency"]
    for kind in ("zmq", "log", "scan"):
        assert set(latency[kind]) == {"0", "4096", "65536", "1048576"}
        for entry in latency[kind].values():
            assert 0 < entry["p50_us"] <= entry["p99_us"] and entry["over_smallest"] > 0
    assert latency["log"]["0"]["over_smallest"] == 1.0
    # every round trip with data and every message was checked on its interrupt
    assert ipc["checked"]["log"] > 0 and ipc["checked"]["scan"] > 0
    # the dirty-log fabric's daemons diffed what their clients reported, the other scanned
    assert ipc["memory"]["log"]["reports"] > 0 and ipc["memory"]["log"]["logged_peers"]
    assert ipc["memory"]["scan"]["reports"] == 0 and not ipc["memory"]["scan"]["logged_peers"]
    assert ipc["memory"]["log"]["diffs_sent"] > 0 and ipc["memory"]["scan"]["diffs_sent"] > 0
    # and the same figures as human lines
    print_human(figures)
    out = capsys.readouterr().out
    for text in ("scan (Twin.changed_pages", "diff per dirty page", "throughput A -> B",
                 "raw zmq", "dirty-log", "doorbell round trip", "none wrong"):  # fmt: skip
        assert text in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1M"], "too small for --ring"),
        (["--ring", "64K"], "cannot hold a message"),
        (["--transport", "udp"], "invalid choice"),
        (["--per-round", "0"], "must be positive"),
    ],
)
def test_bad_arguments_are_one_clear_line(args: list[str], message: str) -> None:
    result = subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
