"""Multi-process integration tests: real daemon, real peer processes, the real launcher.

The peers run the test-only ``doorbell-probe`` plugin (tests/plugins, registered through a
``*.dist-info`` on the peers' PYTHONPATH) where a test needs a peer to ring on a schedule,
and the built-in plugins otherwise. Nothing here waits on time: every wait is for a line
or a JSON event from a process, or for its exit.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from peers import pytest_plugin
from peers.pytest_plugin import PeerProcess, PeerSpawner, SyncPeerSpawner
from tests.launcher_run import (
    PLUGIN_DIR,
    TIMEOUT,
    launcher,
    launcher_argv,
    launcher_env,
    no_leftovers,
    run_command,
)

# The fixtures come from the `ivshmem` pytest11 entry point once the project is installed
# with it; naming them here as well keeps this module working before that (a module-level
# fixture simply takes precedence over the plugin's identical one).
ivshmem_daemon = pytest_plugin.ivshmem_daemon
ivshmem_peers = pytest_plugin.ivshmem_peers
ivshmem_daemon_sync = pytest_plugin.ivshmem_daemon_sync
ivshmem_peers_sync = pytest_plugin.ivshmem_peers_sync

PING_LINE = re.compile(r"^ping: (\d+) round trips, p50 [0-9.]+ us, p99 [0-9.]+ us$")


def _irqs(peer: PeerProcess, round_: int) -> list[dict[str, Any]]:
    return peer.matching(event="irq", round=round_)


def _check_round(peers: list[PeerProcess], round_: int, ids: list[int], vectors: int) -> None:
    """Every (source, target, vector) of the round arrived once, at its target and vector."""
    delivered: list[tuple[int, int, int]] = []
    steps: list[int] = []
    for peer in peers:
        for irq in _irqs(peer, round_):
            assert irq["vector"] == irq["expected_vector"], irq
            assert irq["target"] == peer.peer_id == irq["me"], irq
            assert irq["repeat"] is False, irq
            delivered.append((irq["source"], irq["target"], irq["vector"]))
            steps.append(irq["step"])
    expected = {(s, t, v) for s in ids for t in ids if s != t for v in range(vectors)}
    assert Counter(delivered) == Counter(expected)  # each exactly once, no extras
    assert sorted(steps) == list(range(len(expected)))


def _probe_args(expect: int, *more: str) -> list[str]:
    return ["--expect", str(expect), *more]


async def test_four_peers_ring_every_pair_and_vector(
    ivshmem_daemon: Any, ivshmem_peers: PeerSpawner
) -> None:
    vectors = 4
    async with ivshmem_daemon(vectors=vectors) as daemon:
        async with trio.open_nursery() as nursery:  # start the four at once
            for _ in range(4):
                nursery.start_soon(
                    lambda: ivshmem_peers(
                        daemon,
                        "doorbell-probe",
                        _probe_args(4),
                        peer_args=["--trio"],
                        pythonpath=[PLUGIN_DIR],
                    )
                )
        peers = sorted(ivshmem_peers.peers, key=lambda p: p.peer_id or 0)
        ids = [p.peer_id for p in peers]
        assert ids == [0, 1, 2, 3]
        # The circuit starts and ends at the lowest id: its round-done closes the round.
        await peers[0].wait_event(event="round-done", round=0, timeout=TIMEOUT)
        for peer in peers:
            await peer.wait_events(3 * vectors, event="irq", round=0)
        for peer in peers:  # stop them, so that every event they will ever print is in
            peer.terminate()
            assert await peer.wait_exit() == 0
            assert peer.matching(event="stopped"), peer.describe()
        _check_round(peers, 0, [0, 1, 2, 3], vectors)
        assert sum(len(p.matching(event="round-done")) for p in peers) == 1


async def test_sigkilled_peer_leaves_and_the_survivors_keep_ringing(
    ivshmem_daemon: Any, ivshmem_peers: PeerSpawner
) -> None:
    vectors = 2
    async with ivshmem_daemon(vectors=vectors) as daemon:
        args = _probe_args(4, "--rerun-on-leave")
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(
                    lambda: ivshmem_peers(
                        daemon,
                        "doorbell-probe",
                        args,
                        peer_args=["--fast-path"],
                        pythonpath=[PLUGIN_DIR],
                    )
                )
        peers = sorted(ivshmem_peers.peers, key=lambda p: p.peer_id or 0)
        assert [p.peer_id for p in peers] == [0, 1, 2, 3]
        await peers[0].wait_event(event="round-done", round=0, timeout=TIMEOUT)

        victim = peers[2]
        survivors = [p for p in peers if p is not victim]
        victim.kill()
        assert await victim.wait_exit() == -signal.SIGKILL
        await daemon.wait_log(r"peer 2 left")
        for peer in survivors:  # the leave notice reached them, and their tables dropped it
            table = await peer.wait_event(event="peer-table", left=2)
            assert table["peers"] == [0, 1, 3], (peer.peer_id, table)
            await peer.wait_event(event="peer-left", peer_id=2)
        # The lowest survivor rang the departed peer on every vector, then ran a new round
        # over the survivors; the round completing shows the doorbells to the dead peer
        # were ignored and that the survivors still ring each other.
        departed = await peers[0].wait_event(event="rang-departed", peer_id=2)
        assert departed["vectors"] == vectors
        await peers[0].wait_event(event="round-done", round=1, timeout=TIMEOUT)
        for peer in survivors:
            peer.terminate()
            assert await peer.wait_exit() == 0, peer.describe()
        _check_round(peers, 0, [0, 1, 2, 3], vectors)
        _check_round(survivors, 1, [0, 1, 3], vectors)
        assert not victim.matching(event="irq", round=1)
        assert not any(p.matching(event="error") for p in survivors)


def test_the_synchronous_fixtures_run_real_peers(
    ivshmem_daemon_sync: Any, ivshmem_peers_sync: SyncPeerSpawner
) -> None:
    """A plain test: ping between two peers, then a SIGTERM'd peer says it stopped."""
    with ivshmem_daemon_sync(vectors=1) as daemon:
        first = ivshmem_peers_sync(daemon, "ping", ["--count", "300"])
        second = ivshmem_peers_sync(daemon, "ping", ["--count", "300"])
        assert {first.peer_id, second.peer_id} == {0, 1}
        server = first if first.peer_id == 0 else second
        summary = server.wait_finished()
        assert summary is not None and (found := PING_LINE.match(summary)), summary
        assert found.group(1) == "300"
        assert first.wait_exit() == second.wait_exit() == 0
        watcher = ivshmem_peers_sync(daemon, "monitor")
        daemon.wait_log(rf"peer {watcher.peer_id} joined")
        watcher.terminate()
        watcher.wait_event(event="stopped")
        assert watcher.wait_exit() == 0
        daemon.wait_log(rf"peer {watcher.peer_id} left")


