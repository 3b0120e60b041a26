"""Tests for the control protocol (pure) and its trio server (real zmq sockets over ipc)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmemd.control.schema import (
    EVENTS_WELCOME,
    MAX_REQUEST_BYTES,
    SCHEMA_VERSION,
    ControlError,
    Credentials,
    ErrorCode,
    SchemaError,
    SequenceTracker,
    decode_event,
    decode_reply,
    default_control_endpoint,
    default_events_endpoint,
    encode_request,
    events_endpoint_for,
    handle_request,
    parse_peer_address,
)
from ivshmemd.control.server import (
    HARD_MAX_MESSAGE_BYTES,
    ControlAccess,
    ControlEndpoints,
    ControlSetupError,
    CurveKeys,
    EventPublisher,
    serve_control,
)
from ivshmemd.zmqtrio import TrioSocket
from tests.asuser import run_as
from tests.controlview import BrokenDaemon, FakeDaemon
from tests.wakeups import TaskSteps

#: Seconds of quiet watched for wake-ups (a window to observe, not a wait for anything).
OBSERVATION_WINDOW = 0.3
EVENTS = 20
#: The publisher task runs for each event (fewer when events come in a burst).
WAKEUPS_PER_EVENT = 2
#: Wake-ups libzmq's signalling fds may cause without an event (its own commands).
SPURIOUS_WAKEUPS = 3

NOBODY = 65534


def reply(raw: bytes) -> dict[str, Any]:
    decoded = msgpack.unpackb(raw, raw=False)
    assert isinstance(decoded, dict)
    assert decoded["v"] == SCHEMA_VERSION
    return decoded


def error_code(raw: bytes) -> str:
    decoded = reply(raw)
    assert decoded["ok"] is False
    assert isinstance(decoded["error"]["message"], str) and decoded["error"]["message"]
    code = decoded["error"]["code"]
    assert isinstance(code, str)
    return code


def req(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


# --- handle_request: commands ---------------------------------------------------------------


def test_status_peers_stats() -> None:
    daemon = FakeDaemon()
    daemon.join(2)
    daemon.join(2)
    status = decode_reply(handle_request(encode_request("status"), daemon, 1000))
    assert status["peers"] == 2
    assert status["shm"]["size"] == 4 << 20
    peers = decode_reply(handle_request(encode_request("peers"), daemon, None))
    assert [p["id"] for p in peers["peers"]] == [0, 1]
    stats = decode_reply(handle_request(encode_request("stats"), daemon, None))
    assert stats["joins"] == 2 and stats["leaves"] == 0


def test_kick_by_owner_and_root() -> None:
    daemon = FakeDaemon(owner_uid=1000)
    first, second = daemon.join(), daemon.join()
    assert decode_reply(handle_request(encode_request("kick", {"id": first}), daemon, 1000)) == {
        "kicked": first
    }
    assert decode_reply(handle_request(encode_request("kick", {"id": second}), daemon, 0)) == {
        "kicked": second
    }
    assert daemon.table == {}
    assert daemon.counters["leaves"] == 2


@pytest.mark.parametrize("uid", [None, 1001, NOBODY])
def test_kick_refused_for_other_uids(uid: int | None) -> None:
    daemon = FakeDaemon(owner_uid=1000)
    peer = daemon.join()
    raw = handle_request(encode_request("kick", {"id": peer}), daemon, uid)
    assert error_code(raw) == ErrorCode.PERMISSION_DENIED
    assert peer in daemon.table


def test_kick_unknown_peer() -> None:
    daemon = FakeDaemon(owner_uid=0)
    raw = handle_request(encode_request("kick", {"id": 7}), daemon, 0)
    assert error_code(raw) == ErrorCode.NO_SUCH_PEER
    with pytest.raises(ControlError) as info:
        decode_reply(raw)
    assert info.value.code == ErrorCode.NO_SUCH_PEER


# --- handle_request: bad requests -----------------------------------------------------------

BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("empty", b"", ErrorCode.BAD_MSGPACK),
    ("not msgpack", b"\xc1", ErrorCode.BAD_MSGPACK),
    ("truncated", req({"v": 1, "cmd": "status"})[:-2], ErrorCode.BAD_MSGPACK),
    ("trailing data", req({"v": 1, "cmd": "status"}) + b"\x00", ErrorCode.BAD_MSGPACK),
    ("json", b'{"v": 1, "cmd": "status"}', ErrorCode.BAD_MSGPACK),
    ("deep nesting", b"\x91" * 5000 + b"\x00", ErrorCode.BAD_MSGPACK),
    ("int key", req({1: 2}), ErrorCode.BAD_MSGPACK),
    ("list", req(["status"]), ErrorCode.BAD_REQUEST),
    ("string", req("status"), ErrorCode.BAD_REQUEST),
    ("nil", req(None), ErrorCode.BAD_REQUEST),
    ("no version", req({"cmd": "status"}), ErrorCode.BAD_REQUEST),
    ("bool version", req({"v": True, "cmd": "status"}), ErrorCode.BAD_REQUEST),
    ("string version", req({"v": "1", "cmd": "status"}), ErrorCode.BAD_REQUEST),
    ("future version", req({"v": 2, "cmd": "status"}), ErrorCode.UNSUPPORTED_VERSION),
    ("no cmd", req({"v": 1}), ErrorCode.BAD_REQUEST),
    ("bytes cmd", req({"v": 1, "cmd": b"status"}), ErrorCode.BAD_REQUEST),
    ("unknown cmd", req({"v": 1, "cmd": "reboot"}), ErrorCode.UNKNOWN_COMMAND),
    ("unknown field", req({"v": 1, "cmd": "status", "x": 1}), ErrorCode.BAD_REQUEST),
    ("args not map", req({"v": 1, "cmd": "status", "args": [1]}), ErrorCode.BAD_ARGS),
    ("args for status", req({"v": 1, "cmd": "status", "args": {"a": 1}}), ErrorCode.BAD_ARGS),
    ("kick no args", req({"v": 1, "cmd": "kick"}), ErrorCode.BAD_ARGS),
    ("kick str id", req({"v": 1, "cmd": "kick", "args": {"id": "3"}}), ErrorCode.BAD_ARGS),
    ("kick bool id", req({"v": 1, "cmd": "kick", "args": {"id": True}}), ErrorCode.BAD_ARGS),
    ("kick float id", req({"v": 1, "cmd": "kick", "args": {"id": 1.0}}), ErrorCode.BAD_ARGS),
    ("kick -1", req({"v": 1, "cmd": "kick", "args": {"id": -1}}), ErrorCode.BAD_ARGS),
    ("kick 65536", req({"v": 1, "cmd": "kick", "args": {"id": 65536}}), ErrorCode.BAD_ARGS),
    ("kick extra", req({"v": 1, "cmd": "kick", "args": {"id": 1, "x": 0}}), ErrorCode.BAD_ARGS),
    (
        "oversized",
        req({"v": 1, "cmd": "status", "pad": b"x" * MAX_REQUEST_BYTES}),
        ErrorCode.TOO_LARGE,
    ),
    # keys of both kinds: nothing may compare (sort) them, and it is the client's mistake
    ("mixed keys", req({"v": 1, "cmd": "status", b"x": 1, "y": 2}), ErrorCode.BAD_REQUEST),
    (
        "mixed args keys",
        req({"v": 1, "cmd": "status", "args": {"a": 1, b"b": 2}}),
        ErrorCode.BAD_REQUEST,
    ),
    ("bytes keys only", req({b"v": 1, b"cmd": b"status"}), ErrorCode.BAD_REQUEST),
]


@pytest.mark.parametrize(
    ("raw", "code"),
    [(raw, code) for _, raw, code in BAD_REQUESTS],
    ids=[n for n, *_ in BAD_REQUESTS],
)
def test_bad_requests_get_error_replies(raw: bytes, code: str, caplog: Any) -> None:
    daemon = FakeDaemon(owner_uid=0)
    daemon.join()
    with caplog.at_level("DEBUG"):
        assert error_code(handle_request(raw, daemon, 0)) == code
    assert len(daemon.table) == 1  # nothing was kicked by a malformed request
    assert not caplog.records  # a client's mistake is its error reply, not a daemon log line


def test_view_failures_become_internal_errors() -> None:
    daemon = BrokenDaemon()
    assert error_code(handle_request(encode_request("status"), daemon, 0)) == ErrorCode.INTERNAL
    assert error_code(handle_request(encode_request("stats"), daemon, 0)) == ErrorCode.INTERNAL
    # and the daemon's other answers still work
    assert decode_reply(handle_request(encode_request("peers"), daemon, 0)) == {"peers": []}


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_always_get_a_reply(raw: bytes) -> None:
    answer = reply(handle_request(raw, FakeDaemon(owner_uid=0), 0))
    assert isinstance(answer["ok"], bool)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "cmd", "args", "extra"]),
        st.sampled_from([1, "kick", "status", {"id": 0}]) | _msgpack_values,
    )
)
def test_arbitrary_maps_never_kick_without_permission(request: dict[str, Any]) -> None:
    daemon = FakeDaemon(owner_uid=1000)
    daemon.join()
    answer = reply(handle_request(req(request), daemon, 4242))
    assert 0 in daemon.table
    assert isinstance(answer["ok"], bool)


# --- events, endpoints, credentials -----------------------------------------------------------


def test_publisher_sequence_and_encoding() -> None:
    publisher = EventPublisher(clock=lambda: 1234.5)
    joined = publisher.peer_joined(3, 2)
    left = publisher.peer_left(3, 2, "kicked")
    assert (joined.seq, left.seq) == (1, 2)
    assert publisher.last_seq == 2
    decoded = [decode_event(list(e.to_frames())) for e in publisher.take_pending()]
    assert decoded == [joined, left]
    assert decoded[1].kind == "peer-left" and decoded[1].reason == "kicked"
    assert publisher.take_pending() == []
    with pytest.raises(ValueError):
        publisher.publish("peer-exploded", 1, 1)
    assert publisher.last_seq == 2


def test_publisher_as_a_server_event_listener() -> None:
    publisher = EventPublisher()
    publisher.on_server_event("peer-joined", {"peer_id": 4, "vectors": 3, "pid": 99})
    publisher.on_server_event("peer-left", {"peer_id": 4, "vectors": 3, "reason": "slow"})
    publisher.on_server_event("shm-resized", {"peer_id": 0})
    events = publisher.take_pending()
    assert [(e.seq, e.kind, e.peer_id, e.vectors, e.reason) for e in events] == [
        (1, "peer-joined", 4, 3, None),
        (2, "peer-left", 4, 3, "slow"),
    ]


def test_publisher_carries_federation_members_and_their_peers() -> None:
    publisher = EventPublisher(clock=lambda: 7.0)
    info = {"member": "b", "endpoint": "ipc:///b.fed", "id_range": [1000, 1999], "state": "up"}
    publisher.on_member_event("member-joined", info)
    publisher.on_server_event("peer-joined", {"peer_id": 1000, "vectors": 2, "member": "b"})
    publisher.on_member_event(
        "member-refused", {**info, "reason": "vector count differs: b has 2, a has 1"}
    )
    publisher.on_member_event("member-exploded", info)
    events = publisher.take_pending()
    decoded = [decode_event(list(e.to_frames())) for e in events]
    assert decoded == events
    joined, peer, refused = decoded
    assert (joined.kind, joined.peer_id, joined.member) == ("member-joined", None, "b")
    assert (joined.endpoint, joined.id_range, joined.reason) == ("ipc:///b.fed", (1000, 1999), None)
    assert (peer.kind, peer.peer_id, peer.vectors, peer.member) == ("peer-joined", 1000, 2, "b")
    assert refused.reason == "vector count differs: b has 2, a has 1"


def test_a_peer_event_without_its_peer_id_is_refused() -> None:
    topic, body = EventPublisher().peer_joined(1, 1).to_frames()
    fields = msgpack.unpackb(body)
    fields["peer_id"] = None
    with pytest.raises(SchemaError, match="needs a peer_id"):
        decode_event([topic, msgpack.packb(fields)])
    del fields["peer_id"]
    with pytest.raises(SchemaError):
        decode_event([topic, msgpack.packb(fields)])
    for bad_range in ([1], "1-2", [1, "x"]):
        member = {"v": SCHEMA_VERSION, "seq": 1, "event": "member-left", "peer_id": None,
                  "vectors": 0, "time": 1.0, "member": "b", "id_range": bad_range}  # fmt: skip
        with pytest.raises(SchemaError):
            decode_event([b"member-left", msgpack.packb(member)])


def test_publisher_drops_oldest_when_nobody_drains() -> None:
    publisher = EventPublisher(max_pending=3)
    for peer_id in range(5):
        publisher.peer_joined(peer_id, 1)
    assert [e.seq for e in publisher.take_pending()] == [3, 4, 5]
    assert publisher.dropped == 2


def test_decode_event_rejects_garbage() -> None:
    good = list(EventPublisher().peer_joined(1, 1).to_frames())
    for frames in ([good[1]], [b"peer-left", good[1]], [good[0], b"\xc1"], [good[0], req({})]):
        with pytest.raises(SchemaError):
            decode_event(frames)


def test_sequence_tracker_reports_gaps() -> None:
    tracker = SequenceTracker()
    assert tracker.observe(41) is None  # late subscriber: no gap
    assert tracker.observe(42) is None
    assert tracker.observe(45) == (43, 44)
    assert tracker.missed == 2
    assert tracker.observe(1) is None  # daemon restarted
    assert tracker.observe(2) is None


def test_endpoints() -> None:
    assert default_control_endpoint("/run/ivshmem/ivshmem.sock") == (
        "ipc:///run/ivshmem/ivshmem.sock.ctl"
    )
    assert default_events_endpoint("/run/ivshmem/ivshmem.sock") == (
        "ipc:///run/ivshmem/ivshmem.sock.events"
    )
    assert default_control_endpoint("rel.sock") == f"ipc://{os.getcwd()}/rel.sock.ctl"
    assert events_endpoint_for("ipc:///run/x.sock.ctl") == "ipc:///run/x.sock.events"
    assert events_endpoint_for("tcp://10.0.0.1:7000") == "tcp://10.0.0.1:7001"
    with pytest.raises(ValueError):
        events_endpoint_for("ipc:///run/elsewhere")


def test_parse_peer_address() -> None:
    assert parse_peer_address("localhost:1000:100:4242") == Credentials(4242, 1000, 100)
    assert parse_peer_address(":0:0:1") == Credentials(1, 0, 0)
    assert parse_peer_address("127.0.0.1") is None
    assert parse_peer_address("") is None
    assert parse_peer_address(None) is None
    assert parse_peer_address("a:b:c:d") is None


# --- serve_control over real sockets ----------------------------------------------------------


async def ask(
    endpoint: str,
    cmd: str,
    args: dict[str, Any] | None = None,
    *,
    curve: tuple[bytes, bytes, bytes] | None = None,
    wait: float = 10,
) -> bytes:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = TrioSocket(ctx.socket(zmq.REQ))
    if curve is not None:
        for option, key in zip(
            (zmq.CURVE_PUBLICKEY, zmq.CURVE_SECRETKEY, zmq.CURVE_SERVERKEY), curve, strict=True
        ):
            sock.socket.setsockopt(option, key)
    sock.socket.connect(endpoint)
    try:
        with trio.fail_after(wait):
            await sock.send_multipart([encode_request(cmd, args)])
            (raw,) = await sock.recv_multipart()
            return raw
    finally:
        sock.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[FakeDaemon, ControlEndpoints, Path]]:
    sock_path = tmp_path / "d.sock"
    daemon = FakeDaemon(owner_uid=os.getuid(), publisher=EventPublisher())
    assert daemon.publisher is not None
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            serve_control,
            daemon,
            default_control_endpoint(sock_path),
            default_events_endpoint(sock_path),
            daemon.publisher,
        )
        yield daemon, bound, sock_path
        nursery.cancel_scope.cancel()


async def test_serve_status_and_file_modes(
    served: tuple[FakeDaemon, ControlEndpoints, Path],
) -> None:
    daemon, bound, sock_path = served
    daemon.join()
    for suffix in (".ctl", ".events"):
        mode = os.stat(f"{sock_path}{suffix}").st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert decode_reply(await ask(bound.control, "status"))["peers"] == 1
    # kick over ipc: the credentials come from SO_PEERCRED (we are the daemon's uid)
    assert decode_reply(await ask(bound.control, "kick", {"id": 0})) == {"kicked": 0}
    assert daemon.table == {}


async def test_serve_survives_bad_and_vanishing_clients(
    served: tuple[FakeDaemon, ControlEndpoints, Path],
) -> None:
    _, bound, _ = served
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    # garbage, a multi-frame request, an oversized one: error replies, server unharmed
    dealer = TrioSocket(ctx.socket(zmq.DEALER))
    dealer.socket.connect(bound.control)
    with trio.fail_after(10):
        for frames, code in (
            ([b"", b"\xc1"], ErrorCode.BAD_MSGPACK),
            ([b"", b"a", b"b"], ErrorCode.BAD_REQUEST),
            ([b"", b"\x00" * (MAX_REQUEST_BYTES + 1)], ErrorCode.TOO_LARGE),
        ):
            await dealer.send_multipart(frames)
            empty, raw = await dealer.recv_multipart()
            assert empty == b""
            assert error_code(raw) == code
    dealer.close()
    # clients that send and vanish before the reply, many of them
    for _ in range(50):
        gone = ctx.socket(zmq.REQ)
        gone.connect(bound.control)
        gone.send(encode_request("status"))
        gone.close(linger=0)
    # a message above the hard limit: libzmq drops that connection, others carry on
    huge = ctx.socket(zmq.DEALER)
    huge.connect(bound.control)
    huge.send_multipart([b"", b"\x00" * (HARD_MAX_MESSAGE_BYTES + 1)])
    assert decode_reply(await ask(bound.control, "stats"))["joins"] == 0
    huge.close(linger=0)


async def test_thousand_join_leave_cycles_arrive_in_sequence(
    served: tuple[FakeDaemon, ControlEndpoints, Path],
) -> None:
    daemon, bound, _ = served
    sub_raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub_raw.setsockopt(zmq.RCVHWM, 0)
    sub_raw.setsockopt(zmq.SUBSCRIBE, b"")
    sub_raw.connect(bound.events)
    sub = TrioSocket(sub_raw)
    cycles = 1000
    with trio.fail_after(30):
        assert await sub.recv_multipart() == [EVENTS_WELCOME]
        for _ in range(cycles):
            daemon.leave(daemon.join())
        tracker = SequenceTracker()
        kinds: list[str] = []
        for _ in range(2 * cycles):
            event = decode_event(await sub.recv_multipart())
            assert tracker.observe(event.seq) is None
            kinds.append(event.kind)
    assert tracker.last_seq == 2 * cycles
    assert kinds == ["peer-joined", "peer-left"] * cycles
    sub.close()


async def test_stalled_subscriber_and_garbage_clients_do_not_stall_the_daemon(
    served: tuple[FakeDaemon, ControlEndpoints, Path],
) -> None:
    daemon, bound, sock_path = served
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    stalled_raw: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    stalled_raw.setsockopt(zmq.RCVHWM, 1)
    stalled_raw.setsockopt(zmq.RCVBUF, 4096)
    stalled_raw.setsockopt(zmq.SUBSCRIBE, b"")
    stalled_raw.connect(bound.events)
    healthy_raw: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    healthy_raw.setsockopt(zmq.RCVHWM, 0)
    healthy_raw.setsockopt(zmq.SUBSCRIBE, b"")
    healthy_raw.connect(bound.events)
    stalled, healthy = TrioSocket(stalled_raw), TrioSocket(healthy_raw)
    cycles = 2000
    with trio.fail_after(30):
        assert await stalled.recv_multipart() == [EVENTS_WELCOME]
        assert await healthy.recv_multipart() == [EVENTS_WELCOME]
        # not zmq at all: raw bytes on both unix sockets; libzmq drops these connections
        for suffix in (".ctl", ".events"):
            with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM) as junk:
                await junk.connect(f"{sock_path}{suffix}")
                await junk.send(b"GET / HTTP/1.0\r\n\r\n" * 100)
        for _ in range(cycles):
            daemon.leave(daemon.join())
        # the stalled subscriber never reads; the daemon still answers and still publishes
        assert decode_reply(await ask(bound.control, "stats"))["joins"] == cycles
        seqs: list[int] = []
        while len(seqs) < 2 * cycles:
            frames = await healthy.recv_multipart()
            if frames != [EVENTS_WELCOME]:  # another subscriber's greeting
                seqs.append(decode_event(frames).seq)
    assert seqs == list(range(1, 2 * cycles + 1))
    stalled.close()
    healthy.close()


async def test_idle_control_plane_does_not_spin(
    served: tuple[FakeDaemon, ControlEndpoints, Path], task_steps: TaskSteps
) -> None:
    """Counted, not timed: with a subscriber connected and nothing happening, the server's
    tasks stay parked; each event then wakes them a bounded number of times."""
    daemon, bound, _ = served
    sub_raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub_raw.setsockopt(zmq.SUBSCRIBE, b"")
    sub_raw.connect(bound.events)
    sub = TrioSocket(sub_raw)
    with trio.fail_after(10):
        assert await sub.recv_multipart() == [EVENTS_WELCOME]
    await trio.testing.wait_all_tasks_blocked()
    me = trio.lowlevel.current_task()
    parked = task_steps.besides(me)
    await trio.sleep(OBSERVATION_WINDOW)  # nothing happens: nothing may run
    idle = task_steps.besides(me) - parked
    assert idle <= SPURIOUS_WAKEUPS, idle
    for _ in range(EVENTS // 2):
        daemon.leave(daemon.join())
    with trio.fail_after(10):
        for _ in range(EVENTS):
            await sub.recv_multipart()
    busy = task_steps.besides(me) - parked - idle
    assert busy <= WAKEUPS_PER_EVENT * EVENTS + SPURIOUS_WAKEUPS, busy
    sub.close()


def request_as(uid: int, endpoint: str, cmd: str, args: dict[str, Any], wait_ms: int) -> Any:
    """In a child forked from this process that became ``uid`` (no re-exec, see
    tests.asuser): one request; its decoded reply, or ``{"timeout": True}``."""

    def child() -> int:
        sock = zmq.Context().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": 1, "cmd": cmd, "args": args}))
        if not sock.poll(wait_ms):
            print(json.dumps({"timeout": True}))
        else:
            print(json.dumps(msgpack.unpackb(sock.recv(), raw=False)))
        return 0

    status, output = run_as(uid, child)
    assert status == 0, output
    return json.loads(output)


async def run_as_uid(uid: int, endpoint: str, cmd: str, args: dict[str, Any], wait_ms: int) -> Any:
    return await trio.to_thread.run_sync(request_as, uid, endpoint, cmd, args, wait_ms)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client under another uid")
async def test_other_uid_cannot_kick_and_mode_0600_keeps_it_out(world_dir: str) -> None:
    daemon = FakeDaemon(owner_uid=0)
    daemon.join()
    refusals: list[Credentials] = []

    def allow(creds: Credentials) -> str | None:
        if creds.uid == 4444:
            raise RuntimeError("a buggy hook")
        if creds.uid == 4321:
            refusals.append(creds)
            return "uid 4321 is not allowed"
        return None

    async with trio.open_nursery() as nursery:
        # 0666 so that uid NOBODY can connect and reach the kick permission check
        open_ep = await nursery.start(
            lambda task_status: serve_control(
                daemon,
                f"ipc://{world_dir}/open.ctl",
                f"ipc://{world_dir}/open.events",
                EventPublisher(),
                socket_mode=0o666,
                access=ControlAccess(allow=allow),
                task_status=task_status,
            )
        )
        answer = await run_as_uid(NOBODY, open_ep.control, "kick", {"id": 0}, 10_000)
        assert answer["ok"] is False
        assert answer["error"]["code"] == ErrorCode.PERMISSION_DENIED
        assert f"uid {NOBODY}" in answer["error"]["message"]
        assert 0 in daemon.table
        status = await run_as_uid(NOBODY, open_ep.control, "status", {}, 10_000)
        assert status["ok"] is True
        # the allow hook sees SO_PEERCRED and turns uid 4321 away during the handshake:
        # its connection never carries a request
        refused = await run_as_uid(4321, open_ep.control, "status", {}, 1_000)
        assert refused == {"timeout": True}
        assert refusals and all(c.uid == 4321 for c in refusals)
        # a hook that raises refuses the connection, and the server keeps serving
        buggy = await run_as_uid(4444, open_ep.control, "status", {}, 1_000)
        assert buggy == {"timeout": True}
        assert (await run_as_uid(NOBODY, open_ep.control, "status", {}, 10_000))["ok"] is True
        # default 0600: another uid cannot even connect, so it never gets an answer
        closed_ep = await nursery.start(
            serve_control,
            daemon,
            f"ipc://{world_dir}/closed.ctl",
            f"ipc://{world_dir}/closed.events",
            EventPublisher(),
        )
        assert (await run_as_uid(NOBODY, closed_ep.control, "status", {}, 500)) == {"timeout": True}
        assert (await run_as_uid(0, closed_ep.control, "status", {}, 10_000))["ok"] is True
        nursery.cancel_scope.cancel()
    assert not os.listdir(world_dir), "ipc socket files are removed on exit"


async def test_setup_errors_are_clear(tmp_path: Path) -> None:
    publisher = EventPublisher()
    daemon = FakeDaemon()
    long_path = "/tmp/" + "x" * 200
    async with trio.open_nursery() as nursery:
        with pytest.raises(ControlSetupError, match="longer than"):
            await nursery.start(
                serve_control, daemon, f"ipc://{long_path}", f"ipc://{long_path}.e", publisher
            )
        with pytest.raises(ControlSetupError, match="cannot bind"):
            public, secret = zmq.curve_keypair()
            await nursery.start(
                lambda task_status: serve_control(
                    daemon, "tcp://256.1.1.1:1", f"ipc://{tmp_path}/e", publisher,
                    access=ControlAccess(curve=CurveKeys(public, secret, frozenset())),
                    task_status=task_status,
                )
            )  # fmt: skip


async def test_tcp_is_served_only_with_curve() -> None:
    daemon = FakeDaemon(owner_uid=os.getuid())
    daemon.join()
    async with trio.open_nursery() as nursery:
        with pytest.raises(ControlSetupError, match="only with CURVE"):
            await nursery.start(
                serve_control, daemon, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", EventPublisher()
            )


async def test_tcp_with_curve_resolves_port_serves_known_keys_only_and_carries_no_uid() -> None:
    daemon = FakeDaemon(owner_uid=os.getuid())
    daemon.join()
    server_public, server_secret = zmq.curve_keypair()
    alice_public, alice_secret = zmq.curve_keypair()
    mallory_public, mallory_secret = zmq.curve_keypair()
    keys = CurveKeys(server_public, server_secret, frozenset({alice_public}))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: serve_control(
                daemon, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", EventPublisher(),
                access=ControlAccess(curve=keys), task_status=task_status,
            )
        )  # fmt: skip
        assert not bound.control.endswith(":*")
        alice = (alice_public, alice_secret, server_public)
        assert decode_reply(await ask(bound.control, "status", curve=alice))["peers"] == 1
        # no credentials over tcp: kick is refused even for the daemon's own uid
        assert error_code(await ask(bound.control, "kick", {"id": 0}, curve=alice)) == (
            ErrorCode.PERMISSION_DENIED
        )
        # an unknown key, or no CURVE at all, never gets an answer
        mallory = (mallory_public, mallory_secret, server_public)
        with pytest.raises(trio.TooSlowError):
            await ask(bound.control, "status", curve=mallory, wait=0.5)
        with pytest.raises(trio.TooSlowError):
            await ask(bound.control, "status", wait=0.5)
        nursery.cancel_scope.cancel()
