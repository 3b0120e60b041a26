"""Upgrade in place (issue 14): SIGUSR2 re-executes the daemon with the same pid and every
peer, queue, fd and the control plane carried over; a failed upgrade leaves the old image
serving; an unknown state format is refused before the old image is gone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from ivshmemd import __version__
from ivshmemd.handover import (
    EXECUTABLE_ENV,
    FORMAT_VERSION,
    STATE_FD_ENV,
    HandoverError,
    decode,
    encode,
    to_memfd,
)
from ivshmemd.supervise import DaemonProcess
from peers.pytest_plugin import DaemonFactory, PeerSpawner
from tests.handover_tools import ctl, peer_table, read_greeting, ring_reaches, upgrade
from tests.rawclient import RawClient

#: upgrades in a row in the leak test: each starts two interpreters (the check, then the new
#: image), some 0.6 s on an idle machine, so the suite runs 30 (a third of a minute); the
#: benchmark runs any number with the same before/after figures:
#: ``python -m ivshmemd.bench handover --peers 3 --upgrades 100``
HANDOVERS = 30
PING_LINE = re.compile(r"^ping: (\d+) round trips, p50 [0-9.]+ us, p99 [0-9.]+ us$")


async def _join(daemon: DaemonProcess, vectors: int, others: list[RawClient]) -> RawClient:
    """A raw client that has read its whole greeting (and the others their notices)."""
    client = await RawClient.connect(daemon.socket_path)
    await client.read(3 + vectors * (len(others) + 1))
    for other in others:
        await other.read(vectors)
    return client


async def _control_process(daemon: DaemonProcess, count: int) -> str:
    """The control process line of the ``count``-th SIGUSR1 state dump."""
    daemon.process.send_signal(signal.SIGUSR1)
    line = (await daemon.wait_log("state: control plane process", count=count))[-1]
    return line.split("state: ", 1)[1]


async def test_upgrade_keeps_every_peer_queue_and_the_control_plane(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    vectors, rounds = 2, 150_000
    async with start_daemon(vectors=vectors) as daemon:
        a = await _join(daemon, vectors, [])
        b = await _join(daemon, vectors, [a])
        pingers = [await ivshmem_peers(daemon, "ping", ["--count", str(rounds)]) for _ in "xy"]
        for client in (a, b):
            await client.read(vectors * len(pingers))
        old_ids = [0, 1, *(p.peer_id for p in pingers)]
        control_before = await _control_process(daemon, 1)
        marks = (len(a.stream), len(b.stream))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.drain)  # an EOF fails the test
            nursery.start_soon(b.drain)
            await pingers[0].wait_event(event="progress")  # traffic is running
            before = peer_table(daemon.socket_path)
            await upgrade(daemon, 1)
            after = peer_table(daemon.socket_path)
            # the same rows (a pinger that finished meanwhile has left: its row goes)
            assert after == [row for row in before if row["id"] in {r["id"] for r in after}]
            assert [row["id"] for row in after][:2] == [0, 1]
            assert await _control_process(daemon, 2) == control_before  # adopted, not restarted
            newcomer = await RawClient.connect(daemon.socket_path)
            new_id = await read_greeting(newcomer, vectors)
            assert new_id == max(old_ids) + 1  # the allocator went on where it was
            listed = newcomer.view()  # every old peer still there (a pinger may have finished)
            assert set(listed) <= set(old_ids) and {0, 1} <= set(listed)
            assert set(listed.values()) == {vectors}
            for client in (a, b):
                await client.wait_for((new_id, True), count=vectors)
            for v in range(vectors):
                ring_reaches(newcomer, a, 0, v)  # the new eventfds reach the old peers
                ring_reaches(a, newcomer, new_id, v)
            summaries = [await p.wait_finished() for p in pingers]
            assert any(s and (m := PING_LINE.match(s)) and int(m[1]) == rounds for s in summaries)
            newcomer.close()
            for pinger in pingers:
                assert await pinger.wait_exit() == 0
            for client in (a, b):
                for gone in (new_id, *(p.peer_id for p in pingers)):
                    await client.wait_for((gone, False))
            nursery.cancel_scope.cancel()
        # nothing but the newcomer's join and the leaves reached the old peers: nothing was
        # announced again, nothing was lost
        pinger_ids = {p.peer_id for p in pingers}
        for client, mark in ((a, marks[0]), (b, marks[1])):
            since = client.stream[mark:]
            assert [m for m in since if m[0] not in pinger_ids] == [(new_id, True)] * vectors + [
                (new_id, False)
            ]
            assert sorted(m for m in since if m[0] in pinger_ids) == [
                (i, False) for i in sorted(pinger_ids)
            ]
        for pinger in pingers:
            assert not pinger.matching(event="peer-left", peer_id=0)
            joined = [e["peer_id"] for e in pinger.matching(event="peer-joined")]
            assert len(joined) == len(set(joined)), joined  # nobody announced twice
        a.close()
        b.close()


async def test_queued_messages_cross_the_upgrade_exactly_once(start_daemon: DaemonFactory) -> None:
    """A client that reads nothing has messages queued in the daemon (its socket is full);
    after the upgrade it reads every one of them, once, in order."""
    vectors, joiners = 16, 40
    async with start_daemon(vectors=vectors, args=["--send-timeout", "600"]) as daemon:
        slow = await RawClient.connect(daemon.socket_path)
        others: list[RawClient] = []
        for _ in range(joiners):
            client = await RawClient.connect(daemon.socket_path)
            client.close_fds_as_they_come = True
            await client.read(3 + vectors * (len(others) + 2))
            for other in others:
                await other.read(vectors)
            others.append(client)
        daemon.process.send_signal(signal.SIGUSR1)
        queued = await daemon.wait_log("state: queued messages per peer")
        assert "peer 0:" in queued[0], queued  # the slow one has a queue
        await upgrade(daemon, 1)
        slow.close_fds_as_they_come = True
        await slow.read(3 + vectors * (joiners + 1))
        assert slow.view() == {i: vectors for i in range(1, joiners + 1)}
        assert slow.stream[:3] == [(0, False), (0, False), (-1, True)]
        for client in [slow, *others]:
            client.close()


async def test_ivshmemctl_upgrade_upgrades_in_place(start_daemon: DaemonFactory) -> None:
    async with start_daemon(vectors=1) as daemon:
        client = await _join(daemon, 1, [])
        result = await trio.to_thread.run_sync(ctl, daemon.socket_path, "upgrade")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"upgraded in place (pid {daemon.pid}, 1 peers kept)\n"
        await daemon.wait_log("upgraded in place")
        status = json.loads(ctl(daemon.socket_path, "--json", "status").stdout)
        assert status["upgrades"] == {"running": False, "done": 1, "failed": 0,
                                      "last_error": None}  # fmt: skip
        other = await _join(daemon, 1, [client])
        ring_reaches(other, client, 0, 0)
        for each in (client, other):
            each.close()


def _failing_program(tmp_path: Path) -> str:
    script = tmp_path / "broken-ivshmemd"
    script.write_text("#!/bin/sh\necho 'ivshmemd: this build is broken' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


async def test_a_failed_upgrade_leaves_the_old_daemon_serving(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    env = {**os.environ, EXECUTABLE_ENV: _failing_program(tmp_path)}
    async with start_daemon(vectors=1, env=env) as daemon:
        first = await _join(daemon, 1, [])
        pid = daemon.pid
        daemon.process.send_signal(signal.SIGUSR2)
        line = (await daemon.wait_log("upgrade not done"))[0]
        assert "failed its check (exit status 1): ivshmemd: this build is broken" in line
        assert "still serving" in line
        second = await _join(daemon, 1, [first])
        assert daemon.pid == pid and daemon.process.returncode is None
        ring_reaches(second, first, 0, 0)
        # the same through the control plane: the command says why, and fails
        result = await trio.to_thread.run_sync(ctl, daemon.socket_path, "upgrade")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            "ivshmemctl: upgrade not done: the new ivshmemd failed its check (exit status 1): "
            "ivshmemd: this build is broken"
        ]
        assert daemon.count("upgrade not done") == 2 and daemon.pid == pid
        first.close()
        second.close()


async def test_a_missing_program_is_refused_too(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    env = {**os.environ, EXECUTABLE_ENV: str(tmp_path / "no-such-python")}
    async with start_daemon(vectors=1, env=env) as daemon:
        daemon.process.send_signal(signal.SIGUSR2)
        line = (await daemon.wait_log("upgrade not done"))[0]
        assert "cannot run the new ivshmemd" in line and "still serving" in line
        client = await _join(daemon, 1, [])
        client.close()


def test_an_unknown_state_format_is_refused_with_one_line() -> None:
    data = encode({"pid": 1, "version": "9.9"})
    future = data.replace(b"\xa6format" + bytes([FORMAT_VERSION]), b"\xa6format" + bytes([99]))
    assert future != data
    try:
        decode(future)
    except HandoverError as exc:
        assert str(exc) == (
            "the running ivshmemd (9.9) hands over its state in format 99; this ivshmemd "
            f"({__version__}) reads format {FORMAT_VERSION} only"
        )
    else:
        raise AssertionError("format 99 was accepted")
    fd = to_memfd(future)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ivshmemd", "--check-upgrade", "-S", "/nonexistent/s"],
            pass_fds=(fd,), env={**os.environ, STATE_FD_ENV: str(fd)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ivshmemd: the running ivshmemd (9.9) hands over its state in format 99; this "
        f"ivshmemd ({__version__}) reads format {FORMAT_VERSION} only"
    ]


async def test_upgrades_in_a_row_under_churn_leak_nothing(start_daemon: DaemonFactory) -> None:
    """Peers come and go between upgrades; after HANDOVERS upgrades the daemon holds as many fds
    as after the first, and its memory is back where it was."""
    async with start_daemon(vectors=1, args=["--no-control"]) as daemon:
        steady = [await _join(daemon, 1, [])]
        steady.append(await _join(daemon, 1, steady))
        baseline: tuple[int, int] | None = None
        for round_ in range(1, HANDOVERS + 1):
            visitor = await _join(daemon, 1, steady)
            await upgrade(daemon, round_)
            visitor.close()
            for client in steady:
                await client.read(1)  # its leave
            await daemon.wait_log(r"peer \d+ left", count=round_)  # its fds are closed
            if baseline is None:  # after a first whole cycle (lazily opened fds are open)
                baseline = daemon.fd_count(), daemon.rss()
        assert baseline is not None
        baseline_fds, baseline_rss = baseline
        assert daemon.fd_count() == baseline_fds
        assert daemon.rss() <= baseline_rss * 1.2, (daemon.rss(), baseline_rss)
        assert steady[0].view() == {1: 1} and steady[1].view() == {0: 1}
        for client in steady:
            client.close()


def _control_children(daemon: DaemonProcess) -> list[int]:
    """The daemon's control processes (its children running ``ivshmemd.control.process``)."""
    found = []
    for task in Path(f"/proc/{daemon.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"ivshmemd.control.process" in cmdline:
                found.append(int(child))
    return found


async def _stopped_before_its_handshake(daemon: DaemonProcess) -> int:
    """Kill the control process and stop the one started in its place before it has
    loaded libzmq (so before its handshake: it is not serving yet); its pid."""
    for _attempt in range(10):
        (old,) = _control_children(daemon)
        os.kill(old, signal.SIGKILL)
        with trio.fail_after(60):
            while not (new := [pid for pid in _control_children(daemon) if pid != old]):
                await trio.sleep(0.001)
        os.kill(new[0], signal.SIGSTOP)
        if b"libzmq" not in Path(f"/proc/{new[0]}/maps").read_bytes():
            return new[0]
        os.kill(new[0], signal.SIGCONT)  # too late: let it serve, and try again
        await daemon.wait_log(f"control plane process restarted \\(pid {new[0]}\\)")
    raise AssertionError("never caught a control process starting")


async def test_a_control_process_caught_starting_by_an_upgrade_is_reaped(
    start_daemon: DaemonFactory,
) -> None:
    """Its link closed with the old image: the new one reaps it (it is no zombie) and serves
    through a control process of its own."""
    async with start_daemon(vectors=1) as daemon:
        caught = await _stopped_before_its_handshake(daemon)
        await upgrade(daemon, 1)
        os.kill(caught, signal.SIGCONT)  # it reads EOF on its link and exits
        with trio.fail_after(60):
            while Path(f"/proc/{caught}").exists():  # a zombie would stay listed
                await trio.sleep(0.01)
        assert ctl(daemon.socket_path, "status").returncode == 0
        assert caught not in _control_children(daemon)