# ---------------------------------------------------------------------------------------------
# Errors a user can make
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--plugin", "no-such-plugin"], 2, "unknown plugin 'no-such-plugin'"),
        (["--plugin", "ping", "--count", "many"], 2, "argument --count: invalid int value"),
        (["--plugin", "ping", "--no-such-option"], 2, "unrecognized arguments: --no-such-option"),
        (["--plugin", "ping", "--count", "0"], 2, "--count must be at least 1"),
        (["--wait", "0.5", "--plugin", "monitor"], 1, "no ivshmem server answered"),
        (
            ["--plugin", "monitor", "--wait", "0.5"],
            2,
            "--wait is an option of ivshmem-peer, not of the monitor plugin: put it before "
            "--plugin monitor",
        ),
        (["--plugin=ping", "--count", "many"], 2, "argument --count: invalid int value"),
    ],
    ids=[
        "unknown-plugin",
        "bad-option-value",
        "unknown-option",
        "rejected-option",
        "no-daemon",
        "misplaced-option",
        "plugin-equals",
    ],
)
async def test_peer_usage_errors_are_clear(
    tmp_path: Path, extra: list[str], status: int, message: str
) -> None:
    socket_path = str(tmp_path / "nobody-listens.sock")  # no daemon here
    done = await run_command([sys.executable, "-m", "peers", "-S", socket_path, *extra])
    err = done.stderr.decode()
    assert done.returncode == status, err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "peers", "--plugin", "pagetable", "--help"],
        ["-m", "peers", "--plugin=pagetable", "-h"],
        ["-m", "peers", "-h", "--plugin", "pagetable"],
        ["-m", "peers.launcher", "up", "--peers", "1", "--plugin", "pagetable", "--help"],
        ["-m", "peers.launcher", "up", "--help", "--plugin=pagetable"],
    ],
    ids=["peer", "peer-equals", "peer-help-first", "up", "up-help-first"],
)
async def test_help_shows_the_plugins_options(command: list[str]) -> None:
    """Issue 11, items 1 and 2: the plugin's options, wherever -h is, in both commands
    (pagetable's --size used to crash `up --help` as a conflicting option string)."""
    done = await run_command([sys.executable, *command])
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert "options of the pagetable plugin (after --plugin pagetable):" in out
    assert "--size SIZE" in out and "--backing" in out  # the plugin's
    assert "--vectors" in out  # and the command's own
    assert done.stderr == b""


