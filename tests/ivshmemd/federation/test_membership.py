"""Tests of the membership state machine, sans I/O: machines wired by an in-memory network."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmemd.federation.membership import (
    Deliver,
    Dial,
    LocalMember,
    Membership,
    MemberState,
    Reset,
    Send,
    incompatibility,
)
from ivshmemd.federation.schema import (
    Diff,
    Gossip,
    GossipEntry,
    Hello,
    PeerJoined,
    PeerLeft,
    Ring,
    decode_frame,
    encode_frame,
    encode_ring,
)

from .simnet import SimNet, SimNode, kinds


def join(net: SimNet, node: SimNode, *peer_ids: int) -> None:
    """Local peers join ``node``."""
    for peer_id in peer_ids:
        net.apply(node, node.machine.local_peer_joined(peer_id, node.machine.local.vectors))
    net.run()


def leave(net: SimNet, node: SimNode, *peer_ids: int) -> None:
    for peer_id in peer_ids:
        net.apply(node, node.machine.local_peer_left(peer_id))
    net.run()


def mesh(count: int, **kwargs: object) -> tuple[SimNet, list[SimNode]]:
    """``count`` members, each seeded with the previous one only (a chain)."""
    net = SimNet()
    nodes: list[SimNode] = []
    for index in range(count):
        seeds = (nodes[-1].endpoint,) if nodes else ()
        nodes.append(net.add(f"m{index}", index, seeds=seeds, **kwargs))  # type: ignore[arg-type]
    net.settle()
    return net, nodes


# -- forming a federation ----------------------------------------------------------------------


def test_naming_one_member_is_enough_everyone_connects_to_everyone() -> None:
    net, nodes = mesh(5)
    for node in nodes:
        assert node.up() == {n.name for n in nodes} - {node.name}
    # probes were all answered and closed
    assert all(node.machine.status(net.now)["probing"] == [] for node in nodes)
    for node in nodes:
        joined = [info["member"] for kind, info in node.events if kind == "member-joined"]
        assert sorted(joined) == sorted(n.name for n in nodes if n is not node)


def test_peers_spread_both_ways_including_those_there_before() -> None:
    net = SimNet()
    a = net.add("a", 0)
    join(net, a, 1, 2)
    b = net.add("b", 1, seeds=(a.endpoint,))
    join(net, b, 100)
    net.settle()
    assert a.remote == {100: "b"}
    assert b.remote == {1: "a", 2: "a"}
    leave(net, a, 1)
    join(net, b, 101)
    assert b.remote == {2: "a"}
    assert a.remote == {100: "b", 101: "b"}
    assert net.consistent()


def test_a_seed_pointing_at_ourselves_is_skipped() -> None:
    net = SimNet()
    a = net.add("a", 0, seeds=("ipc://sim/a",))
    net.settle()
    assert a.machine.status(net.now)["probing"] == []
    assert not a.machine.members


def test_a_join_notice_always_precedes_a_ring_from_that_peer() -> None:
    net, (a, b) = mesh(2)
    a_sends: list[str] = []
    actions = a.machine.local_peer_joined(5, 1)
    frame = a.machine.ring("m1", 150, 0, 3)
    assert frame is not None
    for action in [*actions, frame]:
        if isinstance(action, Send):
            a_sends.append(kinds(action.data))
    assert a_sends == ["PeerJoined", "Ring"]
    net.apply(a, [*actions, frame])
    net.run()
    assert b.remote == {5: "m0"} and b.rings == [(150, 0, 3)]


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings_b", "words"),
    [
        ({"shm_size": 2 << 20}, ["shm size differs", "1048576", "2097152"]),
        ({"vectors": 4}, ["vector count differs", "has 1", "has 4"]),
        ({"id_range": (50, 149)}, ["peer id ranges overlap", "0-99", "50-149"]),
    ],
)
def test_incompatible_daemons_are_refused_on_both_sides_naming_both_values(
    settings_b: dict[str, object], words: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    net = SimNet()
    a = net.add("a", 0)
    join(net, a, 1)
    b = net.add("b", 1, seeds=(a.endpoint,), **settings_b)  # type: ignore[arg-type]
    join(net, b, 120)
    net.settle()
    assert a.machine.members["b"].state is MemberState.REFUSED
    assert a.remote == {} and b.remote == {}
    assert a.up() == set() and b.up() == set()
    refused = [r.getMessage() for r in caplog.records if "refused member b" in r.getMessage()]
    refused_us = [r.getMessage() for r in caplog.records if "member a refused us" in r.getMessage()]
    assert refused and refused_us, caplog.text
    for line in (refused[0], refused_us[0]):
        for word in words:
            assert word in line, line
    assert b.machine.status(net.now)["refused_by"]["a"] == a.machine.members["b"].reason
    assert [kind for kind, _ in a.events] == ["member-refused"]
    # it keeps probing, and is refused again without flooding the log
    before = len(caplog.records)
    net.advance(5 * net.timeout)
    assert a.machine.members["b"].state is MemberState.REFUSED
    assert len(caplog.records) - before <= 2


def test_a_range_overlapping_another_member_is_refused() -> None:
    net = SimNet()
    a = net.add("a", 0, id_range=(0, 99))
    b = net.add("b", 1, id_range=(100, 199), seeds=(a.endpoint,))
    net.settle()
    c = net.add("c", 2, id_range=(150, 249), seeds=(a.endpoint,))
    join(net, c, 240)
    net.settle()
    assert a.machine.members["c"].state is MemberState.REFUSED
    assert "b has 100-199" in (a.machine.members["c"].reason or "")
    assert a.remote == {} and b.up() == {"a"}


def test_incompatibility_checks_each_value() -> None:
    local = LocalMember("us", "i", "ipc://us", (0, 9), 4096, 2)

    def hello(**kw: object) -> Hello:
        fields: dict[str, object] = {
            "identity": "them",
            "incarnation": "j",
            "endpoint": "ipc://them",
            "id_range": (10, 19),
            "shm_size": 4096,
            "vectors": 2,
            "session": 1,
            "nonce": 0,
            "prev_session": 0,
            "prev_seq": 0,
        }
        fields.update(kw)
        return Hello(**fields)  # type: ignore[arg-type]

    assert incompatibility(local, hello()) is None
    assert incompatibility(local, hello(id_range=(9, 9))) is not None
    assert incompatibility(local, hello(id_range=(30, 40)), [("x", (35, 35))]) == (
        "id-range",
        "peer id ranges overlap: them has 30-40, x has 35-35",
    )
    assert incompatibility(local, hello(shm_size=8192))[0] == "shm-size"  # type: ignore[index]
    assert incompatibility(local, hello(vectors=1))[0] == "vectors"  # type: ignore[index]


# -- heartbeats and failure ---------------------------------------------------------------------


def test_heartbeats_measure_the_round_trip_and_last_heard() -> None:
    net, (a, _b) = mesh(2)
    net.advance(net.timeout)
    (member,) = a.machine.status(net.now)["members"]
    assert member["state"] == "up"
    assert member["rtt"] is not None and member["rtt"] >= 0
    assert member["last_heard"] is not None and member["last_heard"] < net.timeout


def test_a_silent_member_is_dead_its_peers_leave_and_a_restart_rejoins() -> None:
    net, (a, b, c) = mesh(3)
    join(net, b, 100, 101)
    assert a.remote == c.remote == {100: "m1", 101: "m1"}
    net.kill(b)
    net.advance(net.timeout * 1.5)
    for node in (a, c):
        assert node.machine.members["m1"].state is MemberState.DEAD
        assert node.remote == {}
        assert ("member-left", "m1") in [(k, i["member"]) for k, i in node.events]
    b2 = net.restart(b)  # no seeds: the others' knocks find it
    join(net, b2, 100)
    net.advance(net.timeout * 2)
    assert a.remote == c.remote == {100: "m1"}
    assert b2.remote == {}
    assert net.consistent()
    assert a.machine.members["m1"].incarnation == b2.machine.local.incarnation


def test_a_quick_restart_replaces_the_old_incarnation_before_the_timeout() -> None:
    net, (a, b) = mesh(2)
    join(net, b, 100, 101)
    net.kill(b)
    b2 = net.restart(b, seeds=(a.endpoint,))
    join(net, b2, 100)
    net.run()
    assert a.remote == {100: "m1"}
    assert a.machine.members["m1"].state is MemberState.UP
    net.settle()
    assert net.consistent()


def test_a_cut_link_makes_both_sides_dead_and_healing_rejoins_without_duplicates() -> None:
    net, (a, b, c) = mesh(3)
    join(net, a, 1)
    join(net, b, 100)
    net.cut(a, b)
    net.advance(net.timeout * 2)
    assert a.machine.members["m1"].state is MemberState.DEAD
    assert b.machine.members["m0"].state is MemberState.DEAD
    assert a.remote == {} and b.remote == {} and c.remote == {1: "m0", 100: "m1"}
    join(net, a, 2)  # changes while cut
    leave(net, b, 100)
    net.heal(a, b)
    net.advance(net.timeout * 2)
    assert a.up() == {"m1", "m2"} and b.up() == {"m0", "m2"}
    assert net.consistent()


def test_lost_frames_break_the_stream_and_a_new_session_repairs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, (a, b) = mesh(2)
    join(net, a, 1, 2)
    join(net, b, 150)
    lost = []

    def drop_a_join(source: SimNode, target: SimNode, data: bytes) -> bool:
        if source is a and kinds(data) == "PeerJoined" and not lost:
            lost.append(data)
            return True
        return False

    net.drop = drop_a_join
    join(net, a, 3)  # lost in flight
    assert b.remote == {1: "m0", 2: "m0"}
    join(net, a, 4)  # the gap is seen here
    assert "broken" in caplog.text
    net.drop = None
    net.settle()
    assert b.remote == {1: "m0", 2: "m0", 3: "m0", 4: "m0"}
    assert net.consistent()


def test_after_a_break_we_ask_again_for_its_session_and_never_reset_ours() -> None:
    net, (a, b) = mesh(2)
    join(net, a, 1)
    join(net, b, 150)
    member = b.machine.members["m0"]
    assert member.origin is not None
    # a frame from a went missing: b sees the gap on the next one and asks for a resync
    gap = encode_frame(PeerLeft(1), member.in_expected + 1)
    first = b.machine.receive(net.now, member.origin, gap)
    assert member.state is MemberState.CONNECTING
    assert [kinds(x.data) for x in first if isinstance(x, Send)] == ["Resync"]
    # no answer (a is slow): after the timeout b asks again; its own stream to a, which
    # is fine, is not reset (that would make a drop b's peers for nothing)
    later = b.machine.tick(net.now + net.timeout * 1.1)
    assert not any(isinstance(x, Reset) for x in later)
    assert [kinds(x.data) for x in later if isinstance(x, Send)] == ["Resync"]
    net.apply(b, first + later)
    net.settle()
    assert net.consistent() and a.leaves == 0


def test_a_new_session_that_lost_nothing_reconciles_without_churn() -> None:
    net, (a, b) = mesh(2)
    join(net, a, 1, 2, 3)
    before = (b.joins, b.leaves)
    # a starts a new session to b (as on a resync request) right after a change
    member = a.machine.members["m1"]
    a.machine._start_session(member, net.now)
    net.apply(a, a.machine._take())
    leave(net, a, 2)
    net.run()
    assert b.remote == {1: "m0", 3: "m0"}
    assert (b.joins, b.leaves) == (before[0], before[1] + 1)  # only the real leave


def test_bye_makes_the_peers_leave_at_once() -> None:
    net, (a, b) = mesh(2)
    join(net, b, 100)
    net.apply(b, b.machine.shutdown())
    net.run()
    net.kill(b)
    assert a.remote == {}
    assert a.machine.members["m1"].state is MemberState.LEFT


def test_bye_restarting_keeps_the_peers_until_the_timeout() -> None:
    net, (a, b) = mesh(2)
    join(net, b, 100)
    net.apply(b, b.machine.shutdown(restarting=True, reason="upgrade"))
    net.run()
    net.kill(b)
    assert a.remote == {100: "m1"}
    assert a.machine.members["m1"].state is MemberState.RESTARTING
    net.advance(net.timeout * 1.5)
    assert a.remote == {}


# -- hostile members ---------------------------------------------------------------------------


def _origin(net: SimNet, sender: SimNode, receiver: SimNode) -> bytes:
    member = receiver.machine.members[sender.machine.local.identity]
    assert member.origin is not None
    return member.origin


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (encode_frame(Ring(150, 0, 1), 10**6), "expected"),  # a gap: stream broken, not dropped
        (b"\x93\x02\x09\x01", "schema version"),
        (b"\x96\x01\x09\x05\xa1x\x00\x01", "RING.peer_id"),
        (encode_ring(0, 42, 0, 1), "outside our id range"),
        (b"\x92" + b"\x01" * 2, "msgpack array"),
    ],
)
def test_bad_frames_from_a_member_drop_it_and_the_rest_keeps_working(
    raw: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    net, (a, b, c) = mesh(3)
    join(net, a, 1)
    join(net, b, 100)
    origin = _origin(net, a, b)
    member = b.machine.members["m0"]
    if why == "outside our id range":
        raw = encode_ring(member.in_expected, 42, 0, 1)
    elif why == "RING.peer_id":
        raw = b"\x96\x01\x09" + bytes([member.in_expected]) + b"\xa1x\x00\x01"
    net.apply(b, b.machine.receive(net.now, origin, raw))
    net.run()
    assert why in caplog.text
    assert b.leaves == 1  # its peers left
    if why == "expected":  # a broken stream, repaired at once by a new session
        assert b.remote == {1: "m0"} and b.joins == 2
    else:
        assert b.remote == {}
        assert member.state is MemberState.DROPPED
        net.settle()
        assert member.state is MemberState.DROPPED and b.remote == {}
    # c and b keep working
    join(net, c, 200)
    assert b.remote.get(200) == "m2" and c.remote.get(100) == "m1"


def test_junk_from_an_unknown_connection_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, (a, b) = mesh(2)
    join(net, a, 1)
    for _ in range(100):
        assert b.machine.receive(net.now, b"stranger", b"\xff\xff") == []
        assert b.machine.receive(net.now, b"stranger", encode_ring(1, 150, 0, 1)) == []
    assert b.remote == {1: "m0"}
    warnings = [r for r in caplog.records if b"stranger".hex() in r.getMessage()]
    assert 1 <= len(warnings) <= 2  # throttled


@pytest.mark.parametrize(
    "frame",
    [PeerJoined(999, 1), PeerJoined(150, 1), PeerJoined(5, 3)],
    ids=["outside-its-range", "twice", "wrong-vectors"],
)
def test_protocol_violations_drop_the_member(frame: PeerJoined) -> None:
    net, (a, b) = mesh(2)
    join(net, b, 150)
    member = a.machine.members["m1"]
    raw = encode_frame(frame, member.in_expected)
    net.apply(a, a.machine.receive(net.now, _origin(net, b, a), raw))
    assert member.state is MemberState.DROPPED
    assert a.remote == {}


def test_a_dropped_member_comes_back_only_as_a_new_incarnation() -> None:
    net, (a, b) = mesh(2)
    join(net, b, 150)
    net.apply(a, a.machine.receive(net.now, _origin(net, b, a), b"junk"))
    net.settle()
    assert a.machine.members["m1"].state is MemberState.DROPPED
    net.kill(b)
    b2 = net.restart(b, seeds=(a.endpoint,))
    join(net, b2, 151)
    net.settle()
    assert a.machine.members["m1"].state is MemberState.UP
    assert a.remote == {151: "m1"}


def test_a_ring_to_a_peer_of_ours_is_delivered() -> None:
    net, (a, b) = mesh(2)
    sent = b.machine.ring("m0", 7, 0, 5)
    assert sent is not None
    actions = a.machine.receive(net.now, _origin(net, b, a), sent.data)
    assert actions == [Deliver(7, 0, 5, "m1")]
    assert decode_frame(sent.data)[1] == Ring(7, 0, 5)


def test_rings_to_an_unknown_member_are_not_sent() -> None:
    _net, (a, _b) = mesh(2)
    assert a.machine.ring("nobody", 1, 0, 1) is None


def test_overflow_makes_the_member_dead_and_it_comes_back() -> None:
    net, (a, b) = mesh(2)
    join(net, b, 100)
    link = a.machine.members["m1"].link
    assert link is not None
    net.apply(a, a.machine.link_overflow(net.now, link))
    assert a.machine.members["m1"].state is MemberState.DEAD
    assert a.remote == {}
    net.settle()
    net.advance(net.timeout * 2)
    assert a.remote == {100: "m1"}


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Membership(LocalMember("a", "i", "ipc://a", (0, 1), 4096, 1), timeout=0)


# -- randomized: whatever happens, once the network heals everyone agrees -----------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 2), st.integers(0, 9)),
        st.tuples(st.just("leave"), st.integers(0, 2), st.integers(0, 9)),
        st.tuples(st.just("cut"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("drop"), st.integers(0, 2), st.integers(1, 5)),
        st.tuples(st.just("restart"), st.integers(0, 2), st.integers(0, 1)),
        st.tuples(st.just("wait"), st.integers(1, 40), st.just(0)),
        st.tuples(st.just("ring"), st.integers(0, 2), st.integers(0, 2)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_random_schedules_converge_and_never_double_announce(
    ops: list[tuple[str, int, int]], seed: int
) -> None:
    logging.getLogger("ivshmemd.federation").setLevel(logging.CRITICAL)
    net = SimNet(seed=seed)
    nodes = [net.add(f"m{i}", i, seeds=(f"ipc://sim/m{(i + 1) % 3}",)) for i in range(3)]
    drops: dict[int, int] = {}

    def dropper(source: SimNode, target: SimNode, data: bytes) -> bool:
        index = next((i for i, n in enumerate(nodes) if n is source), -1)
        if drops.get(index, 0) > 0:
            drops[index] -= 1
            return True
        return False

    net.drop = dropper
    for op, x, y in ops:
        node = nodes[x % 3]
        base = (x % 3) * 100
        if op == "join" and base + y not in node.machine.local_peers:
            net.apply(node, node.machine.local_peer_joined(base + y, 1))
        elif op == "leave":
            net.apply(node, node.machine.local_peer_left(base + y))
        elif op == "cut" and x != y:
            net.cut(nodes[x], nodes[y])
        elif op == "drop":
            drops[x] = y
        elif op == "restart":
            peers = dict(node.machine.local_peers) if y else {}
            nodes[x] = node = net.restart(node, seeds=(f"ipc://sim/m{(x + 1) % 3}",))
            for peer_id, vectors in peers.items():
                net.apply(node, node.machine.local_peer_joined(peer_id, vectors))
        elif op == "wait":
            net.advance(x * net.timeout / 10)
        elif op == "ring":
            target = nodes[y % 3]
            for peer_id, member in list(node.remote.items()):
                if member == target.name:
                    sent = node.machine.ring(member, peer_id, 0, 1)
                    if sent is not None:
                        net.apply(node, [sent])
        net.run()
    # heal everything and let it settle
    drops.clear()
    for a in nodes:
        for b in nodes:
            net.heal(a, b)
    net.advance(net.timeout * 4)
    assert all(node.up() == {n.name for n in nodes} - {node.name} for node in nodes), [
        node.machine.status(net.now) for node in nodes
    ]
    assert net.consistent(), [(n.name, n.remote, dict(n.machine.local_peers)) for n in nodes]
    # every ring delivered went to a peer in the receiver's own range
    for index, node in enumerate(nodes):
        assert all(index * 100 <= peer < index * 100 + 100 for peer, _, _ in node.rings)


def test_gossip_cannot_make_a_daemon_dial_without_end() -> None:
    net, (a, b) = mesh(2, max_members=4)
    origin = _origin(net, b, a)
    member = a.machine.members["m1"]
    entries = tuple(GossipEntry(f"fake{i}", f"ipc://sim/fake{i}") for i in range(100))
    actions = a.machine.receive(net.now, origin, encode_frame(Gossip(entries), member.in_expected))
    dials = [x for x in actions if isinstance(x, Dial)]
    assert len(dials) == 2 * 4  # MAX_PROBES_PER_MEMBER x max_members
    assert member.state is MemberState.UP


def test_a_member_busy_with_a_transfer_is_not_dead_while_its_pongs_wait() -> None:
    """Pongs can wait behind megabytes of diffs: a member whose diff parts arrive, or one
    we keep sending diffs to and hear from, is alive without them; once the transfer is
    over, pongs alone judge again (an idle link's one-way cut is seen within the timeout)."""
    net, (a, b) = mesh(2, memory=True)
    diff = Diff(1, 1, 0, 0, True, b"", b"", b"", ())
    late = net.now + net.timeout * 2  # no pong either way for two timeouts
    for send in a.machine.broadcast([diff]):
        assert isinstance(send, Send)
        b.machine.receive(late, _origin(net, a, b), send.data)  # b: a's data arrives
    a.machine.members["m1"].last_heard = late  # a: b is heard (its pings)
    a.machine.tick(late)
    b.machine.tick(late)
    assert a.machine.members["m1"].state is MemberState.UP
    assert b.machine.members["m0"].state is MemberState.UP
    later = late + net.timeout * 1.1  # the transfer is over
    a.machine.tick(later)
    b.machine.tick(later)
    assert a.machine.members["m1"].state is MemberState.DEAD
    assert b.machine.members["m0"].state is MemberState.DEAD
