"""Hostile clients, subscribers and operators against a real daemon (issue 8).

Each test plays an adversary the daemon must survive while it keeps serving the others: no
client, peer, subscriber or control client can terminate it, stall it, or make it hold
unbounded resources. Every test is bounded in time and cleans up whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from ivshmemd.cli import minimum_fds
from ivshmemd.control.schema import EVENTS_WELCOME, decode_event
from ivshmemd.control.server import EVENTS_SNDHWM
from ivshmemd.supervise import rss_bytes, unique_name
from tests.asuser import NOBODY, daemon_as, run_as
from tests.rawclient import RawClient

TIMEOUT = 30.0
CTL = [sys.executable, "-m", "ivshmemd.ctl"]


def control_process_pid(daemon_pid: int) -> int:
    """The daemon's control-plane process (its only child, started by any of its threads)."""
    children = [
        pid
        for task in Path(f"/proc/{daemon_pid}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    assert len(children) == 1, children
    return int(children[0])


async def ctl(*argv: str, timeout: float = 5.0) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CTL, "--timeout", str(timeout), *argv], capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip


async def fill_with_peers(daemon: Any, vectors: int) -> list[RawClient]:
    """Connect raw peers (each drained in the background by the caller's reads) until the
    daemon refuses one; returns the admitted ones, each having read its greeting."""
    clients: list[RawClient] = []
    while True:
        candidate = await RawClient.connect(daemon.socket_path)
        await trio.lowlevel.wait_readable(candidate.sock)
        if not candidate.sock.recv(8, socket.MSG_PEEK):
            candidate.close()
            return clients
        candidate.close_fds_as_they_come = True
        await candidate.read(3 + vectors * (len(clients) + 1))
        for other in clients:
            await other.read(vectors)
        clients.append(candidate)
        assert len(clients) < 200, "never ran out of fds"


# --- fds in flight (point 6) --------------------------------------------------------------------


async def test_clients_that_never_read_cannot_make_a_non_root_daemon_refuse_fd_passing(
    start_daemon: Any, world_dir: str
) -> None:
    """As nobody with nofile 1024 and 16 vectors: 12 clients that never read and never
    close pin what they were sent, yet a good peer and 20 newcomers are all served in full,
    and none of them is dropped."""
    vectors, hoarders_count, newcomers_count = 16, 12, 20
    wrapper = ["prlimit", "--nofile=1024", *daemon_as(NOBODY)]
    async with start_daemon(
        vectors=vectors, wrapper=wrapper, args=["--no-control", "--send-timeout", "3"],
        socket_path=f"{world_dir}/d.sock",
    ) as daemon:  # fmt: skip
        hoarders = []
        readers: list[RawClient] = []
        try:
            for _ in range(hoarders_count):
                hoarder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                hoarder.connect(daemon.socket_path)
                hoarders.append(hoarder)
            await daemon.wait_log(rf"peer {hoarders_count - 1} joined")
            async with trio.open_nursery() as nursery:
                for index in range(1 + newcomers_count):  # the good peer first
                    reader = await RawClient.connect(daemon.socket_path)
                    reader.close_fds_as_they_come = True
                    readers.append(reader)
                    nursery.start_soon(reader.drain)
                    peer_id = hoarders_count + index
                    # its whole greeting: every earlier peer's vectors, then its own
                    await reader.wait_for((peer_id, True), count=vectors, timeout=TIMEOUT)
                # everyone heard of the last newcomer, in full
                last = hoarders_count + newcomers_count
                for reader in readers:
                    await reader.wait_for((last, True), count=vectors, timeout=TIMEOUT)
                nursery.cancel_scope.cancel()
            for index in range(1 + newcomers_count):
                assert not daemon.count(rf"peer {hoarders_count + index} left"), daemon.log
        finally:
            for client in readers:
                client.close()
            for hoarder in hoarders:
                hoarder.close()


# --- fd exhaustion and the control plane (point 7) ---------------------------------------------


# (4 is below what the interpreter needs to start this editable install: its site hook
# runs before any of our code)
@pytest.mark.parametrize("nofile", [5, 12, 16, 20])
def test_too_few_fds_is_one_clear_line_at_start_up(nofile: int, tmp_path: Path) -> None:
    name = unique_name()
    result = subprocess.run(
        ["prlimit", f"--nofile={nofile}", sys.executable, "-m", "ivshmemd", "-F",
         "-S", str(tmp_path / "s.sock"), "-M", name, "-n", "4"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"needs at least {minimum_fds(4)}" in result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    assert not os.path.exists(f"/dev/shm/{name}") and not (tmp_path / "s.sock").exists()


async def test_no_number_of_peers_and_control_clients_aborts_the_daemon(
    start_daemon: Any,
) -> None:
    """A small fd table filled with peers until newcomers are refused, then 300 control
    clients at once, held open: the daemon lives, keeps serving its peers and admits a
    newcomer once one leaves; the control plane answers again afterwards."""
    vectors = 4
    nofile = minimum_fds(vectors) + 40
    async with start_daemon(vectors=vectors, wrapper=["prlimit", f"--nofile={nofile}"]) as daemon:
        peers = await fill_with_peers(daemon, vectors)
        assert len(peers) >= 2
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        flood = []
        try:
            for _ in range(300):
                sock = context.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"ipc://{daemon.socket_path}.ctl")
                sock.send(b"\x81\xa1v\x01")  # a request (a bad one: any answer will do)
                flood.append(sock)
            await trio.sleep(0)
            poller = zmq.Poller()
            for sock in flood:
                poller.register(sock, zmq.POLLIN)
            with trio.move_on_after(3):  # hold them all open a while: whatever answers
                while poller.poll(0) is not None and len(poller.poll(0)) < len(flood):
                    await trio.sleep(0.05)
            for sock in flood:
                sock.close(linger=0)
            flood.clear()
            assert daemon.process.returncode is None, daemon.log[-10:]
            # peers are still served: one leaves, the others are told, a newcomer gets in
            leaver = peers.pop()
            leaver_id = leaver.stream[1][0]
            leaver.close()
            for peer in peers:
                assert await peer.read(1) == [(leaver_id, False)]
            newcomer = await RawClient.connect(daemon.socket_path)
            newcomer.close_fds_as_they_come = True
            peers.append(newcomer)
            await newcomer.read(3 + vectors * len(peers))
            # and the control plane answers again (restarted if the flood killed it)
            with trio.fail_after(TIMEOUT):  # each attempt waits up to a second for an answer
                while (await ctl("-S", daemon.socket_path, "status", timeout=1)).returncode:
                    pass
            assert daemon.process.returncode is None
        finally:
            for sock in flood:
                sock.close(linger=0)
            context.term()
            for peer in peers:
                peer.close()


async def test_a_control_process_that_dies_is_restarted_and_peers_never_notice(
    start_daemon: Any,
) -> None:
    async with start_daemon(vectors=1) as daemon:
        first = await RawClient.connect(daemon.socket_path)
        try:
            await first.read(4)
            before = control_process_pid(daemon.pid)
            os.kill(before, signal.SIGABRT)  # what libzmq does to its process on EMFILE
            line = (await daemon.wait_log("control plane process stopped"))[0]
            assert "SIGABRT" in line
            await daemon.wait_log("control plane process restarted")
            assert control_process_pid(daemon.pid) != before
            status = await ctl("-S", daemon.socket_path, "--json", "status")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["peers"] == 1
            second = await RawClient.connect(daemon.socket_path)
            try:
                await second.read(5)
                assert await first.read(1) == [(1, True)]
            finally:
                second.close()
            assert daemon.count("left") == 0
        finally:
            first.close()


# --- the events socket (point 8) ---------------------------------------------------------------


def subscribe_flood(endpoint: str, topics: int, wait_ms: int) -> int:
    """(In a child running as another uid.) Subscribe to many topics and report, as JSON,
    whether anything (the welcome) ever arrived."""
    sub = zmq.Context().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for index in range(topics):
        sub.setsockopt(zmq.SUBSCRIBE, b"t%d" % index)
    sub.connect(endpoint)
    print(json.dumps({"received": bool(sub.poll(wait_ms))}))
    return 0


async def test_the_events_socket_applies_the_allow_lists(start_daemon: Any, world_dir: str) -> None:
    """nobody may open the socket files (0666) but is not on --allow-uid: its subscription
    flood is turned away at the handshake, nothing reaches it, and the control process
    holds nothing for it."""
    args = ["--socket-mode", "0666", "--allow-uid", "0"]
    async with start_daemon(vectors=1, args=args, socket_path=f"{world_dir}/d.sock") as daemon:
        helper = control_process_pid(daemon.pid)
        rss_before = rss_bytes(helper)
        endpoint = f"ipc://{daemon.socket_path}.events"
        status, output = await trio.to_thread.run_sync(
            lambda: run_as(NOBODY, subscribe_flood, endpoint, 20_000, 1000)
        )
        assert status == 0, output
        assert json.loads(output.splitlines()[-1]) == {"received": False}
        assert "not allowed" in (await daemon.wait_log("control plane: refused"))[0]
        assert rss_bytes(helper) < rss_before + (16 << 20)
        # root, on the list, is served
        watch = await ctl("-S", daemon.socket_path, "status")
        assert watch.returncode == 0, watch.stderr


async def test_subscribers_topics_and_a_stalled_subscriber_are_bounded(
    start_daemon: Any,
) -> None:
    async with start_daemon(vectors=0) as daemon:
        endpoint = f"ipc://{daemon.socket_path}.events"
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        subscribers: list[zmq.Socket[bytes]] = []
        try:
            # subscribers are capped: connect until one gets no welcome
            while True:
                sub = context.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(endpoint)
                subscribers.append(sub)
                if not sub.poll(2000):
                    break
                assert sub.recv_multipart() == [EVENTS_WELCOME]
                assert len(subscribers) <= 64, "subscribers are not capped"
            assert "too many events connections" in (await daemon.wait_log("refused"))[0]
            for sub in subscribers:
                sub.close(linger=0)
            subscribers.clear()
            # a topic that can never match is never applied (nothing is stored for it);
            # a subscriber that stops reading loses events beyond its bound and sees the gap
            stalled = stalled_subscriber(context)
            subscribers.append(stalled)
            with trio.fail_after(TIMEOUT):
                # (the closed ones must be counted out first: a refused subscriber is
                # turned away for good, so a new one is tried until one is let in)
                while not await wait_welcome(stalled, endpoint, 0.5):
                    stalled.close(linger=0)
                    stalled = stalled_subscriber(context)
                    subscribers.append(stalled)
            # a subscriber that keeps up (its receive queue unbounded) tells when the
            # control process has published the last event: the daemon's log comes first
            with trio.fail_after(TIMEOUT):
                while True:
                    healthy = context.socket(zmq.SUB)
                    subscribers.append(healthy)
                    healthy.setsockopt(zmq.LINGER, 0)
                    healthy.setsockopt(zmq.RCVHWM, 0)
                    healthy.setsockopt(zmq.SUBSCRIBE, b"")
                    if await wait_welcome(healthy, endpoint, 0.5):
                        break
                    healthy.close(linger=0)
            cycles = EVENTS_SNDHWM  # twice as many events as it may queue
            for done in range(0, cycles, 500):  # batches within the listen backlog
                for _ in range(500):
                    await connect_and_close(daemon.socket_path)
                await daemon.wait_log(rf"peer {done + 499} left")
            with trio.fail_after(TIMEOUT):
                last = 0
                while last < 2 * cycles:
                    if healthy.poll(0):
                        frames = healthy.recv_multipart()
                        if frames != [EVENTS_WELCOME]:
                            last = decode_event(frames).seq
                    else:
                        await trio.sleep(0.01)
            seqs = []
            while stalled.poll(500):
                frames = stalled.recv_multipart()
                if frames != [EVENTS_WELCOME]:
                    seqs.append(decode_event(frames).seq)
            assert 0 < len(seqs) < 2 * cycles  # bounded: the rest were dropped for it
            assert seqs == sorted(set(seqs))
            # reading again, it gets the next event, and the gap says what it lost
            await connect_and_close(daemon.socket_path)
            with trio.fail_after(TIMEOUT):
                while not stalled.poll(0):
                    await trio.sleep(0.01)
            assert decode_event(stalled.recv_multipart()).seq == 2 * cycles + 1
        finally:
            for sub in subscribers:
                sub.close(linger=0)
            context.term()


async def connect_and_close(path: str, data: bytes = b"") -> None:
    """Connect, optionally write, close (with trio: the test's loop keeps reading logs).
    Callers keep what is in flight within the listen backlog (a unix socket's connect
    fails at once, EAGAIN, when it is full)."""
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM) as sock:
        await sock.connect(path)
        if data:
            await sock.send(data)


def stalled_subscriber(context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    """A subscriber that will not read: tiny queues, and a topic that can never match."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.SUBSCRIBE, b"no-such-topic")
    return sub


async def wait_welcome(sub: zmq.Socket[bytes], endpoint: str, timeout: float) -> bool:
    """Connect; True once the welcome arrived, False if none came within ``timeout``."""
    sub.connect(endpoint)
    with trio.move_on_after(timeout):
        while not sub.poll(0):
            await trio.sleep(0.01)
        assert sub.recv_multipart() == [EVENTS_WELCOME]
        return True
    return False


# --- hostile peers and control clients, all at once --------------------------------------------


async def test_garbage_everywhere_and_the_daemon_keeps_serving(start_daemon: Any) -> None:
    """Peers that write, vanish at once, or send half a line; control clients that speak
    no zmq, send huge or malformed frames, never read replies: all at once. A well-behaved
    peer still joins and is told of the others, and ivshmemctl still answers."""
    async with start_daemon(vectors=2) as daemon:
        good = await RawClient.connect(daemon.socket_path)
        try:
            await good.read(5)
            start = time.monotonic()
            for round_ in range(50):
                writer = await RawClient.connect(daemon.socket_path)
                try:  # served, then it writes (clients must not): dropped at once
                    await writer.read(3 + 2 * 2)
                    writer.sock.send(b"GET / HTTP/1.0\r\n")
                    await writer.read_eof()  # (join notices of others may come first)
                finally:
                    writer.close()
                await connect_and_close(daemon.socket_path)
                for suffix in (".ctl", ".events"):
                    junk = b"\xff" * 64 + bytes([round_]) * 10
                    await connect_and_close(daemon.socket_path + suffix, junk)
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            try:
                for payload in ([b"", b"\xc1"], [b"", b"x" * (2 << 20)], [b"", b"a", b"b"]):
                    dealer = context.socket(zmq.DEALER)
                    dealer.setsockopt(zmq.LINGER, 0)
                    dealer.connect(f"ipc://{daemon.socket_path}.ctl")
                    for _ in range(100):  # and never read the replies
                        dealer.send_multipart(payload)
                    dealer.close(linger=0)
            finally:
                context.term()
            # a newcomer is served; the good peer, reading only now, hears of it, and its
            # whole stream (joins and leaves of the 100 others, coalesced where it was
            # behind) leaves it knowing exactly the newcomer
            await daemon.wait_log(r"peer 100 left")
            newcomer = await RawClient.connect(daemon.socket_path)
            try:
                head = await newcomer.read(3 + 2 * 2)
                assert head[:3] == [(0, False), (101, False), (-1, True)]
                await good.read_until((101, True), count=2)
                assert good.view() == {101: 2}
            finally:
                newcomer.close()
            status = await ctl("-S", daemon.socket_path, "--json", "stats")
            assert status.returncode == 0, status.stderr
            stats = json.loads(status.stdout)
            assert stats["protocol_violations"] == 50
            assert daemon.process.returncode is None
            assert time.monotonic() - start < TIMEOUT
        finally:
            good.close()