async def test_every_command_says_its_version() -> None:
    from ivshmemd import __version__

    for command, name in (
        (["-m", "peers"], "ivshmem-peer"),
        (["-m", "ivshmemd.ctl"], "ivshmemctl"),
        (["-m", "ivshmemd"], "ivshmemd"),
    ):
        done = await run_command([sys.executable, *command, "--version"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode() == f"{name} {__version__}\n"


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spawn", [(), ("--no-fork-server",)], ids=["fork-server", "exec"])
async def test_launcher_two_peers_ping_ends_with_the_ping_line(spawn: tuple[str, ...]) -> None:
    async with launcher("--peers", "2", *spawn, "--plugin", "ping", "--count", "2000") as run:
        assert await run.wait() == 0, run.err
    assert any("fork server (pid" in line for line in run.err) == (not spawn), run.err
    assert re.fullmatch(r"all 2 peers running after \d+ ms", run.out[0]), run.out
    # issue 11, item 9: every summary once (the answering peer's too), none on stderr
    assert len(run.out) == 3, run.out
    served = [m for line in run.out if (m := PING_LINE.match(line))]
    assert len(served) == 1 and served[0].group(1) == "2000", run.out
    assert sum(line.startswith("ping: answered 2200 rings from peer ") for line in run.out) == 1
    assert not any("ping:" in line for line in run.err), run.err
    no_leftovers(run)


async def test_launcher_names_the_peer_that_failed() -> None:
    probe = ("--plugin", "doorbell-probe", "--expect", "3", "--fail-id", "1")
    async with launcher("--peers", "3", *probe) as run:
        assert await run.wait() == 1, run.err
    failed = [line for line in run.err if line.startswith("up: FAILED:")]
    assert len(failed) == 1, run.err
    assert re.fullmatch(
        r"up: FAILED: peer 1 \(pid \d+\), exit code 1: probe: peer 1 fails on purpose", failed[0]
    ), failed
    no_leftovers(run)  # the two healthy peers were stopped, not left running


async def test_launcher_reports_a_killed_peer() -> None:
    async with launcher("--peers", "2", "--plugin", "monitor") as run:
        await run.wait_line(run.out, r"^all 2 peers running")
        found = await run.wait_line(run.err, r"peer 1 running \(pid (\d+)\)")
        os.kill(int(found.group(1)), signal.SIGKILL)
        assert await run.wait() == 1, run.err
    assert any(
        re.fullmatch(rf"up: FAILED: peer 1 \(pid {found.group(1)}\), killed by SIGKILL: .*", x)
        for x in run.err
    ), run.err
    no_leftovers(run)


async def test_launcher_names_every_killed_peer() -> None:
    """Issue 8, point 17: with 2 of 6 peers SIGKILLed, both are named, not only the first."""
    async with launcher("--peers", "6", "--plugin", "monitor") as run:
        await run.wait_line(run.out, r"^all 6 peers running")
        victims = {}
        for peer_id in (2, 4):
            found = await run.wait_line(run.err, rf"peer {peer_id} running \(pid (\d+)\)")
            victims[peer_id] = int(found.group(1))
        for pid in victims.values():
            os.kill(pid, signal.SIGKILL)
        assert await run.wait() == 1, run.err
    failed = [line for line in run.err if line.startswith("up: FAILED:")]
    for peer_id, pid in victims.items():
        assert any(
            re.fullmatch(rf"up: FAILED: peer {peer_id} \(pid {pid}\), killed by SIGKILL: .*", x)
            for x in failed
        ), run.err
    assert len(failed) == 2, run.err  # the survivors were stopped, not failed
    no_leftovers(run)


async def test_launcher_stops_everything_on_sigint() -> None:
    async with launcher("--peers", "3", "--plugin", "monitor") as run:
        await run.wait_line(run.out, r"^all 3 peers running after \d+ ms$")
        run.process.send_signal(signal.SIGINT)
        assert await run.wait() == 130, run.err
    assert any("stopped by SIGINT" in line for line in run.err), run.err
    assert not any("FAILED" in line or "Traceback" in line for line in run.err), run.err
    no_leftovers(run)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--peers", "2", "--plugin", "no-such-plugin"), "unknown plugin 'no-such-plugin'"),
        (("--peers", "2", "--plugin", "ping", "--bogus"), "unrecognized arguments: --bogus"),
        (("--plugin", "ping"), "--peers N is required"),
    ],
    ids=["unknown-plugin", "bad-plugin-option", "no-peer-count"],
)
async def test_launcher_rejects_bad_usage_before_starting_anything(
    args: tuple[str, ...], message: str
) -> None:
    done = await run_command(launcher_argv(*args), env=launcher_env())
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert message in err and "Traceback" not in err
    assert "daemon" not in err  # nothing was started
    assert done.stdout == b""


