"""CPU used by ``ivshmemctl top`` watching a fabric of 64 peers: the figure of issue 15.

``python -m peers.bench_top [--peers 64] [--seconds 30] [--interval 0.5] [--json]``

Starts ``ivshmemctl up --peers N --plugin ping`` (a daemon and N/2 pinging pairs, running
until stopped; ``--plugin monitor``: N idle peers), waits until every peer has joined,
then runs ``ivshmemctl top`` in a real pseudo-terminal (160 x 50) and reads its screen
for ``--seconds``. Its CPU time over that window comes from ``/proc/PID/stat`` (user +
system, after a warm-up of 5 s, so start-up imports do not count), as a share of one core;
so does the control process's (which aggregates the peers' reports and answers top).
Then ``q``: top must exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from typing import Any

from ivshmemd.argtypes import positive_int, seconds
from ivshmemd.control.client import ControlClient, NoDaemonError
from ivshmemd.control.schema import default_control_endpoint
from ivshmemd.exitcodes import EXIT_OK

__all__ = ["bench_top", "main"]

WARMUP = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (``/proc/PID/stat`` fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        raise SystemExit(f"process {pid} is gone") from None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as kids:
                found += [int(k) for k in kids.read().split()]
    return found


def _control_process(daemon_pid: int) -> int | None:
    for child in _children(daemon_pid):
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as cmd:
            if b"ivshmemd.control.process" in cmd.read():
                return child
    return None


def _wait_peers(
    socket_path: str, peers: int, up: subprocess.Popen[bytes], log_path: str,
    timeout: float = 300.0,
) -> dict[str, Any]:  # fmt: skip
    client = ControlClient(default_control_endpoint(socket_path), 5.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if up.poll() is not None:
                with open(log_path, errors="replace") as log:
                    lines = [ln for ln in log.read().splitlines() if "still running" not in ln]
                    raise SystemExit("ivshmemctl up ended:\n" + "\n".join(lines[-20:]))
            with contextlib.suppress(NoDaemonError, OSError):
                status = client.request("status")
                if status.get("peers", 0) >= peers:
                    result: dict[str, Any] = status
                    return result
            time.sleep(0.2)  # polling the daemon's status until the peers are in
    finally:
        client.close()
    raise SystemExit(f"the {peers} peers did not all join in {timeout:g} s")


def _drain(fd: int, until: float) -> int:
    """Read the pseudo-terminal until ``until``; returns the bytes read."""
    total = 0
    while (left := until - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                total += len(os.read(fd, 1 << 16))
            except OSError:
                break
    return total


def bench_top(
    peers: int = 64,
    duration: float = 30.0,
    interval: float = 0.5,
    plugin: str = "ping",
    warmup: float = WARMUP,
) -> dict[str, Any]:
    """Run the measurement (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-top-") as directory:
        socket_path = os.path.join(directory, "iv.sock")
        log_path = os.path.join(directory, "up.log")
        log = open(log_path, "wb")  # noqa: SIM115 (closed below, after the run)
        up = subprocess.Popen(
            [sys.executable, "-m", "ivshmemd.ctl", "up", "-v", "-S", socket_path, "--peers",
             str(peers), "--plugin", plugin,
             *(["--count", "1000000000"] if plugin == "ping" else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        try:
            status = _wait_peers(socket_path, peers, up, log_path)
            control = _control_process(int(status["pid"]))
            pid, master = pty.fork()
            if pid == 0:  # the child: top on the pseudo-terminal
                os.execv(
                    sys.executable,
                    [
                        sys.executable,
                        "-m",
                        "ivshmemd.ctl",
                        "-S",
                        socket_path,
                        "top",
                        "--interval",
                        str(interval),
                    ],
                )
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
            os.kill(pid, signal.SIGWINCH)
            read = _drain(master, time.monotonic() + warmup)
            top0 = _cpu_seconds(pid)
            ctl0 = _cpu_seconds(control) if control else 0.0
            t0 = time.monotonic()
            read += _drain(master, t0 + duration)
            top1 = _cpu_seconds(pid)
            ctl1 = _cpu_seconds(control) if control else 0.0
            elapsed = time.monotonic() - t0
            os.write(master, b"q")
            _drain(master, time.monotonic() + 2.0)
            _, wait_status = os.waitpid(pid, 0)
            os.close(master)
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
            log.close()
            with open(log_path, errors="replace") as text:
                lines = [ln for ln in text.read().splitlines() if "control" in ln]
            print("\n".join(lines[-10:]), file=sys.stderr)
    return {
        "bench": "top",
        "peers": peers,
        "plugin": plugin,
        "interval": interval,
        "seconds": elapsed,
        "top_cpu_seconds": top1 - top0,
        "top_core_share": (top1 - top0) / elapsed,
        "control_process_core_share": (ctl1 - ctl0) / elapsed if control else None,
        "screen_bytes": read,
        "top_exit_status": os.waitstatus_to_exitcode(wait_status),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m peers.bench_top``."""
    parser = argparse.ArgumentParser(
        prog="python -m peers.bench_top", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--peers", type=positive_int, default=64)
    parser.add_argument("--seconds", type=seconds(), default=30.0)
    parser.add_argument("--interval", type=seconds(), default=0.5, help="top's --interval")
    parser.add_argument(
        "--plugin", choices=("ping", "monitor"), default="ping",
        help="what the peers run: ping pairs (busy) or monitors (idle)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.peers % 2 and args.plugin == "ping":
        parser.error("--peers must be even (ping peers work in pairs)")
    result = bench_top(args.peers, args.seconds, args.interval, args.plugin)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    control = result["control_process_core_share"]
    print(f"ivshmemctl top watching {result['peers']} {result['plugin']} peers (interval "
          f"{result['interval']:g} s, 160x50 terminal), {result['seconds']:.1f} s after a "
          f"{WARMUP:g} s warm-up:")  # fmt: skip
    print(f"  top: {result['top_cpu_seconds']:.2f} s CPU, {100 * result['top_core_share']:.1f}% "
          "of a core")  # fmt: skip
    if control is not None:
        print(f"  the control process (aggregation, snapshots): {100 * control:.1f}% of a core")
    print(f"  top drew {result['screen_bytes']} bytes; exit status {result['top_exit_status']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
