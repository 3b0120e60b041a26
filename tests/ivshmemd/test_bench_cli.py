"""The benchmarks' command lines (every package's): bad numbers are one clear usage error,
never a traceback. The one place for these cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("ivshmemd.bench", ["join", "--peers", "0"], "must be in 1..65536"),
        ("ivshmemd.bench", ["churn", "--cycles", "x"], "not an integer"),
        ("ivshmemd.bench", ["handover", "--peers", "0"], "must be in 1..4000"),
        ("ivshmemd.bench_control", ["--requests", "-1"], "must be positive"),
        ("ivshmemd.bench_hostile", ["slow-reader", "--seconds", "nan"], "finite number"),
        ("ivshmemd.bench_hostile", ["control-flood", "--clients", "0"], "must be positive"),
        ("peers.bench_ping", ["--count", "0"], "must be positive"),
        ("peers.bench_memlog", ["--write", "0"], "must be positive"),
        ("peers.bench", ["ring", "--bytes", "xx"], "invalid size"),
        ("vmm.bench", ["pagetable", "-b", "garbage"], "invalid size"),
        ("vmm.bench", ["pagetable", "-s", "floppy"], "invalid choice"),
        ("vmm.bench", ["dirty-log", "-v", "0"], "positive integer"),
    ],
)
def test_bad_benchmark_arguments(module: str, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_handover_benchmark_runs_and_reports() -> None:
    """A smoke run of ``ivshmemd.bench handover``: its JSON has both latency classes and the
    daemon's fds are the same after the upgrades (and the peers joining and leaving after
    each, ``--churn``) as before."""
    result = subprocess.run(
        [sys.executable, "-m", "ivshmemd.bench", "handover", "--peers", "3", "--upgrades", "1",
         "--churn", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bench"] == "handover" and report["peers"] == 3 and report["churn"] == 2
    assert report["ping"]["handover"]["round_trips"] > 0
    assert report["ping"]["quiet"]["round_trips"] > 0
    assert report["daemon_fds"][0] == report["daemon_fds"][1]
