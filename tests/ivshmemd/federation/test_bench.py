"""The federation benchmark runs end to end (its figures are not checked: benchmarks print)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_a_short_benchmark_run_reports_every_figure() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ivshmemd.federation.bench",
            "--rounds",
            "2",
            "--per-round",
            "20",
            "--seconds",
            "0.2",
            "--timeout",
            "2",  # a member silent this long is dead: generous, the machine may be busy
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["round_trips"] == 40
    for key in ("raw_zmq_rtt_us", "relay_rtt_us"):
        assert 0 < figures[key]["p50"] <= figures[key]["p99"]
    assert figures["relay_frames_per_s"] > 0 and figures["raw_zmq_msgs_per_s"] > 0
    assert figures["kill_to_leave_s"] > 0


def test_a_short_fabric_run_of_real_daemons_reports_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ivshmemd.federation.bench", "fabric", "--transport", "ipc",
         "--rounds", "2", "--per-round", "20", "--seconds", "0.1", "--timeout", "1", "--json"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    ipc = figures["transports"]["ipc"]
    assert ipc["round_trips"] == 40
    for key in ("raw_zmq_rtt_us", "relay_rtt_us"):
        assert 0 < ipc[key]["p50"] <= ipc[key]["p99"]
    assert ipc["relay_over_raw_p50_median"] > 0
    assert ipc["relay_frames_per_s"] > 0 and ipc["raw_zmq_msgs_per_s"] > 0
    assert ipc["relay_doorbells_per_s"] >= ipc["relay_frames_per_s"]
    assert ipc["kill_daemon_to_leave_s"] > 0 and ipc["kill_host_to_leave_s"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "must be positive"),
        (["--timeout", "x"], "not a number"),
        (["fabric", "--per-round", "0"], "must be positive"),
        (["fabric", "--transport", "udp"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_clear_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ivshmemd.federation.bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
