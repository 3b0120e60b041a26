"""``ivshmemctl up`` as a new user meets it (issue 11): it never hangs silently, it says what
failed in one line, it shows time and progress while it runs, and it runs topology files.

Real launcher, real daemons, real peers; every wait is for a line of its output or its exit.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from peers.pytest_plugin import DaemonFactory
from tests.launcher_run import (
    PLUGIN_DIR,
    TIMEOUT,
    launcher,
    launcher_argv,
    launcher_env,
    no_leftovers,
    run_command,
)


async def test_timeout_stops_a_run_that_would_never_end() -> None:
    """A run that cannot end used to hang silently: --timeout stops it, exit status 1."""
    async with launcher("--timeout", "1", "--peers", "1", "--plugin", "monitor") as run:
        assert await run.wait() == 1, run.err
    assert "up: --timeout 1 s passed, stopping" in run.err, run.err
    assert "up: FAILED: timed out after 1 s" in run.err, run.err
    assert not any("Traceback" in line for line in run.err), run.err


async def test_a_stop_names_each_running_peer_and_what_it_waits_for() -> None:
    """On a stop (timeout, Ctrl-C, another peer's failure) every peer still running is
    named with what it said it waits for."""
    argv = ("-v", "--peers", "2", "--plugin", "ping", "--partner", "7")
    async with launcher(*argv) as run:
        for peer_id in (0, 1):  # -v shows what each says it waits for
            await run.wait_line(run.err, rf"^up: peer {peer_id} waits for answers from peer 7$")
        run.process.send_signal(signal.SIGINT)
        assert await run.wait() == 130, run.err
    still = sorted(x for x in run.err if x.startswith("up: still running when stopped:"))
    assert len(still) == 2, run.err
    for peer_id, line in enumerate(still):
        assert re.fullmatch(
            rf"up: still running when stopped: peer {peer_id} \(pid \d+\), waiting for "
            r"answers from peer 7",
            line,
        ), still
    no_leftovers(run)


async def test_an_odd_count_of_a_pairing_plugin_is_refused_with_its_line(
    tmp_path: Path,
) -> None:
    topology = tmp_path / "odd.toml"
    topology.write_text(
        '[[region]]\nname = "odd"\n\n[[region.peers]]\nplugin = "pair-probe"\n'
        '\n[[region]]\nname = "even"\n\n[[region.peers]]\nplugin = "pair-probe"\ncount = 2\n'
    )
    done = await run_command(launcher_argv("-f", str(topology)), env=launcher_env())
    assert done.returncode == 2
    assert done.stderr.decode() == (
        f"ivshmemctl up: {topology}:4: pair-probe pairs its peers: 1 peer of it in region "
        "'odd' would leave one waiting for a partner for ever; give an even count\n"
    )
    assert done.stdout == b""


async def test_a_plugins_exception_is_one_line_and_its_traceback_needs_v() -> None:
    """It used to be reported as the last line of a trio ExceptionGroup."""
    for hook in ("start", "interrupt"):
        async with launcher("--peers", "1", "--plugin", "crash", "--hook", hook) as run:
            assert await run.wait() == 1, run.err
        failed = [line for line in run.err if line.startswith("up: FAILED:")]
        assert len(failed) == 1, run.err
        assert re.fullmatch(
            r"up: FAILED: peer 0 \(pid \d+\), exit code 1: plugin crash raised ValueError: "
            r"bad value 42 \(crash\.py:\d+ in explode\)",
            failed[0],
        ), failed
        assert not any("Traceback" in line or "+---" in line for line in run.err), run.err
        async with launcher("-v", "--peers", "1", "--plugin", "crash", "--hook", hook) as run:
            assert await run.wait() == 1, run.err
        assert any(x.endswith(": Traceback (most recent call last):") for x in run.err), run.err
        assert not any("ExceptionGroup" in x or "+---" in x for x in run.err), run.err


async def test_a_peer_by_hand_reports_a_plugin_exception_in_one_line(
    start_daemon: DaemonFactory,
) -> None:
    async with start_daemon(vectors=1) as daemon:
        for loop in ("--fast-path", "--trio"):
            for verbose in ((), ("-v",)):
                argv = [sys.executable, "-m", "peers", "-S", daemon.socket_path, loop, *verbose,
                        "--plugin", "crash", "--hook", "interrupt"]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": str(PLUGIN_DIR)}
                done = await run_command(argv, env=env)
                lines = done.stderr.decode().splitlines()
                assert done.returncode == 1, lines
                assert re.fullmatch(
                    r"peer \d+: plugin crash raised ValueError: bad value 42 "
                    r"\(crash\.py:\d+ in explode\)",
                    lines[-1],
                ), lines
                if verbose:
                    assert any("Traceback (most recent call last):" in x for x in lines)
                    assert not any("ExceptionGroup" in x or "+---" in x for x in lines), lines
                else:
                    assert len(lines) == 2, lines  # "running plugin ..." and the error


async def test_the_live_line_shows_the_time_and_the_works_progress() -> None:
    """On a terminal the live line says how long it has run and how far the work is."""
    controller, terminal = pty.openpty()
    env = {**launcher_env(), "COLUMNS": "300"}
    argv = launcher_argv("--peers", "2", "--plugin", "ring", "--bytes", "32M")
    try:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal, env=env
        )
        os.close(terminal)
        terminal = -1
        screen = b""
        with trio.fail_after(TIMEOUT):
            while True:
                await trio.lowlevel.wait_readable(controller)
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the launcher has closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            assert await process.wait() == 0, screen
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    text = screen.decode()
    lines = re.findall(r"up: \d/2 running, \d finished, \d failed, \d+\.\d s[^\r\n\x1b]*", text)
    assert lines, text
    # the consumer's last report is always drawn: the whole 32M verified
    assert any(line.endswith(" | 100% (33554432/33554432 bytes)") for line in lines), lines


async def test_a_topology_file_runs_two_regions(tmp_path: Path) -> None:
    topology = tmp_path / "two.toml"
    topology.write_text(
        """# two daemons
[[region]]
name = "pp"
vectors = 1

[[region.peers]]
plugin = "ping"
count = 2
options = { count = 500 }

[[region]]
name = "stream"
size = "8M"
vectors = 2

[[region.peers]]
plugin = "ring"
count = 2
options = ["--bytes", "4M"]

[[region.peers]]
plugin = "pagetable"
options = { size = "1M" }
"""
    )
    async with launcher("-f", str(topology)) as run:
        assert await run.wait() == 0, run.err
    daemons = [line for line in run.err if " daemon (pid " in line]
    assert len(daemons) == 2, run.err
    assert re.match(r"up: region pp: daemon \(pid \d+\) listening on \S+/pp\.sock", daemons[0])
    assert "(shm ivshmem-up-" in daemons[1] and ", 8388608 bytes, 2 vectors)" in daemons[1]
    assert "starting 2 peers running ring, 1 peer running pagetable" in daemons[1], daemons
    assert run.out[0].startswith("all 5 peers running after "), run.out
    assert sum(line.startswith("pp: ping: 500 round trips") for line in run.out) == 1, run.out
    assert sum(line.startswith("stream: ring: 4194304 bytes") for line in run.out) == 2, run.out
    assert sum(line.startswith("stream: pagetable: 3 stages") for line in run.out) == 1
    assert "up: done in" in run.err[-1] and "daemons stopped" in run.err[-1], run.err
    for line in daemons:  # both daemons gone, their sockets and shm too
        found = re.search(r"daemon \(pid (\d+)\) listening on (\S+) \(shm ([^,]+),", line)
        assert found, line
        assert not os.path.exists(f"/proc/{found.group(1)}")
        assert not Path(found.group(2)).exists()
        assert not Path("/dev/shm", found.group(3)).exists()
