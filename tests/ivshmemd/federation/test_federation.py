"""End-to-end tests of Federation objects: real zmq over ipc and TCP loopback, real eventfds.

Three (sometimes four) federated "daemons" run in the test process, each a
:class:`~ivshmemd.federation.Federation` with a small real host (a registry making real
eventfds); one test runs a member in its own process to ``kill -9`` it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import zmq

from ivshmemd.federation import Federation, FederationConfigError, KeyFileError, keygen
from ivshmemd.federation.schema import (
    HARD_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    Hello,
    PeerJoined,
    encode_frame,
)
from ivshmemd.federation.transport import TransportError
from ivshmemd.supervise import Child, open_supervisor
from ivshmemd.zmqtrio import TrioSocket

from .hosts import (
    LogWaiter,
    Node,
    RecordingHost,
    all_see,
    all_up,
    federation_chain,
    ipc,
    make_config,
    start_node,
)
from .proxy import TcpProxy

TRANSPORTS: dict[str, Callable[[Path, str], str]] = {
    "ipc": ipc,
    "tcp": lambda _tmp, _name: "tcp://127.0.0.1:0",
}


def fds_open() -> int:
    return len(os.listdir("/proc/self/fd"))


async def ring_and_check(
    sender: Node, receiver: Node, peer_id: int, vector: int, count: int
) -> None:
    """``sender``'s local peer rings ``receiver``'s local peer; it gets exactly ``count``."""
    sender.host.ring(peer_id, vector, count)
    got = 0
    while got < count:
        got += await receiver.host.read_ring(peer_id, vector)
    assert got == count


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_three_daemons_relay_doorbells_between_every_pair(
    tmp_path: Path, transport: str
) -> None:
    before = fds_open()
    listens = [TRANSPORTS[transport](tmp_path, name) for name in "abc"]
    async with federation_chain(listens) as (_nursery, nodes):
        for node in nodes:
            node.host.add_local()
            node.host.add_local()
        await all_see(nodes)
        count = 1
        for sender in nodes:
            for receiver in nodes:
                if receiver is sender:
                    continue
                for peer_id in receiver.host.local_ids():
                    for vector in range(2):
                        await ring_and_check(sender, receiver, peer_id, vector, count)
                        count += 1
        # rings coalesce as in an eventfd, and none is lost
        a, b, _c = nodes
        target = b.host.local_ids()[0]
        for _ in range(50):
            a.host.ring(target, 1, 1)
        got = 0
        while got < 50:
            got += await b.host.read_ring(target, 1)
        assert got == 50
        # status: members up, last heard, round-trip time once a ping came back
        await a.host.wait_for(
            lambda: all(m["rtt"] is not None for m in a.federation.status()["members"]), "rtt"
        )
        status = a.federation.status()
        assert status["identity"] == a.endpoint and status["id_range"] == [0, 999]
        assert {m["member"]: m["state"] for m in status["members"]} == {
            b.endpoint: "up",
            nodes[2].endpoint: "up",
        }
        for member in status["members"]:
            assert member["peers"] == 2 and member["last_heard"] is not None
        assert status["rings"]["relayed_rings"] >= 50
        assert a.federation.remote_peers() == {
            p: node.identity for node in nodes[1:] for p in node.host.local_ids()
        }
    assert fds_open() == before
    if transport == "ipc":
        assert list(tmp_path.iterdir()) == []  # socket files removed


async def test_joins_and_leaves_are_announced_everywhere(tmp_path: Path) -> None:
    async with federation_chain([ipc(tmp_path, n) for n in "abc"]) as (_nursery, nodes):
        a, b, c = nodes
        peer = a.host.add_local()
        await all_see(nodes)
        assert ("joined", a.identity, peer.peer_id) in b.host.peer_log
        a.host.remove_local(peer.peer_id)
        await all_see(nodes)
        assert b.host.peer_log[-1] == c.host.peer_log[-1] == ("left", a.identity, peer.peer_id)
        kinds = [kind for kind, _ in c.host.member_log]
        assert kinds.count("member-joined") == 2


async def test_a_join_arrives_before_any_ring_and_a_leave_after_the_last_ring(
    tmp_path: Path,
) -> None:
    async with federation_chain([ipc(tmp_path, n) for n in "ab"]) as (_nursery, (a, b)):
        target = b.host.add_local()
        await all_see([a, b])
        seen: list[tuple[str, int, int]] = []

        def observe(what: str, member: str, peer_id: int) -> None:
            # what the target's eventfd holds when its daemon learns of the join/leave
            seen.append((what, peer_id, b.host.pending_ring(target.peer_id)))

        b.host.observers.append(observe)
        for _round in range(20):
            ringer = a.host.add_local()
            a.host.ring(target.peer_id, 0, 3)  # as soon as it knows the target
            for _ in range(5):
                a.host.ring(target.peer_id, 0, 1)
                await trio.lowlevel.checkpoint()  # relayed as separate frames
            a.host.ring(target.peer_id, 0, 2)
            a.host.remove_local(ringer.peer_id)  # leaves at once: 10 rings still in flight
            await b.host.wait_for(
                lambda r=ringer: ("left", r.peer_id) in [(w, p) for w, p, _ in seen], "leave"
            )
        joins = [pending for what, _, pending in seen if what == "joined"]
        leaves = [pending for what, _, pending in seen if what == "left"]
        assert joins == [0] * 20  # no ring from a peer before its join notice
        assert leaves == [10] * 20  # every ring before the leave notice


async def test_curve_links_work_and_a_key_not_allowed_is_refused(tmp_path: Path) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in "abcd":
        public, _secret = keygen(keys, name)
        if name != "d":
            (allowed / public.name).write_bytes(public.read_bytes())
    curve: dict[str, object] = {
        "key_file": lambda i: keys / f"{'abc'[i]}.key_secret",
        "allow_dir": allowed,
    }
    tcp = ["tcp://127.0.0.1:0"] * 3
    with LogWaiter() as logged:
        async with federation_chain(tcp, **curve) as (nursery, nodes):
            a, b, c = nodes
            for node in nodes:
                node.host.add_local()
            await all_see(nodes)
            await ring_and_check(a, c, c.host.local_ids()[0], 1, 7)
            await ring_and_check(c, b, b.host.local_ids()[0], 0, 2)
            assert all(node.federation.status()["secure"] for node in nodes)
            # d's key is not in the allow directory: refused and logged
            d_allowed = tmp_path / "d-allowed"
            d_allowed.mkdir()
            for name in "abcd":
                (d_allowed / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
            config = make_config(
                "tcp://127.0.0.1:0",
                3,
                peers=(a.endpoint,),
                key_file=keys / "d.key_secret",
                allow_dir=d_allowed,
            )
            d = await start_node(nursery, config)
            d_key = d.federation.keys.public if d.federation.keys else ""
            await logged.wait_for(f"public key {d_key} is not in the allow directory")
            await ring_and_check(b, a, a.host.local_ids()[0], 0, 1)  # still serving
            assert d.host.remote == {} and d.members_up() == set()
            assert d.identity not in {m["member"] for m in a.federation.status()["members"]}


async def test_a_member_killed_with_sigkill_is_announced_left_and_rejoins(
    tmp_path: Path,
) -> None:
    listen_b = ipc(tmp_path, "b")
    command = [sys.executable, "-m", "tests.ivshmemd.federation.member_proc"]
    async with (
        federation_chain([ipc(tmp_path, n) for n in "ac"], timeout=1.0) as (_nursery, (a, c)),
        open_supervisor() as supervisor,
    ):

        async def spawn(args: list[str]) -> Child:
            return await supervisor.start(Child([*command, *args]), events=True)

        b = await spawn([listen_b, "2", "--peer", a.endpoint, "--locals", "2"])
        listening = await b.wait_event(event="listening")
        b_peers = set(listening["peers"])
        for node in (a, c):
            await node.host.wait_for(lambda n=node: set(n.host.remote) == b_peers, "b's peers")
        await b.wait_event(event="member-joined", count=2)  # a and c, via a's gossip
        with LogWaiter() as logged:
            b.send_signal(signal.SIGKILL)
            await b.wait_exit()
            for node in (a, c):
                await node.host.wait_for(lambda n=node: not n.host.remote, "b's peers left")
            line = await logged.wait_for(f"member {listen_b} at {listen_b} is dead")
            assert "silent for" in line and "timeout 1 s" in line
        left = [(w, p) for w, m, p in a.host.peer_log if m == listen_b and w == "left"]
        assert sorted(p for _, p in left) == sorted(b_peers)
        assert ("member-left", listen_b) in [(k, i["member"]) for k, i in a.host.member_log]
        # it comes back (a new process, a new incarnation, no seeds: the knocks find it)
        b2 = await spawn([listen_b, "2", "--locals", "1"])
        back = set((await b2.wait_event(event="listening"))["peers"])
        for node in (a, c):
            await node.host.wait_for(lambda n=node: set(n.host.remote) == back, "rejoined")
        await b2.wait_event(event="member-joined", count=2)


async def test_a_member_shut_down_says_bye_and_its_restart_rejoins(tmp_path: Path) -> None:
    async with federation_chain([ipc(tmp_path, n) for n in "abc"]) as (nursery, nodes):
        a, b, c = nodes
        b.host.add_local()
        await all_see(nodes)
        with LogWaiter() as logged:
            b.scope.cancel()
            for node in (a, c):
                await node.host.wait_for(lambda n=node: not n.host.remote, "bye")
            await logged.wait_for(f"member {b.identity} left: shutting down")
        assert not logged.count("is dead")  # announced at once, not after the timeout
        await b.done.wait()
        b2 = await start_node(nursery, make_config(b.endpoint, 1))
        b2.host.add_local()
        await all_up([a, b2, c])
        await all_see([a, b2, c])


@pytest.mark.parametrize(
    "junk",
    [
        b"not msgpack \xc1",
        encode_frame(PeerJoined(1, 2), 1)[:1] + b"\x02" + encode_frame(PeerJoined(1, 2), 1)[2:],
        b"\x95\x01\x07\x01\xa3abc\x02",  # PEER_JOINED with a string peer id
        b"\x91" + b"\xc4\x00" * 0 + b"\x01",  # an array too short
        b"\x93\x01\x06\x01" + b"\xc0" * MAX_FRAME_BYTES,  # over the frame limit
    ],
    ids=["not-msgpack", "wrong-version", "wrong-type", "short", "huge"],
)
async def test_bad_frames_from_a_raw_socket_drop_that_member_and_the_rest_keeps_working(
    tmp_path: Path, junk: bytes
) -> None:
    async with federation_chain([ipc(tmp_path, n) for n in "ab"]) as (_nursery, (a, b)):
        a.host.add_local()
        b.host.add_local()
        await all_see([a, b])
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        mallory = TrioSocket(context.socket(zmq.DEALER))
        listener = TrioSocket(context.socket(zmq.ROUTER))  # where a dials mallory back
        try:
            listener.socket.bind(ipc(tmp_path, "mallory"))
            mallory.socket.setsockopt(zmq.ROUTING_ID, b"Mmallory")
            mallory.socket.connect(a.endpoint)
            with LogWaiter() as logged:
                await mallory.send_multipart([junk])  # not a member yet: logged, ignored
                await logged.wait_for("bad frame from an unknown connection")
                hello = Hello(
                    "mallory", "m-1", ipc(tmp_path, "mallory"), (5000, 5999), 1 << 20, 2, 1, 0, 0, 0
                )
                await mallory.send_multipart([encode_frame(hello, 0)])
                await mallory.send_multipart([encode_frame(PeerJoined(5000, 2), 1)])
                await a.host.wait_for(lambda: 5000 in a.host.remote, "mallory's peer")
                await mallory.send_multipart([junk])
                await logged.wait_for("dropping member mallory")
                await a.host.wait_for(lambda: 5000 not in a.host.remote, "mallory dropped")
            status = {m["member"]: m for m in a.federation.status()["members"]}
            assert status["mallory"]["state"] == "dropped"
            await ring_and_check(a, b, b.host.local_ids()[0], 0, 4)
            await ring_and_check(b, a, a.host.local_ids()[0], 1, 5)
        finally:
            mallory.close()
            listener.close()
            context.term()


async def test_a_message_over_the_hard_limit_cuts_only_that_connection(tmp_path: Path) -> None:
    async with federation_chain([ipc(tmp_path, n) for n in "ab"]) as (_nursery, (a, b)):
        b.host.add_local()
        await all_see([a, b])
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        raw = TrioSocket(context.socket(zmq.DEALER))
        try:
            raw.socket.connect(a.endpoint)
            await raw.send_multipart([b"\x00" * (HARD_MAX_FRAME_BYTES + 1)])
            await raw.send_multipart([b"a", b"b"])  # two frames: not a federation message
            with LogWaiter() as logged:
                await raw.send_multipart([b"x", b"y"])
                await logged.wait_for("exactly one frame")
            await ring_and_check(a, b, b.host.local_ids()[0], 0, 1)
        finally:
            raw.close()
            context.term()


async def test_a_member_that_does_not_read_is_dropped_past_the_bound(tmp_path: Path) -> None:
    async with federation_chain([ipc(tmp_path, n) for n in "ab"], max_backlog=20) as (
        _nursery,
        (a, b),
    ):
        b.host.add_local()
        await all_see([a, b])
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        slow = TrioSocket(context.socket(zmq.DEALER))
        try:
            slow.socket.setsockopt(zmq.ROUTING_ID, b"Mslow")
            slow.socket.connect(a.endpoint)
            # it says hello and announces a peer, but nobody listens where it says it does:
            # every frame a sends it waits in a's bounded outbox
            hello = Hello(
                "slow", "s-1", ipc(tmp_path, "nobody"), (7000, 7999), 1 << 20, 2, 1, 0, 0, 0
            )
            await slow.send_multipart([encode_frame(hello, 0)])
            await slow.send_multipart([encode_frame(PeerJoined(7000, 2), 1)])
            await a.host.wait_for(lambda: 7000 in a.host.remote, "slow's peer")
            with LogWaiter() as logged:
                for _ in range(40):
                    if 7000 not in a.host.registry:
                        break
                    a.host.ring(7000, 0, 1)
                    await trio.lowlevel.wait_readable(
                        a.federation.relay.fileno()
                    ) if False else None
                    await trio.sleep(0)  # let the relay read it: one frame per ring
                await logged.wait_for("more than 20 frames queued")
                await logged.wait_for("member slow at")
            await a.host.wait_for(lambda: 7000 not in a.host.remote, "slow dropped")
            await ring_and_check(a, b, b.host.local_ids()[0], 1, 3)  # a never stalled
        finally:
            slow.close()
            context.term()


async def test_refusals_between_real_daemons_name_both_values(tmp_path: Path) -> None:
    with LogWaiter() as logged:
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, make_config(ipc(tmp_path, "a"), 0))
            b = await start_node(
                nursery, make_config(ipc(tmp_path, "b"), 1, peers=(a.endpoint,), vectors=3)
            )
            line_a = await logged.wait_for(f"refused member {b.endpoint}")
            line_b = await logged.wait_for(f"member {a.endpoint} refused us")
            for line in (line_a, line_b):
                assert f"{b.endpoint} has 3" in line and f"{a.endpoint} has 2" in line
            assert b.federation.status()["refused_by"][a.endpoint] == line_a.split(": ", 2)[2]
            nursery.cancel_scope.cancel()


async def test_starting_fails_cleanly_on_bad_settings(tmp_path: Path) -> None:
    host = RecordingHost(2, (0, 999))
    with pytest.raises(FederationConfigError, match="not ipc:// or loopback"):
        Federation(make_config("tcp://10.1.2.3:7300", 0), host)
    with pytest.raises(KeyFileError, match="cannot open"):
        Federation(
            make_config("tcp://127.0.0.1:0", 0, key_file=tmp_path / "nope", allow_dir=tmp_path),
            host,
        )
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("precious")
    federation = Federation(make_config(f"ipc://{not_a_socket}", 0), host)
    async with trio.open_nursery() as nursery:
        with pytest.raises(TransportError, match="is not a socket; refusing to replace it"):
            await nursery.start(federation.run)
    assert not_a_socket.read_text() == "precious"


async def test_a_live_daemons_socket_is_not_taken_over(tmp_path: Path) -> None:
    async with federation_chain([ipc(tmp_path, "a")]) as (_nursery, (a,)):
        second = Federation(make_config(a.endpoint, 1), RecordingHost(2, (1000, 1999)))
        async with trio.open_nursery() as nursery:
            with pytest.raises(TransportError, match="another server is already listening"):
                await nursery.start(second.run)
        assert os.path.exists(a.endpoint[len("ipc://") :])


async def _proxied_pair(
    nursery: trio.Nursery, tmp_path: Path, secure: bool
) -> tuple[list[Node], list[TcpProxy]]:
    """Two daemons whose every link passes through a proxy (each advertises its proxy)."""
    extra: dict[str, object] = {}
    if secure:
        allowed = tmp_path / "allowed"
        allowed.mkdir()
        for name in "ab":
            public, _secret = keygen(tmp_path / "keys", name)
            (allowed / public.name).write_bytes(public.read_bytes())
        extra = {"allow_dir": allowed}
    nodes: list[Node] = []
    proxies: list[TcpProxy] = []
    for index, name in enumerate("ab"):
        proxy = TcpProxy()
        proxy_endpoint = await nursery.start(proxy.run)
        if secure:
            extra["key_file"] = tmp_path / "keys" / f"{name}.key_secret"
        peers = (proxies[0].endpoint,) if proxies else ()
        config = make_config(
            "tcp://127.0.0.1:0",
            index,
            peers=peers,
            advertise=proxy_endpoint,
            identity=f"secret-member-{name}",
            **extra,
            timeout=1.0,
        )
        node = await start_node(nursery, config)
        proxy.target = int(node.endpoint.rsplit(":", 1)[1])
        nodes.append(node)
        proxies.append(proxy)
    await all_up(nodes)
    return nodes, proxies


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "plain"])
async def test_with_curve_a_capture_of_the_link_shows_no_plaintext_frame(
    tmp_path: Path, secure: bool
) -> None:
    async with trio.open_nursery() as nursery:
        (a, b), proxies = await _proxied_pair(nursery, tmp_path, secure)
        b.host.add_local()
        await all_see([a, b])
        await ring_and_check(a, b, b.host.local_ids()[0], 0, 1)
        captured = b"".join(bytes(p.captured) for p in proxies)
        assert captured and all(p.connections for p in proxies)
        plain = [b"secret-member-a", b"secret-member-b", a.endpoint.encode()]
        assert any(text in captured for text in plain) is not secure
        nursery.cancel_scope.cancel()


async def test_a_link_cut_and_healed_announces_leaves_then_rejoins(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        (a, b), proxies = await _proxied_pair(nursery, tmp_path, secure=False)
        a.host.add_local()
        b.host.add_local()
        await all_see([a, b])
        with LogWaiter() as logged:
            for proxy in proxies:
                proxy.cut()
            for node in (a, b):
                await node.host.wait_for(lambda n=node: not n.host.remote, "leaves")
            await logged.wait_for("is dead", count=2)
        assert a.members_up() == set() and b.members_up() == set()
        a.host.add_local()  # a change while cut
        for proxy in proxies:
            proxy.heal()
        await all_up([a, b])
        await all_see([a, b])
        await ring_and_check(b, a, a.host.local_ids()[1], 1, 2)
        nursery.cancel_scope.cancel()
