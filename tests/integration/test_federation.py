"""Federated daemons as users run them: real ``ivshmemd`` processes (each with its
federation process), our peers, raw clients and a real QEMU VM (issue 12).

Every daemon is its own "host" (its own shm); they federate over ipc (or TCP loopback
through a proxy that can capture, cut and heal the link). Tests synchronise on what the
daemons log and what clients receive, never on sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from ivshmemd.federation.keys import keygen
from ivshmemd.federation.schema import Hello, encode_frame
from ivshmemd.supervise import Child, DaemonProcess, daemon_process, open_supervisor
from ivshmemd.supervise.daemon import DEFAULT_SIZE
from ivshmemd.supervise.fabric import (
    MEMBER_UP,
    fabric_process,
    federation_args,
    federation_endpoints,
    federation_pid,
    host_id_ranges,
)
from peers.harness import PeerProcess
from peers.pytest_plugin import FabricFactory, PeerSpawner
from peers.qtest import QEMU_BINARY, QemuIvshmemVm, qemu_available
from tests.ivshmemd.federation.proxy import TcpProxy
from tests.rawclient import RawClient

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
WAIT = 30.0
CTL = [sys.executable, "-m", "ivshmemd.ctl"]


def first_ids(hosts: int) -> list[int]:
    return [lo for lo, _hi in host_id_ranges(hosts)]


async def joined(client: RawClient, peer_id: int, vectors: int = 1) -> None:
    """Wait until ``client`` has been told of ``peer_id`` (all its vectors)."""
    await client.wait_for((peer_id, True), vectors)


async def sees(client: RawClient, expected: dict[int, int]) -> None:
    """Wait until ``client``'s view of the peers (id -> vectors) is ``expected`` (a view
    may pass through other states on the way: a leave, then a join again)."""
    with trio.move_on_after(WAIT):
        while client.view() != expected:
            await client.lot.park()
        return
    raise AssertionError(f"the client sees {client.view()}, not {expected}: {client.stream}")


def ring(client: RawClient, peer_id: int, vector: int = 0, count: int = 1) -> None:
    """``client`` rings ``peer_id`` through the eventfds of its latest announcement (a
    rejoin hands out new ones)."""
    fds = client.vector_fds(peer_id)
    assert fds, f"client was never told of peer {peer_id}"
    os.eventfd_write(fds[-1:][vector], count)  # one vector per peer in these tests


async def rung(client: RawClient, vector: int = 0) -> int:
    """Wait for a ring on ``client``'s own eventfd ``vector``; the count read. (Our own
    eventfds come last in the handshake: wait for them too, the drain task receives them.)"""
    with trio.fail_after(WAIT):
        while len(own := client.vector_fds(client.stream[1][0])) <= vector:
            await client.lot.park()
        fd = own[vector]
        while True:
            try:
                return os.eventfd_read(fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)


@asynccontextmanager
async def clients(*paths: str) -> AsyncIterator[list[RawClient]]:
    """One raw client per socket, each draining what its daemon sends (in a task)."""
    made: list[RawClient] = []
    try:
        async with trio.open_nursery() as nursery:
            for path in paths:
                client = await RawClient.connect(path)
                await client.read(3)
                made.append(client)
                nursery.start_soon(client.drain)
            yield made
            nursery.cancel_scope.cancel()
    finally:
        for client in made:
            client.close()


async def test_three_hosts_ping_between_every_pair_and_monitor_sees_remote_peers(
    ivshmem_fabric: FabricFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with ivshmem_fabric(3, timeout=2) as daemons:
        a, b, c = first_ids(3)
        monitor = await ivshmem_peers(daemons[0], "monitor")
        assert monitor.peer_id == a
        # pairs (host0, host1), (host0, host2), (host1, host2), each peer with a partner
        plan = [
            (0, b), (0, c + 0), (1, a + 1), (1, c + 1), (2, a + 2), (2, b + 1),
        ]  # fmt: skip
        expected_ids = [a + 1, a + 2, b, b + 1, c, c + 1]
        peers = []
        for (host, partner), expected in zip(plan, expected_ids, strict=True):
            peer = await ivshmem_peers(
                daemons[host], "ping", ["--partner", str(partner), "--count", "50",
                                        "--warmup", "5"],
            )  # fmt: skip
            assert peer.peer_id == expected
            peers.append(peer)
        summaries = [await peer.wait_finished() for peer in peers]
        served = [s for s in summaries if s is not None and "round trips" in s]
        assert len(served) == 3, summaries
        for peer in peers:
            assert await peer.wait_exit() == 0
        # the monitor on host 0 saw host 1's and host 2's peers come and go
        for remote in (b, b + 1, c, c + 1):
            await monitor.wait_event(event="monitor", text=f"peer {remote} joined")
            await monitor.wait_event(event="monitor", text=f"peer {remote} left")


async def test_kill_9_of_a_daemon_its_peers_leave_and_rejoin_after_a_restart(
    tmp_path: Path,
) -> None:
    endpoints = federation_endpoints(tmp_path, 2)
    a_args = [*federation_args(endpoints, 0, timeout=1), "-v"]
    b_args = federation_args(endpoints, 1, timeout=1)
    b_socket = str(tmp_path / "b.sock")
    b_first = host_id_ranges(2)[1][0]
    async with daemon_process(tmp_path, args=a_args) as a:
        async with daemon_process(tmp_path, args=b_args, socket_path=b_socket) as b:
            await a.wait_log(MEMBER_UP)
            on_b = await RawClient.connect(b.socket_path)  # a peer on B (that B's death ends)
            async with clients(a.socket_path) as (on_a,):
                await on_b.read(3)
                await joined(on_a, b_first)
                b.send_signal(signal.SIGKILL)
                # its federation process says bye as its link closes, or it goes silent:
                # either way host A's client hears that B's peer left, and keeps its socket
                await on_a.wait_for((b_first, False))
                await b.wait_exit()
            on_b.close()
            b.remove_leftovers()
        async with daemon_process(tmp_path, args=b_args, socket_path=b_socket) as b2:
            await a.wait_log(MEMBER_UP, 2)
            async with clients(a.socket_path, b2.socket_path) as (on_a, on_b):
                await joined(on_a, b_first)
                await joined(on_b, first_ids(2)[0] + 1)
                ring(on_a, b_first)
                assert await rung(on_b) == 1


async def test_federation_process_killed_is_restarted_and_local_peers_only_see_notices(
    tmp_path: Path,
) -> None:
    async with fabric_process(tmp_path, 2, timeout=1) as (a, b):
        first_a, first_b = first_ids(2)
        async with clients(a.socket_path, b.socket_path) as (on_a, on_b):
            await joined(on_a, first_b)
            await joined(on_b, first_a)
            os.kill(federation_pid(a.pid), signal.SIGKILL)
            await a.wait_log(r"federation process stopped \(killed by SIGKILL\)")
            await a.wait_log(r"federation process restarted")
            # both sides hear of the other host's peer leaving and joining again, and
            # nothing else: no EOF, the same ids
            await on_a.wait_for((first_b, False))
            await on_b.wait_for((first_a, False))
            await joined(on_a, first_b, 2)
            await joined(on_b, first_a, 2)
            await sees(on_a, {first_b: 1})
            await sees(on_b, {first_a: 1})
            ring(on_a, first_b, count=3)
            assert await rung(on_b) == 3
            ring(on_b, first_a, count=2)
            assert await rung(on_a) == 2


async def ctl(daemon: DaemonProcess, *argv: str) -> str:
    """What ``ivshmemctl -S SOCK ARGV...`` prints (it must succeed)."""
    done = await trio.run_process(
        [*CTL, "-S", daemon.socket_path, *argv], capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert not done.stderr, done.stderr.decode()
    return str(done.stdout.decode())


async def federation_status(
    daemon: DaemonProcess, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """``status --json``'s federation, asked again until ``until`` holds (the daemon's
    copy is refreshed by its federation process every half second)."""
    with trio.fail_after(WAIT):
        while True:
            status: dict[str, Any] = json.loads(await ctl(daemon, "status", "--json"))
            if until(status["federation"]):
                return status["federation"]


def member_row(federation: dict[str, Any], identity: str) -> dict[str, Any] | None:
    rows = [m for m in federation["members"] if m["member"] == identity]
    return rows[0] if rows else None


async def test_ivshmemctl_shows_members_marks_remote_peers_and_watch_reports_members(
    tmp_path: Path,
) -> None:
    endpoints = federation_endpoints(tmp_path, 2)
    a_args = federation_args(endpoints, 0, timeout=1)
    b_args = federation_args(endpoints, 1, timeout=1)
    b_first = host_id_ranges(2)[1][0]
    async with daemon_process(tmp_path, args=a_args) as a, open_supervisor() as supervisor:
        watches = []
        for form in ([], ["--json"]):
            watch = await supervisor.start(
                Child([*CTL, "-S", a.socket_path, "watch", *form, "--count", "4"]), events=True
            )
            await watch.wait_log("^watching events on")
            watches.append(watch)
        human, machine = watches
        async with daemon_process(tmp_path, args=b_args, socket_path=str(tmp_path / "b.sock")) as b:
            on_b = await RawClient.connect(b.socket_path)
            try:
                await on_b.read(3)
                joined_event = await machine.wait_event(event="peer-joined")
                assert joined_event["peer_id"] == b_first
                assert joined_event["member"] == endpoints[1]
                # peers: B's peer, marked with its member, in both forms
                (peer,) = json.loads(await ctl(a, "peers", "--json"))
                assert (peer["id"], peer["member"], peer["vectors"]) == (b_first, endpoints[1], 1)
                table = (await ctl(a, "peers")).splitlines()
                assert table[0].split()[:3] == ["ID", "MEMBER", "VECTORS"]
                assert table[1].split()[:3] == [str(b_first), endpoints[1], "1"]
                # status: the member, up, heard from, with a round-trip time
                federation = await federation_status(
                    a, lambda f: (m := member_row(f, endpoints[1])) is not None
                    and m["rtt"] is not None,
                )  # fmt: skip
                row = member_row(federation, endpoints[1])
                assert row is not None
                assert (row["endpoint"], row["id_range"], row["state"]) == (
                    endpoints[1], list(host_id_ranges(2)[1]), "up"
                )  # fmt: skip
                assert isinstance(row["last_heard"], float) and row["rtt"] > 0
                assert federation["remote_peers"] == 1
                text = await ctl(a, "status")
                assert "federation: " + endpoints[0] in text
                (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(endpoints[1])]
                cells = line.split()
                assert cells[1:4] == [endpoints[1], "{}-{}".format(*host_id_ranges(2)[1]), "up"]
                assert "ago" in line and ("us" in cells or "ms" in cells)
            finally:
                on_b.close()
            b.send_signal(signal.SIGKILL)
            await b.wait_exit()
            b.remove_leftovers()
        # the event stream: B joined, its peer joined, left, and B left
        assert await machine.wait_exit() == 0, machine.describe()
        kinds = [(e["event"], e.get("member"), e.get("peer_id")) for e in machine.events]
        assert kinds[:2] == [("member-joined", endpoints[1], None), ("peer-joined", endpoints[1],
                                                                     b_first)]  # fmt: skip
        assert sorted(kinds[2:]) == [("member-left", endpoints[1], None),
                                     ("peer-left", endpoints[1], b_first)]  # fmt: skip
        member_joined = machine.events[0]
        assert member_joined["endpoint"] == endpoints[1]
        assert member_joined["id_range"] == list(host_id_ranges(2)[1])
        left = next(e for e in machine.events if e["event"] == "member-left")
        assert left["reason"]
        assert await human.wait_exit() == 0, human.describe()
        lines = [e["text"] for e in human.events]
        assert f"member-joined member {endpoints[1]} ({endpoints[1]}, ids " in lines[0]
        assert f"peer-joined peer {b_first} (1 vector, member {endpoints[1]})" in lines[1]


async def caught_starting(daemon: DaemonProcess, old: int) -> int:
    """The pid of ``daemon``'s new federation process, stopped (SIGSTOP) as soon as it is
    there: long before it can be ready (its interpreter has yet to import trio and zmq)."""
    await daemon.wait_log(r"federation process stopped .*; restarting in")
    with trio.fail_after(WAIT):
        while True:
            try:
                pid = federation_pid(daemon.pid)
            except LookupError:
                pid = old
            if pid != old:
                os.kill(pid, signal.SIGSTOP)
                return pid
            await trio.sleep(0.001)  # a process appearing tells nobody: look again


async def test_a_peer_that_joins_while_the_federation_process_starts_is_announced(
    tmp_path: Path,
) -> None:
    async with fabric_process(tmp_path, 2, timeout=1) as (a, b):
        first_a = first_ids(2)[0]
        async with clients(b.socket_path) as (on_b,):
            os.kill(old := federation_pid(a.pid), signal.SIGKILL)
            starting = await caught_starting(a, old)
            try:
                async with clients(a.socket_path) as (on_a,):  # its handshake is done
                    assert not a.log_matching("federation process restarted")
                    os.kill(starting, signal.SIGCONT)
                    await a.wait_log("federation process restarted")
                    await joined(on_b, first_a)
                    ring(on_b, first_a, count=4)
                    assert await rung(on_a) == 4
            finally:
                os.kill(starting, signal.SIGCONT)


@pytest.mark.parametrize(
    ("b_settings", "reason"),
    [
        ({"size": "2M"}, r"shm size differs: .* has 2097152 bytes, .* has 1048576 bytes"),
        ({"vectors": 2}, r"vector count differs: .* has 2, .* has 1"),
        ({"ids": "500-1500"}, r"peer id ranges overlap: .* has 500-1500, .* has 0-999"),
    ],
)
async def test_a_mismatch_is_refused_on_both_sides_with_both_values(
    tmp_path: Path, b_settings: dict[str, Any], reason: str
) -> None:
    a_end, b_end = (f"ipc://{tmp_path}/{name}.fed" for name in "ab")
    a_args = ["--peer-ids", "0-999", "--federation-listen", a_end]
    b_args = ["--peer-ids", b_settings.get("ids", "1000-1999"), "--federation-listen", b_end,
              "--federation-peer", a_end]  # fmt: skip
    async with daemon_process(tmp_path, args=a_args) as a, daemon_process(
        tmp_path, args=b_args, vectors=b_settings.get("vectors", 1),
        size=b_settings.get("size", "1M"),
    ) as b:  # fmt: skip
        await a.wait_log(f"refused member {b_end} at {b_end}: {reason}")
        await b.wait_log(f"member {a_end} refused us: {reason}")
        # ivshmemctl status shows the refusal, naming both values, on both sides
        on_a = await federation_status(a, lambda f: member_row(f, b_end) is not None)
        refused = member_row(on_a, b_end)
        assert refused is not None and refused["state"] == "refused"
        assert re.fullmatch(reason, refused["reason"])
        on_b = await federation_status(b, lambda f: a_end in f.get("refused_by", {}))
        assert re.fullmatch(reason, on_b["refused_by"][a_end])
        text = await ctl(b, "status")
        assert re.search(f"refused by {a_end}: {reason}", text), text
        # and neither serves the other's peers
        async with clients(a.socket_path) as (on_a,):
            assert on_a.view() == {}


async def test_bad_frames_from_a_member_drop_it_and_the_daemon_keeps_serving(
    tmp_path: Path,
) -> None:
    a_end = f"ipc://{tmp_path}/a.fed"
    fake_end = f"ipc://{tmp_path}/fake.fed"
    bad_frames: Sequence[tuple[str, bytes]] = [
        ("not msgpack", b"\xc1\xc1\xc1"),
        ("wrong types", b"\x96\x01\x09\x01\xa3abc\x00\x01"),
        ("unknown version", b"\x93\x63\x09\x01"),
        ("huge", b"\x91" + b"\xc0" * (256 * 1024)),
    ]
    context = zmq.Context()
    try:
        router = context.socket(zmq.ROUTER)  # where A dials the fake member back
        router.linger = 0
        router.bind(fake_end)
        async with daemon_process(tmp_path, args=["--peer-ids", "0-999",
                                                  "--federation-listen", a_end]) as a:  # fmt: skip
            for index, (what, raw) in enumerate(bad_frames):
                dealer = context.socket(zmq.DEALER)
                dealer.linger = 0
                dealer.routing_id = f"M-fake-{index}".encode()
                dealer.connect(a_end)
                hello = Hello("fake", f"incarnation-{index}", fake_end, (5000, 5999),
                              1 << 20, 1, 1, 0, 0, 0)  # fmt: skip
                dealer.send(encode_frame(hello, 0))
                await a.wait_log(r"member fake at .* is up", index + 1)
                dealer.send(raw)
                await a.wait_log(r"dropping member fake at .*: bad frame", index + 1)
                dealer.close()
                # the daemon still serves its peers
                async with clients(a.socket_path) as (client,):
                    assert client.stream[0] == (0, False), what
            assert a.alive
    finally:
        context.destroy(linger=0)


pytestmark_qemu = pytest.mark.skipif(
    not qemu_available(), reason=f"{QEMU_BINARY} is not on PATH (install qemu-system-x86)"
)


async def qemu_rings_until_finished(vm: QemuIvshmemVm, peer: PeerProcess) -> dict[str, Any]:
    """QEMU rings ``peer``'s vector 0 until the peer reports it finished (QEMU learns of a
    peer asynchronously and drops doorbells to peers it does not know yet); that event."""
    assert peer.peer_id is not None
    for _attempt in range(100):
        await trio.to_thread.run_sync(vm.ring, peer.peer_id, 0)
        with trio.move_on_after(0.2):
            return await peer.wait_event(event="finished")
    raise AssertionError(f"our peer never got QEMU's doorbell: {peer.events}")


@pytestmark_qemu
async def test_a_qemu_vm_on_one_host_and_our_peer_on_another_ring_each_other(
    tmp_path: Path, ivshmem_peers: PeerSpawner
) -> None:
    async with fabric_process(tmp_path, 2, vectors=2, size="1M") as (a, b):
        qemu_id, peer_id = first_ids(2)
        vm = await trio.to_thread.run_sync(lambda: QemuIvshmemVm.doorbell(a.socket_path, vectors=2))
        try:
            assert await trio.to_thread.run_sync(vm.iv_position) == qemu_id
            peer = await ivshmem_peers(
                b, "mailbox", ["--to", str(qemu_id), "--vector", "1", "--reply-len", "0"],
                pythonpath=[PLUGIN_DIR],
            )  # fmt: skip
            assert peer.peer_id == peer_id
            await peer.wait_event(event="mailbox-rang", to=qemu_id, vector=1)
            # our ring crossed to host A and reached QEMU's vector 1 (and only it)
            await trio.to_thread.run_sync(vm.wait_msix_pending, 1)
            assert not await trio.to_thread.run_sync(vm.msix_pending, 0)
            # QEMU rings our peer on host B
            done = await qemu_rings_until_finished(vm, peer)
            assert done["ok"] and done["summary"] == "mailbox: vector 0: "
        finally:
            await trio.to_thread.run_sync(vm.close)


@asynccontextmanager
async def proxied_host(
    tmp_path: Path,
    nursery: trio.Nursery,
    name: str,
    ids: str,
    options: Sequence[str],
    *,
    proxy: TcpProxy | None = None,
    size: str = DEFAULT_SIZE,
) -> AsyncIterator[tuple[DaemonProcess, TcpProxy]]:
    """A daemon (``size`` bytes of shm) listening on TCP loopback behind a :class:`TcpProxy`
    it advertises (``proxy``, or a new one): every frame sent to it passes the proxy
    (captured; the link can be cut and healed)."""
    proxy = proxy or TcpProxy()
    await nursery.start(proxy.run)
    args = ["--peer-ids", ids, "--federation-listen", "tcp://127.0.0.1:0",
            "--federation-advertise", proxy.endpoint, *options]  # fmt: skip
    socket_path = str(tmp_path / f"{name}.sock")
    async with daemon_process(tmp_path, args=args, socket_path=socket_path, size=size) as d:
        (line,) = await d.wait_log(r"federation: .* listening on tcp://127\.0\.0\.1:\d+")
        proxy.target = int(line.rsplit(":", 1)[1].split()[0])
        yield d, proxy


def curve_options(tmp_path: Path, name: str, allowed: Sequence[str]) -> list[str]:
    """Keys for ``name`` (made with the library ``ivshmemctl keygen`` runs) and an allow
    directory holding the public keys of ``allowed``."""
    keys, allow = tmp_path / "keys", tmp_path / f"allow-{name}"
    allow.mkdir()
    for who in {name, *allowed}:
        if not (keys / f"{who}.key").exists():
            keygen(keys, who)
    for who in allowed:
        (allow / f"{who}.key").write_bytes((keys / f"{who}.key").read_bytes())
    return ["--federation-key", str(keys / f"{name}.key_secret"), "--federation-allow", str(allow)]


@asynccontextmanager
async def two_proxied_hosts(
    tmp_path: Path, a_options: Sequence[str], b_options: Sequence[str]
) -> AsyncIterator[tuple[DaemonProcess, TcpProxy, DaemonProcess, TcpProxy]]:
    """Hosts A (ids 0-999) and B (1000-1999, told of A), each behind its proxy, once A has B
    as a member."""
    async with trio.open_nursery() as nursery:
        async with proxied_host(tmp_path, nursery, "a", "0-999", a_options) as (a, pa):
            b_args = [*b_options, "--federation-peer", pa.endpoint]
            async with proxied_host(tmp_path, nursery, "b", "1000-1999", b_args) as (b, pb):
                await a.wait_log(MEMBER_UP)
                yield a, pa, b, pb
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plaintext"])
async def test_curve_encrypts_the_links_and_refuses_a_key_not_allowed(
    tmp_path: Path, curve: bool
) -> None:
    a_keys = curve_options(tmp_path, "a", ["a", "b"]) if curve else []
    b_keys = curve_options(tmp_path, "b", ["a", "b"]) if curve else []
    async with (
        two_proxied_hosts(tmp_path, a_keys, b_keys) as (a, pa, b, pb),
        clients(a.socket_path, b.socket_path) as (on_a, on_b),
    ):
        await sees(on_a, {1000: 1})
        await sees(on_b, {0: 1})
        ring(on_a, 1000, count=5)
        assert await rung(on_b) == 5
        captured = bytes(pa.captured + pb.captured)
        # a hello names the sender's endpoint: in the clear only without CURVE
        names = [pa.endpoint.encode(), pb.endpoint.encode()]
        assert any(name in captured for name in names) is not curve
        if curve:  # a daemon whose key the others do not allow is refused
            c_keys = curve_options(tmp_path, "c", ["a", "b", "c"])
            c_args = ["--peer-ids", "2000-2999", "--federation-listen", f"ipc://{tmp_path}/c.fed",
                      "--federation-peer", pa.endpoint, *c_keys]  # fmt: skip
            async with daemon_process(tmp_path, args=c_args):
                await a.wait_log(
                    r"refused a connection from .*: public key .* is not in the allow directory"
                )
                assert on_a.view() == {1000: 1}


async def test_a_cut_link_makes_each_side_announce_the_others_peers_left_and_healing_rejoins(
    tmp_path: Path,
) -> None:
    timeout = ["--federation-timeout", "1"]
    async with (
        two_proxied_hosts(tmp_path, timeout, timeout) as (a, pa, b, pb),
        clients(a.socket_path, b.socket_path) as (on_a, on_b),
    ):
        await sees(on_a, {1000: 1})
        await sees(on_b, {0: 1})
        pa.cut()
        pb.cut()
        await sees(on_a, {})
        await sees(on_b, {})
        await a.wait_log(r"member .* is dead")
        pa.heal()
        pb.heal()
        await sees(on_a, {1000: 1})
        await sees(on_b, {0: 1})
        ring(on_b, 0, count=2)
        assert await rung(on_a) == 2


def test_ivshmemctl_keygen_writes_a_pair_once_and_refuses_to_overwrite(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ivshmemd.ctl", "keygen", str(tmp_path / "k"), "a"]
    made = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "k" / "a.key").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "k" / "a.key_secret").stat().st_mode & 0o777 == 0o600
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0
    assert again.stderr.startswith("ivshmemctl keygen: ") and len(again.stderr.splitlines()) == 1
