"""Smoke test of the memory-log benchmark (a tiny run: it prints figures, asserts none; the
test checks what the runs did, not how fast), and ping's ``--write`` option it relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peers.bench_memlog import MODES, bench_memlog

COUNT = 200
WARMUP = 200  # ping's default


def test_bench_memlog_runs_every_mode_and_every_written_doorbell_is_reported() -> None:
    cpu = max(os.sched_getaffinity(0))
    result = bench_memlog(count=COUNT, rounds=1, write=4096, cpu=cpu, route_calls=200)
    assert set(result["runs"]) == set(MODES)
    assert all(len(runs) == 1 and runs[0][0] > 0 for runs in result["runs"].values())
    assert set(result["routes_us"]) == {"plain", "idle", "write", "report"}
    # a listener and nothing written but the pairing's directory entries: each peer's first
    # doorbell reports the directory page, and not one report follows
    assert result["received"]["idle"] == [(2, 2)]
    # every ring of both sides follows a write: each is reported (and the pairing's own)
    reports, pages = result["received"]["report"][0]
    assert reports >= 2 * (COUNT + WARMUP) and pages >= reports


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["--write", "-1"], "--write must not be negative, got -1"),
        (["--write", "4096", "--partner", "3"], "--write needs a pair's region"),
    ],
)
def test_bad_ping_write_options_exit_2_with_a_clear_message(
    options: list[str], complaint: str, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "no-daemon.sock")  # options are checked before connecting
    result = subprocess.run(
        [sys.executable, "-m", "peers", "-S", socket_path, "--plugin", "ping", *options],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert complaint in result.stderr and "Traceback" not in result.stderr