def test_probe_circuit_rings_every_pair_once_in_a_chain() -> None:
    sys.path.insert(0, str(PLUGIN_DIR))
    try:
        from doorbell_probe import circuit
    finally:
        sys.path.remove(str(PLUGIN_DIR))
    edges = circuit([0, 1, 3, 7], 3)
    assert sorted(edges) == sorted(
        (s, t, v) for s in (0, 1, 3, 7) for t in (0, 1, 3, 7) if s != t for v in range(3)
    )
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    assert edges[0][0] == edges[-1][1] == 0
    assert json.dumps(circuit([5], 2)) == "[]"


async def test_a_killed_launcher_takes_its_peers_and_daemon_along() -> None:
    """SIGKILL gives the launcher no chance to clean up: its fork server notices the hang-up,
    stops the peers it forked, then the daemon it was asked to guard, and removes the files."""
    async with launcher("--peers", "2", "--plugin", "monitor") as run:
        await run.wait_line(run.out, r"^all 2 peers running")
        text = "\n".join(run.err)
        daemon = re.search(r"daemon \(pid (\d+)\) listening on (\S+) \(shm ([^,]+),", text)
        server = re.search(r"fork server \(pid (\d+)\)", text)
        peers = re.findall(r"running \(pid (\d+)\)", text)
        assert daemon and server and len(peers) == 2, run.err
        pids = [int(daemon.group(1)), int(server.group(1)), *map(int, peers)]
        pidfds = [os.pidfd_open(pid) for pid in pids]  # no pid reuse can fool these
        try:
            run.process.kill()
            assert await run.wait() == -signal.SIGKILL
            with trio.fail_after(TIMEOUT):
                for pidfd in pidfds:  # readable once that process has exited
                    await trio.lowlevel.wait_readable(pidfd)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
    socket_path = Path(daemon.group(2))
    assert not socket_path.parent.exists()
    assert not Path("/dev/shm", daemon.group(3)).exists()


# ---------------------------------------------------------------------------------------------
# The launcher's command line, as `ivshmemctl up` will see it (no processes)
# ---------------------------------------------------------------------------------------------


def _ctl_parser() -> Any:
    """An ``ivshmemctl``-shaped parser: top-level -S, then the ``up`` subcommand."""
    import argparse

    from peers.launcher import register_up_command

    parser = argparse.ArgumentParser(prog="ivshmemctl")
    parser.add_argument("-S", "--socket", default=None)
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_up_command(subparsers, argparse.ArgumentParser(add_help=False))
    return parser


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["up", "--peers", "2", "--plugin", "ping", "--count", "5"],
            {"peers": 2, "plugin": "ping", "plugin_args": ("--count", "5"), "socket": None},
        ),
        (  # --plugin=NAME, and a plugin option of the same name as a launcher option
            ["up", "--size", "8M", "--peers", "1", "--plugin=pagetable", "--size", "16M"],
            {"size": 8 << 20, "plugin": "pagetable", "plugin_args": ("--size", "16M")},
        ),
        (  # a `--` right after the plugin's name is accepted (all after it is the plugin's)
            ["up", "--peers", "2", "--plugin", "ping", "--", "--count", "7"],
            {"vectors": 1, "plugin_args": ("--count", "7")},
        ),
        (
            ["-S", "/run/x.sock", "up", "--peers", "1", "--keep", "--plugin", "monitor"],
            {"socket": "/run/x.sock", "keep": True, "fork_server": True},
        ),
        (
            ["up", "--peers", "1", "--no-fork-server", "--shm-name", "s", "--plugin", "monitor"],
            {"fork_server": False, "shm_name": "s", "plugin_args": ()},
        ),
        (
            ["up", "--timeout", "2.5", "--peers", "1", "-v", "--plugin", "monitor"],
            {"timeout": 2.5, "verbose": True},
        ),
    ],
)
def test_up_command_line(argv: list[str], expected: dict[str, Any]) -> None:
    config = _up_config(argv)
    assert config is not None
    (region,) = config.topology.regions
    (group,) = region.groups
    found = {
        "peers": group.count,
        "plugin": group.plugin,
        "plugin_args": group.args,
        "socket": region.socket,
        "size": region.size,
        "vectors": region.vectors,
        "shm_name": region.shm_name,
        "keep": config.keep,
        "fork_server": config.fork_server,
        "timeout": config.timeout,
        "verbose": config.verbose,
    }
    for key, value in expected.items():
        assert found[key] == value, (key, found)


