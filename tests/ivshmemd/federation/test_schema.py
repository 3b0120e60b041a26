"""Tests of the daemon-to-daemon frames: round trips, and strict refusal of anything else."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmemd.federation.schema import (
    DIFF_PART_BYTES,
    HARD_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MAX_GOSSIP_ENTRIES,
    MAX_RING_COUNT,
    RESERVED_KINDS,
    SCHEMA_VERSION,
    After,
    Bye,
    Diff,
    Frame,
    FrameError,
    Gossip,
    GossipEntry,
    Hello,
    HelloAck,
    Kind,
    PeerJoined,
    PeerLeft,
    Ping,
    Pong,
    Refuse,
    RegionRequest,
    Resync,
    Ring,
    Synced,
    decode_frame,
    decode_ring,
    encode_frame,
    encode_ring,
)

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

text = st.text(min_size=1, max_size=40)
peer = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)
times = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    lo = draw(peer)
    hi = draw(st.integers(lo, 0xFFFF))
    session = draw(st.integers(0, 2**64 - 1))
    nonce = draw(st.integers(1, 2**64 - 1)) if session == 0 else 0
    return Hello(
        draw(text),
        draw(st.text(min_size=1, max_size=64)),
        draw(text),
        (lo, hi),
        draw(u64),
        draw(st.integers(0, 64)),
        session,
        nonce,
        draw(u64),
        draw(u64),
    )


frames: st.SearchStrategy[Frame] = st.one_of(
    hellos(),
    st.builds(HelloAck, u64),
    st.builds(Refuse, text, st.text(min_size=1, max_size=64), st.text(max_size=100)),
    st.builds(
        Gossip,
        st.lists(st.builds(GossipEntry, text, text, st.sampled_from(["", KEY])), max_size=8).map(
            tuple
        ),
    ),
    st.builds(Resync, st.text(max_size=50)),
    st.just(Synced()),
    st.builds(PeerJoined, peer, st.integers(0, 64)),
    st.builds(PeerLeft, peer),
    st.builds(Ring, peer, st.integers(0, 63), st.integers(1, MAX_RING_COUNT)),
    st.builds(Ping, times),
    st.builds(Pong, times),
    st.builds(Bye, st.booleans(), st.text(max_size=50)),
)


@given(frame=frames, seq=u64)
def test_every_frame_round_trips(frame: Frame, seq: int) -> None:
    raw = encode_frame(frame, seq)
    assert decode_frame(raw) == (seq, frame)
    if isinstance(frame, Ring):
        assert decode_ring(raw) == (seq, frame.peer_id, frame.vector, frame.count)
        assert raw == encode_ring(seq, frame.peer_id, frame.vector, frame.count)
    else:
        assert decode_ring(raw) is None


def test_every_kind_has_a_frame_class() -> None:
    seen = set()
    for frame in (
        Synced(),
        PeerLeft(1),
        HelloAck(1),
        Resync(""),
        Bye(False, ""),
        Ping(0.0),
        Pong(0.0),
        Ring(1, 0, 1),
        PeerJoined(1, 1),
        Gossip(()),
        Refuse("a", "b", ""),
        Hello("a", "b", "c", (0, 0), 0, 0, 1, 0, 0, 0),
        Diff(
            3, 9, Diff.REGION, 0, True, b"\x10" + bytes(7), b"\x02" + bytes(3), b"xy", (("a", 2),)
        ),
        After((("a", 1), ("b", 7))),
        RegionRequest("joining"),
    ):
        seen.add(frame.KIND)
        assert decode_frame(encode_frame(frame, 7))[1] == frame
    assert seen == set(Kind)


def _raw(*items: Any) -> bytes:
    packed: bytes = msgpack.packb(list(items), use_bin_type=True)
    return packed


V = SCHEMA_VERSION


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (_raw(V, 9, 1, 2, 0, 1) + b"\x00", "not valid msgpack"),  # trailing bytes
        (msgpack.packb({"v": 1}), "msgpack array"),
        (msgpack.packb(5), "msgpack array"),
        (_raw(V, 9), "msgpack array"),
        (_raw(2, 9, 1, 2, 0, 1), "unsupported schema version int 2 (this daemon speaks version 1)"),
        (_raw("1", 9, 1, 2, 0, 1), "unsupported schema version str"),
        (_raw(True, 9, 1, 2, 0, 1), "unsupported schema version bool"),
        (_raw(V, 99, 1), "unknown frame kind int 99"),
        (_raw(V, "ring", 1), "unknown frame kind str"),
        (_raw(V, 40, 1), "reserved for memory replication"),
        (_raw(V, 9, -1, 2, 0, 1), "RING.seq must be an integer"),
        (_raw(V, 9, 1, 2, 0), "RING frame has 2 fields, expected 3 (peer_id, vector, count)"),
        (_raw(V, 9, 1, 2, 0, 1, 1), "RING frame has 4 fields"),
        (_raw(V, 9, 1, 70000, 0, 1), "RING.peer_id must be an integer in 0..65535"),
        (_raw(V, 9, 1, 2, 64, 1), "RING.vector must be an integer in 0..63"),
        (_raw(V, 9, 1, 2, 0, 0), "RING.count must be an integer in 1.."),
        (_raw(V, 9, 1, 2, 0, True), "RING.count must be an integer"),
        (_raw(V, 9, 1, 2.0, 0, 1), "RING.peer_id must be an integer"),
        (_raw(V, 9, 1, b"\x02", 0, 1), "RING.peer_id must be an integer"),
        (_raw(V, 10, 1, 5), "PING.sent_at must be a finite float"),
        (_raw(V, 10, 1, float("nan")), "PING.sent_at must be a finite float"),
        (_raw(V, 12, 1, 1, "x"), "BYE.restarting must be a boolean"),
        (_raw(V, 7, 1, 2, 65), "PEER_JOINED.vectors must be an integer in 0..64"),
        (_raw(V, 1, 0, "a", "i", "e", [5, 4], 0, 1, 1, 0, 0, 0), "HELLO.id_range"),
        (_raw(V, 1, 0, "a", "i", "e", [0], 0, 1, 1, 0, 0, 0), "HELLO.id_range"),
        (_raw(V, 1, 0, "", "i", "e", [0, 4], 0, 1, 1, 0, 0, 0), "HELLO.identity must not be"),
        (_raw(V, 1, 0, "a", "i", "e", [0, 4], 0, 1, 0, 0, 0, 0), "a probe (session 0) needs"),
        (_raw(V, 1, 0, "a", "i", "e", [0, 4], 0, 1, 1, 9, 0, 0), "a probe (session 0) needs"),
        (_raw(V, 1, 0, "a" * 129, "i", "e", [0, 4], 0, 1, 1, 0, 0, 0), "at most 128"),
        (_raw(V, 4, 1, [["a", "e", "short"]]), "key must be '' or a 40-character"),
        (_raw(V, 4, 1, [["a", "e"]]), "GOSSIP.members[0] must be [identity, endpoint, key]"),
        (_raw(V, 4, 1, [["a", "e", ""]] * (MAX_GOSSIP_ENTRIES + 1)), "at most 256 entries"),
        (_raw(V, 3, 1, "a", "", "r"), "REFUSE.code must not be empty"),
        (b"\x96\x01\x09\x01\x02", "not valid msgpack"),  # a truncated ring
        (b"\x96\x01\x09\xff\x02\x00\x01", "RING.seq"),
    ],
)
def test_bad_frames_raise_a_clear_frame_error(raw: bytes, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_frame(raw)
    assert message in str(caught.value)
    if raw[:3] == bytes((0x96, V, Kind.RING)):  # looks like a ring: the doorbell path says so
        with pytest.raises(FrameError) as again:
            decode_ring(raw)
        assert str(again.value) == str(caught.value)
    else:
        assert decode_ring(raw) is None


def test_an_oversize_frame_is_refused_before_it_is_parsed() -> None:
    raw = _raw(V, 6, 1) + b"\x00" * MAX_FRAME_BYTES
    with pytest.raises(FrameError, match=f"over the limit of {MAX_FRAME_BYTES}"):
        decode_frame(raw)


def test_invalid_utf8_in_a_string_is_a_frame_error() -> None:
    raw = b"\x94\x01\x05\x01\xa2\xff\xfe"  # RESYNC with a non-UTF-8 reason
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode_frame(raw)


def test_memory_kinds_are_the_reserved_ones_part_two_uses() -> None:
    memory = {Kind.DIFF, Kind.AFTER, Kind.REGION_REQUEST}
    assert memory <= set(RESERVED_KINDS)
    assert set(RESERVED_KINDS).isdisjoint(int(kind) for kind in set(Kind) - memory)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((1, 1, 0, 0, True, bytes(8), bytes(4), b"x", ()), "runs cover 0 bytes but it carries 1"),
        ((1, 1, 0, 0, True, bytes(8), bytes(8), b"", ()), "not the same number"),
        ((1, 1, 4, 0, True, b"", b"", b"", ()), "DIFF.flags"),
        ((1, 1, 0, 0, True, "x", b"", b"", ()), "DIFF.offsets must be bytes"),
        ((1, 1, 0, 0, True, b"", b"", b"", (("a",),)), "DIFF.vector[0] must be [identity, seq]"),
    ],
)
def test_bad_diffs_raise_a_clear_frame_error(fields: tuple[Any, ...], message: str) -> None:
    with pytest.raises(FrameError, match=re.escape(message)):
        decode_frame(_raw(V, Kind.DIFF, 1, *fields))


def test_a_diff_may_fill_a_zmq_message_and_no_more() -> None:
    data = bytes(DIFF_PART_BYTES)
    lengths = len(data).to_bytes(4, "little")
    raw = encode_frame(Diff(1, 1, 0, 0, True, bytes(8), lengths, data, ()), 1)
    assert MAX_FRAME_BYTES < len(raw) <= HARD_MAX_FRAME_BYTES
    assert decode_frame(raw)[1] == Diff(1, 1, 0, 0, True, bytes(8), lengths, data, ())
    with pytest.raises(FrameError, match="over the limit"):
        decode_frame(_raw(V, 6, 1) + bytes(HARD_MAX_FRAME_BYTES))
