"""The ring format as pure functions: checksums, records, the ring header, the index
arithmetic and the sleep thresholds (no processes: :mod:`peers.plugins.ringformat`)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from peers.plugins.ringformat import (
    CHECKSUMS,
    HEADER_READ,
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    VERSION,
    RingHeader,
    bad_records,
    batch_bytes,
    build_records,
    checksum_at,
    checksum_crc32,
    checksum_sum64,
    head_event_passed,
    parse_records,
    producer_wake_tail,
    record_size,
    spans,
    sum64_of_records,
    tail_event_reached,
    unstamped_sums,
    used,
)


def test_checksums_catch_a_flipped_byte_and_count_every_byte() -> None:
    payload = bytearray(os.urandom(4099))  # not a whole number of words: the tail counts
    for checksum in (checksum_sum64, checksum_crc32):
        good = checksum(bytes(payload))
        for where in (0, 8, 4096, 4098):
            payload[where] ^= 1
            assert checksum(bytes(payload)) != good, (checksum.__name__, where)
            payload[where] ^= 1
        assert checksum(bytes(payload)) == good
    assert checksum_sum64(b"") != checksum_sum64(b"\0")  # the length is part of it


def test_checksums_in_place_match_the_plain_checksums() -> None:
    buf = memoryview(bytearray(os.urandom(8192)))
    words = np.frombuffer(buf, np.uint64)
    for kind, plain in CHECKSUMS.items():
        for start, n in [(0, 0), (0, 8192), (32, 4096), (8, 4099), (4096, 1), (64, 7)]:
            assert checksum_at(kind, buf, words, start, n) == plain(bytes(buf[start : start + n]))
    with pytest.raises(ValueError, match="8-byte aligned"):
        checksum_at("sum64", buf, words, 4, 16)


@pytest.mark.parametrize(
    ("ring", "largest"),
    [(8192, 1088), (1 << 20, 65600), (69632, 65600), (65600, 65600), (4096, 64)],
)
def test_the_sleep_thresholds_never_let_both_sides_sleep(ring: int, largest: int) -> None:
    batch = batch_bytes(ring, largest)
    assert 0 <= batch <= ring // 4 and batch <= ring - largest
    tail = 0  # indices are free-running: only differences matter
    for rec in range(64, largest + 1, 64):
        for head in range(tail + ring - rec + 64, tail + ring + 1, 64):  # no room for rec
            want = head - ring + max(batch, rec)  # the tail the blocked producer waits for
            assert tail < want <= head  # reachable, and it frees room for rec
            # the consumer sleeps only with head <= its tail + batch, i.e. past ``want``:
            # its release reaching ``want`` rang the producer, so both never sleep
            assert head > tail + batch and head - batch >= want


def test_records_are_cache_line_aligned_and_hold_header_and_payload() -> None:
    assert record_size(1) == 64
    assert record_size(32) == 64
    assert record_size(33) == 128
    assert record_size(65536) == 65536 + 64


def test_the_batch_checksum_is_the_per_record_checksum() -> None:
    length, count = 1024, 5
    rec = record_size(length)
    buf = memoryview(bytearray(os.urandom(rec * count)))
    words = np.frombuffer(buf, np.uint64)
    singles = [checksum_at("sum64", buf, words, j * rec + RECORD_HEADER_SIZE, length)
               for j in range(count)]  # fmt: skip
    assert sum64_of_records(words, count, rec, length) == singles


@pytest.mark.parametrize(("kind", "length"), [("sum64", 1024), ("sum64", 1001), ("crc32", 64)])
def test_records_built_are_parsed_back_and_verify(kind: str, length: int) -> None:
    count, first = 6, (1 << 32) - 2  # the header's sequence number wraps at 32 bits
    rec = record_size(length)
    stage = memoryview(bytearray(os.urandom(rec * count)))
    words = np.frombuffer(stage, np.uint64)
    build_records(stage, words, count, length, first, kind)
    window = parse_records(stage, len(stage), first, length, count * length, len(stage))
    assert window.problem is None
    assert (window.count, window.size, window.payload) == (count, count * rec, count * length)
    assert window.offsets == [j * rec for j in range(count)]
    assert bad_records(stage, words, window, kind, length) == []
    if length >= 16:  # stamped: no two payloads alike
        payloads = {bytes(stage[o + RECORD_HEADER_SIZE : o + rec]) for o in window.offsets}
        assert len(payloads) == count
    stage[2 * rec + RECORD_HEADER_SIZE + length // 2] ^= 0x5A  # damage message 3's payload
    assert [j for j, _ in bad_records(stage, words, window, kind, length)] == [2]


def test_parsing_stops_at_the_window_the_wanted_bytes_or_a_bad_header() -> None:
    length, count = 100, 4
    rec = record_size(length)
    stage = memoryview(bytearray(rec * count))
    words = np.frombuffer(stage, np.uint64)
    build_records(stage, words, count, length, 1, "sum64")
    partial = parse_records(stage, 2 * rec + 10, 1, length, count * length, count * rec)
    assert (partial.count, partial.problem) == (2, None)  # the third continues: next window
    assert parse_records(stage, len(stage), 1, length, 150, len(stage)).count == 2  # wanted
    assert "runs past" in str(parse_records(stage, 2 * rec + 10, 1, length, 10**6,
                                            2 * rec + 10).problem)  # fmt: skip
    out_of_order = parse_records(stage, len(stage), 2, length, 10**6, len(stage))
    assert "corrupt record header" in str(out_of_order.problem) and out_of_order.count == 0
    too_long = parse_records(stage, len(stage), 1, length - 1, 10**6, len(stage))
    assert too_long.problem is not None and too_long.problem_at == 0


def test_the_ring_header_round_trips_and_is_checked() -> None:
    shm = 1 << 20
    good = RingHeader(VERSION, 0, 1, HEADER_SIZE, shm - HEADER_SIZE, 42, 10_000, 123, 4096)
    raw = bytes(8) + good.pack()
    assert len(raw) <= HEADER_READ
    assert RingHeader.unpack(raw) == good
    assert good.problem(shm) is None
    for field, value in [("version", VERSION + 1), ("checksum", len(CHECKSUMS)),
                         ("data_offset", 0), ("ring_size", 5000), ("ring_size", shm),
                         ("total", 0), ("max_message", 0), ("max_message", shm)]:  # fmt: skip
        bad = RingHeader(**{**{f: getattr(good, f) for f in good.__slots__}, field: value})
        assert bad.problem(shm) is not None, (field, value)


def test_spans_cut_an_access_where_the_ring_wraps() -> None:
    assert spans(100, 50, 4096) == ((100, 0, 50),)
    assert spans(4096 * 3 + 4000, 200, 4096) == ((4000, 0, 96), (0, 96, 104))
    assert spans(4096, 4096, 4096) == ((0, 0, 4096),)
    assert used(4096 * 5 + 10, 4096 * 5) == 10  # free-running: only the difference matters


@pytest.mark.parametrize(("checked", "event", "index", "head_rings", "tail_rings"), [
    (0, 0, 64, True, False),  # the consumer waits for record 1: head 64 passes event 0
    (64, 64, 128, True, False),  # the tail event was reached by the last release
    (64, 100, 128, True, True),
    (128, 64, 192, False, False),  # an event already behind us: no doorbell
    (0, 128, 64, False, False),  # not reached yet
    (0, 64, 64, False, True),  # tail reaches it exactly; head must pass it
])  # fmt: skip
def test_event_indices_say_when_to_ring(
    checked: int, event: int, index: int, head_rings: bool, tail_rings: bool
) -> None:
    assert head_event_passed(checked, event, index) is head_rings
    assert tail_event_reached(checked, event, index) is tail_rings


def test_a_blocked_producer_waits_for_a_batch_or_its_record() -> None:
    ring, batch = 8192, 2048
    assert producer_wake_tail(head=8192, ring=ring, batch=batch, record=64) == 2048
    assert producer_wake_tail(head=8192, ring=ring, batch=batch, record=4096) == 4096


@pytest.mark.parametrize("length", [16, 1024, 65536])
def test_a_batch_built_from_unstamped_sums_is_the_batch_built_by_summing(length: int) -> None:
    """The O(1)-per-record checksums give exactly the bytes of the full pass, batch after
    batch (the slots keep their unstamped content), whatever the sequence numbers."""
    count = 5
    rec = record_size(length)
    content = os.urandom(rec * count)
    summed, derived = (memoryview(bytearray(content)) for _ in range(2))
    summed_words, derived_words = (
        np.frombuffer(summed, np.uint64),
        np.frombuffer(derived, np.uint64),
    )
    unstamped = unstamped_sums(derived_words, count, length)
    for first in (1, (1 << 32) - 2, (1 << 64) // 0x9E3779B97F4A7C15 + 3):
        for k in (count, 2):
            build_records(summed, summed_words, k, length, first, "sum64")
            build_records(derived, derived_words, k, length, first, "sum64", unstamped)
            assert bytes(summed) == bytes(derived)
            window = parse_records(derived, k * rec, first, length, k * length, k * rec)
            assert window.count == k and bad_records(derived, derived_words, window, "sum64",
                                                     length) == []  # fmt: skip


def test_headers_checked_as_columns_parse_as_one_by_one() -> None:
    length, count = 256, 40  # enough records for the column check
    rec = record_size(length)
    stage = memoryview(bytearray(os.urandom(rec * count)))
    words = np.frombuffer(stage, np.uint64)
    build_records(stage, words, count - 1, length, 7, "sum64")
    build_records(stage[(count - 1) * rec :], words[(count - 1) * rec // 8 :], 1, 100, 7 + count
                  - 1, "sum64")  # fmt: skip
    args = (stage, len(stage), 7, length, 10**9, len(stage))
    assert parse_records(*args, words) == parse_records(*args)  # the shorter last one too
    stage[20 * rec + 4] ^= 1  # record 21's sequence number: a problem found at its offset
    columns, single = parse_records(*args, words), parse_records(*args)
    assert columns == single and columns.count == 20 and columns.problem_at == 20 * rec
    assert "corrupt record header" in str(columns.problem)
    partial = parse_records(stage, 30 * rec + 10, 7, length, 10**9, len(stage), words)
    assert partial == parse_records(stage, 30 * rec + 10, 7, length, 10**9, len(stage))