def _up_config(argv: list[str]) -> Any:
    from peers.launcher import parse_up_argv

    args = _ctl_parser().parse_args(argv)
    return parse_up_argv(args.up_argv, args.socket)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (  # issue 11, item 2: never silently the daemon's
            ["up", "--peers", "1", "--plugin", "pagetable", "--size", "16M", "--peers", "2"],
            "--peers is an option of ivshmemctl up, not of the pagetable plugin: put it before "
            "--plugin pagetable",
        ),
        (
            ["up", "--peers", "2", "--plugin", "ping", "--vectors", "2"],
            "--vectors is an option of ivshmemctl up, not of the ping plugin: put it before "
            "--plugin ping",
        ),
        (
            ["up", "--peers", "3", "--plugin", "ping"],
            "ping pairs its peers: 3 peers of it would leave one waiting for a partner for "
            "ever; give an even --peers",
        ),
        (["up", "--peers", "2", "--plugin"], "--plugin needs a plugin name"),
        (["up", "--peers", "2", "--", "--plugin", "ping"], "'--' may only follow --plugin"),
        (["up", "-f", "t.toml", "--peers", "2"], "--peers cannot be combined with -f"),
        (["up", "--plug", "ping", "--peers", "2"], "unrecognized arguments: --plug ping"),
    ],
)
def test_up_refuses_options_in_the_wrong_place(argv: list[str], message: str) -> None:
    from peers.launcher import UsageError

    with pytest.raises(UsageError) as refused:
        _up_config(argv)
    assert str(refused.value) == message or message in str(refused.value), refused.value


def test_the_progress_line_is_redrawn_under_the_status_lines() -> None:
    import io

    from peers.launcher import Display

    out, err = io.StringIO(), io.StringIO()
    display = Display(out, err, live=True)
    display.status("up: 0/2 running")
    display.line("peer 0 running (pid 1)")
    display.status("up: 1/2 running")
    display.status("up: 1/2 running")  # unchanged: not redrawn
    display.result("all 2 peers running after 5 ms")
    display.close()
    assert out.getvalue() == "all 2 peers running after 5 ms\n"
    assert (
        err.getvalue()
        == (
            "up: 0/2 running"
            "\r\x1b[Kup: peer 0 running (pid 1)\nup: 0/2 running"
            "\r\x1b[Kup: 1/2 running"
            "\r\x1b[K" + "up: 1/2 running"  # cleared for the result line, then redrawn
            "\r\x1b[K"  # closed
        )
    )
    plain = io.StringIO()
    quiet = Display(io.StringIO(), plain, live=False)
    quiet.status("up: 0/2 running")
    quiet.line("peer 0 running (pid 1)")
    assert plain.getvalue() == "up: peer 0 running (pid 1)\n"


# ---------------------------------------------------------------------------------------------
# The fork server, spoken to directly
# ---------------------------------------------------------------------------------------------


async def test_fork_server_forks_peers_and_reports_their_exits(tmp_path: Path) -> None:
    from ivshmemd.supervise import Child, open_supervisor
    from peers.forkserver import ForkServer

    async with open_supervisor() as supervisor, trio.open_nursery() as nursery:
        server = await ForkServer.start(supervisor, ["monitor"], dict(os.environ))
        nursery.start_soon(server.run)
        with trio.fail_after(TIMEOUT):
            await server.ready.wait()
        assert not server.gone
        # A peer with no daemon to talk to: it says so on stderr and exits 1.
        socket_path = str(tmp_path / "nobody.sock")
        argv = ["-S", socket_path, "--wait", "0.2", "--plugin", "monitor"]
        pid, stdout, stderr = await server.spawn(argv)
        peer = supervisor.adopt(Child(argv), pid, stdout, stderr)
        server.register(peer)
        assert await peer.wait_exit(TIMEOUT) == 1
        assert list(peer.events) == []
        assert any(f"no ivshmem server answered on {socket_path}" in x for x in peer.log)
        assert not any("Traceback" in line for line in peer.log), peer.log
        await server.aclose()
        assert server.child.returncode == 0
        nursery.cancel_scope.cancel()
