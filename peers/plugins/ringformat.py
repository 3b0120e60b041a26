"""The ``ring`` plugin's format in the shared memory, as pure data and functions: the layout,
the ring header, the records, the checksums and the index arithmetic. No vCPU, no doorbell:
:mod:`peers.plugins.ring` moves the bytes; this module says what they mean.

Layout (all integers little-endian, each index on its own cache line)::

    0x000  magic u64 | version u32 | checksum kind u16 | producer's doorbell vector u16
           data offset u64 | ring size u64 | session u64 | total bytes u64
           start time u64 (CLOCK_MONOTONIC ns) | max message u64
    0x040  head u64        bytes the producer has published (free-running)
    0x080  tail u64        bytes the consumer has released (free-running)
    0x0c0  head event u64  the consumer asks for a doorbell once ``head`` passes this value
    0x100  tail event u64  the producer asks for a doorbell once ``tail`` reaches this value
    0x1000 data area, ``ring size`` bytes (a multiple of the page size)

A message is a record at a 64-byte aligned ring offset: a 32-byte header (tag, sequence
number, payload length, checksum of the payload) and the payload; a record may wrap around
the end of the data area, its header never does. The indices are free-running byte counts:
only their differences matter (:func:`used`), and a ring offset is an index modulo the ring
size (:func:`spans` cuts an access where it wraps).

The checksum is a 64-bit sum of the payload's little-endian words plus its length
(:func:`checksum_sum64`, C speed through numpy) or zlib's CRC-32; the header records which.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHECKSUMS",
    "HEADER_SIZE",
    "PAGE_SIZE",
    "RECORD_HEADER",
    "WINDOW",
    "RingHeader",
    "bad_records",
    "batch_bytes",
    "build_records",
    "checksum_at",
    "checksum_crc32",
    "checksum_sum64",
    "head_event_passed",
    "parse_records",
    "record_size",
    "records_per_window",
    "spans",
    "tail_event_reached",
    "unstamped_sums",
    "used",
]

PAGE_SIZE: Final = 4096
#: The ring header occupies the first page of BAR2; the data area starts at the next one.
HEADER_SIZE: Final = PAGE_SIZE
MAGIC: Final = int.from_bytes(b"IVSHRING", "little")
VERSION: Final = 2
OFF_MAGIC: Final = 0x00
OFF_CONFIG: Final = 0x08  # version .. max message, after the magic
OFF_HEAD: Final = 0x40
OFF_TAIL: Final = 0x80
OFF_HEAD_EVENT: Final = 0xC0
OFF_TAIL_EVENT: Final = 0x100
#: The indices, in the order the producer zeroes them.
INDEX_OFFSETS: Final = (OFF_HEAD, OFF_TAIL, OFF_HEAD_EVENT, OFF_TAIL_EVENT)
#: Bytes of the header read at once (magic and config).
HEADER_READ: Final = OFF_HEAD
#: version, checksum kind, producer vector, data offset, ring, session, total, start, max message
CONFIG: Final = struct.Struct("<IHHQQQQQQ")
RECORD_ALIGN: Final = 64
RECORD_TAG: Final = 0x52454344  # "DCER" little-endian: a record starts here
RECORD_HEADER: Final = struct.Struct("<IIQQQ")  # tag, seq, length, checksum, reserved
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size
#: A record's header carries the low 32 bits of its sequence number.
SEQ_MASK: Final = 0xFFFF_FFFF
#: First payload word of record ``j`` in a window seen as 64-bit words: ``j * step + this``.
PAYLOAD_WORD: Final = RECORD_HEADER_SIZE // 8
MAX_MESSAGE: Final = 1 << 30
#: Each side moves about this many bytes of whole records (at least one) per guest access.
WINDOW: Final = 512 << 10
#: A sleeping side waits for 1/WAKE_FRACTION of the ring (see :func:`batch_bytes`).
WAKE_FRACTION: Final = 4
#: Fewer records than this in a window are parsed one by one: below it a dozen numpy calls
#: cost more than the per-record unpacking they replace.
COLUMN_RECORDS: Final = 16
#: A payload's last word is its sequence number times this: no two messages are alike.
STAMP: Final = 0x9E37_79B9_7F4A_7C15
MASK64: Final = (1 << 64) - 1

Words = npt.NDArray[np.uint64]
Payload = bytes | bytearray | memoryview


# -- checksums -----------------------------------------------------------------------------


def checksum_sum64(payload: Payload) -> int:
    """The payload's little-endian 64-bit words summed modulo 2**64 (a short tail counts as
    one zero-padded word), plus its length: one numpy reduction, C speed."""
    n = len(payload)
    words = n >> 3
    total = int(np.add.reduce(np.frombuffer(payload, np.uint64, words))) if words else 0
    if n & 7:
        total += int.from_bytes(payload[words << 3 :], "little")
    return (total + n) & MASK64


def checksum_crc32(payload: Payload) -> int:
    """zlib's CRC-32 of the payload (slower than ``sum64``, also catches reordering)."""
    return zlib.crc32(payload)


#: Checksum kinds by name; the index is what the ring header records.
CHECKSUMS: Final[dict[str, Callable[[Payload], int]]] = {
    "sum64": checksum_sum64,
    "crc32": checksum_crc32,
}
CHECKSUM_NAMES: Final = list(CHECKSUMS)


def _sum64_at(buf: memoryview, words: Words, start: int, n: int) -> int:
    k = n >> 3
    w = start >> 3
    total = int(np.add.reduce(words[w : w + k]))
    if n & 7:
        total += int.from_bytes(buf[start + (k << 3) : start + n], "little")
    return (total + n) & MASK64


def _crc32_at(buf: memoryview, words: Words, start: int, n: int) -> int:
    return zlib.crc32(buf[start : start + n])


ChecksumAt = Callable[[memoryview, Words, int, int], int]
#: The same checksums of ``buf[start:start + n]`` (``start`` a multiple of 8), where
#: ``words`` is ``buf`` seen as 64-bit words: no new array object per message.
CHECKSUMS_AT: Final[dict[str, ChecksumAt]] = {"sum64": _sum64_at, "crc32": _crc32_at}


def checksum_at(kind: str, buf: memoryview, words: Words, start: int, n: int) -> int:
    """Checksum ``kind`` of ``buf[start:start + n]``; ``start`` is a multiple of 8 and
    ``words`` is ``buf`` seen as little-endian 64-bit words (the hot path's form)."""
    if start & 7:
        raise ValueError(f"checksum_at needs an 8-byte aligned start, got {start}")
    return CHECKSUMS_AT[kind](buf, words, start, n)


def sum64_of_records(words: Words, count: int, record: int, length: int) -> list[int]:
    """The ``sum64`` checksums of ``count`` uniform records laid out from the start of
    ``words`` (each ``record`` bytes, ``length`` payload bytes, a multiple of 8): one numpy
    reduction for them all."""
    step = record >> 3
    table = words[: count * step].reshape(count, step)
    sums = np.add.reduce(table[:, PAYLOAD_WORD : PAYLOAD_WORD + (length >> 3)], axis=1)
    return [(int(x) + length) & MASK64 for x in sums.tolist()]


# -- records -------------------------------------------------------------------------------


def record_size(length: int) -> int:
    """Ring bytes a message of ``length`` payload bytes takes (header, payload, padding)."""
    return (RECORD_HEADER_SIZE + length + RECORD_ALIGN - 1) & -RECORD_ALIGN


def unstamped_sums(words: Words, count: int, length: int) -> Words:
    """Per record slot of ``count`` records of ``length`` payload bytes (a multiple of 8, at
    least 16) laid out from the start of ``words``: the 64-bit sum of the payload words other
    than the first and the last, the two that :func:`build_records` stamps. With these,
    :func:`build_records` gets a batch's ``sum64`` checksums from the stamps alone."""
    step, payload_words = record_size(length) >> 3, length >> 3
    table = words[: count * step].reshape(count, step)
    sums: Words = np.add.reduce(
        table[:, PAYLOAD_WORD + 1 : PAYLOAD_WORD + payload_words - 1], axis=1, dtype=np.uint64
    )
    return sums


def build_records(
    stage: memoryview,
    words: Words,
    count: int,
    length: int,
    first_seq: int,
    kind: str,
    unstamped: Words | None = None,
) -> None:
    """Lay out messages ``first_seq`` .. ``first_seq + count - 1`` as records of ``length``
    payload bytes from the start of ``stage`` (``words``: the same buffer as 64-bit words),
    over the payload bytes already there: stamp each payload with its sequence number in its
    first and last words (so no two messages are alike), checksum it (one reduction for the
    batch when it can), then pack its header.

    ``unstamped`` (:func:`unstamped_sums` of the slots, valid while nothing but this
    function's stamps and headers changed the payloads since) makes a uniform ``sum64``
    batch O(1) per record: each checksum is its slot's unstamped sum plus the two stamps
    and the length, and stamps and headers are stored as whole columns."""
    rec = record_size(length)
    step, payload_words = rec >> 3, length >> 3
    if (kind == "sum64" and unstamped is not None and not length & 7 and payload_words >= 2
            and count <= unstamped.shape[0]):  # fmt: skip
        seqs = np.arange(first_seq, first_seq + count, dtype=np.uint64)
        stamps = seqs * np.uint64(STAMP)  # modulo 2**64, as (seq * STAMP) & MASK64
        table = words[: count * step].reshape(count, step)
        table[:, PAYLOAD_WORD] = seqs
        table[:, PAYLOAD_WORD + payload_words - 1] = stamps
        # RECORD_HEADER as little-endian words: tag | seq << 32, length, checksum, reserved
        table[:, 0] = (seqs << np.uint64(32)) | np.uint64(RECORD_TAG)
        table[:, 1] = length
        table[:, 2] = unstamped[:count] + seqs + stamps + np.uint64(length)
        table[:, 3] = 0
        return
    if payload_words:
        for j in range(count):
            seq = first_seq + j
            words[j * step + PAYLOAD_WORD] = seq
            words[j * step + PAYLOAD_WORD + payload_words - 1] = (seq * STAMP) & MASK64
    if kind == "sum64" and not length & 7 and count > 1:
        checksums = sum64_of_records(words, count, rec, length)
    else:
        check = CHECKSUMS_AT[kind]
        checksums = [check(stage, words, j * rec + RECORD_HEADER_SIZE, length)
                     for j in range(count)]  # fmt: skip
    pack_into = RECORD_HEADER.pack_into
    for j in range(count):
        pack_into(stage, j * rec, RECORD_TAG, (first_seq + j) & SEQ_MASK, length, checksums[j], 0)


@dataclass(slots=True)
class Window:
    """The whole records :func:`parse_records` found at the start of a window."""

    offsets: list[int]  # of each record in the window
    lengths: list[int]  # its payload length
    checksums: list[int]  # what its header says
    size: int = 0  # ring bytes they take (what the consumer releases)
    payload: int = 0  # their payload bytes
    problem: str | None = None  # a corrupt header: stop there
    problem_at: int = 0  # its offset in the window

    @property
    def count(self) -> int:
        return len(self.offsets)


def parse_records(buf: Payload, n: int, first_seq: int, limit: int, wanted: int, available: int,
                  words: Words | None = None) -> Window:  # fmt: skip
    """The whole records in the first ``n`` bytes of ``buf``, a window read at the consumer's
    tail: messages ``first_seq`` onward, payloads of at most ``limit`` bytes, until ``wanted``
    payload bytes (what is left of the transfer). A record that continues past the window
    waits for the next one, unless it runs past the ``available`` published bytes (a
    problem, as is a header that is not the expected one).

    With ``words`` (``buf`` as 64-bit words), a leading run of at least
    :data:`COLUMN_RECORDS` records of ``limit`` bytes has its headers checked as columns, at
    once; the rest (a shorter last message, a bad header) is parsed one record at a time."""
    window = Window([], [], [])
    offsets, lengths, checksums = window.offsets, window.lengths, window.checksums
    unpack_from, pad = RECORD_HEADER.unpack_from, RECORD_HEADER_SIZE + RECORD_ALIGN - 1
    off = payload = 0
    seq = first_seq
    if words is not None:
        rec = record_size(limit)
        count = min(n // rec, wanted // limit)
        if count >= COLUMN_RECORDS:
            step = rec >> 3
            table = words[: count * step].reshape(count, step)
            seqs = np.arange(first_seq, first_seq + count, dtype=np.uint64)
            good = (table[:, 0] == (seqs << np.uint64(32)) | np.uint64(RECORD_TAG)) & (
                table[:, 1] == limit
            )
            whole = count if good.all() else int(np.argmin(good))  # the first bad one: below
            offsets.extend(range(0, whole * rec, rec))
            lengths.extend([limit] * whole)
            checksums.extend(table[:whole, 2].tolist())
            off, payload, seq = whole * rec, whole * limit, first_seq + whole
    while off < n and payload < wanted:
        tag, got, length, checksum, _ = unpack_from(buf, off)
        if tag != RECORD_TAG or got != seq & SEQ_MASK or not 0 < length <= limit:
            window.problem = (
                f"corrupt record header (tag {tag:#x}, sequence {got}, expected "
                f"{seq & SEQ_MASK}, length {length})"
            )
            window.problem_at = off
            break
        rec = (length + pad) & -RECORD_ALIGN  # record_size(length)
        if off + rec > n:
            if rec > available - off:
                window.problem = f"record {got} ({rec} bytes) runs past the published bytes"
                window.problem_at = off
            break  # it continues past the window: read it in the next one
        offsets.append(off)
        lengths.append(length)
        checksums.append(checksum)
        off += rec
        payload += length
        seq += 1
    window.size, window.payload = off, payload
    return window


def bad_records(
    buf: memoryview, words: Words, window: Window, kind: str, limit: int
) -> list[tuple[int, int]]:
    """The window's records whose payload does not match its checksum, as (index, the
    payload's checksum): one reduction and one comparison for them all when they are
    uniform ``sum64`` records of ``limit`` bytes."""
    count = window.count
    lengths = window.lengths
    if kind == "sum64" and not limit & 7 and count > 1 and lengths.count(limit) == count:
        step = record_size(limit) >> 3
        table = words[: count * step].reshape(count, step)
        sums = np.add.reduce(table[:, PAYLOAD_WORD : PAYLOAD_WORD + (limit >> 3)], axis=1)
        pairs = zip(sums.tolist(), window.checksums, strict=True)
        return [(j, got) for j, (total, want) in enumerate(pairs)
                if (got := (total + limit) & MASK64) != want]  # fmt: skip
    check = CHECKSUMS_AT[kind]
    sums = [check(buf, words, off + RECORD_HEADER_SIZE, length)
            for off, length in zip(window.offsets, lengths, strict=True)]  # fmt: skip
    return [(j, a) for j, (a, b) in enumerate(zip(sums, window.checksums, strict=True)) if a != b]


# -- the ring header -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RingHeader:
    """What the producer writes in the header page (after the magic) and the consumer reads."""

    version: int
    checksum: int  # an index in CHECKSUM_NAMES
    doorbell_vector: int
    data_offset: int
    ring_size: int
    session: int
    total: int
    start_ns: int
    max_message: int

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.version, self.checksum, self.doorbell_vector, self.data_offset,
            self.ring_size, self.session, self.total, self.start_ns, self.max_message,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: Payload) -> RingHeader:
        """From the first :data:`HEADER_READ` bytes of the shared memory."""
        return cls(*CONFIG.unpack_from(raw, OFF_CONFIG))

    def problem(self, shm_size: int) -> str | None:
        """Why a consumer must not trust this header in a ``shm_size`` shared memory."""
        ring = self.ring_size
        if (self.version != VERSION or self.checksum >= len(CHECKSUM_NAMES)
                or self.data_offset != HEADER_SIZE or ring % PAGE_SIZE
                or not 0 < ring <= shm_size - HEADER_SIZE or self.total < 1
                or not 0 < self.max_message <= MAX_MESSAGE
                or record_size(self.max_message) > ring):  # fmt: skip
            return (
                f"bad ring header (version {self.version}, checksum {self.checksum}, data at "
                f"{self.data_offset:#x}, ring {ring}, total {self.total}, max message "
                f"{self.max_message})"
            )
        return None


# -- index arithmetic ----------------------------------------------------------------------


def used(head: int, tail: int) -> int:
    """Bytes published and not yet released (free-running indices)."""
    return head - tail


def spans(index: int, n: int, ring: int) -> tuple[tuple[int, int, int], ...]:
    """Where ``n`` bytes from ring index ``index`` are: ``(ring offset, offset in the
    caller's buffer, length)``, one span or two where the ring wraps."""
    pos = index % ring
    if pos + n <= ring:
        return ((pos, 0, n),)
    first = ring - pos
    return ((pos, 0, first), (0, first, n - first))


def records_per_window(largest: int, ring: int) -> int:
    """How many of the largest records one guest access moves: about ``WINDOW`` bytes' worth
    (at least one, never more than the ring holds)."""
    return max(1, min((WINDOW + largest // 2) // largest, ring // largest))


def batch_bytes(ring: int, largest: int) -> int:
    """How far a sleeping side lets the other run before it wants a doorbell: a quarter of
    the ring, but at most ``ring - largest`` (``largest``: the largest record).

    The consumer sleeps until ``head`` passes its ``tail`` plus this; the producer, on a
    full ring, sleeps until this much (at least its record) is free. The bound keeps them
    from both sleeping: a blocked producer has more than this much published, and a
    sleeping consumer has released everything but this much, which is past the tail the
    producer waits for. The producer's last record always rings.
    """
    return min(ring // WAKE_FRACTION, ring - largest)


def producer_wake_tail(head: int, ring: int, batch: int, record: int) -> int:
    """The tail a producer blocked on a full ring waits for: a batch (at least its next
    ``record``) free."""
    return head - ring + max(batch, record)


def head_event_passed(checked: int, event: int, head: int) -> bool:
    """Publishing ``head`` (last published: ``checked``) moved it past the consumer's
    head event: ring the consumer."""
    return checked <= event < head


def tail_event_reached(checked: int, event: int, tail: int) -> bool:
    """Releasing up to ``tail`` (last released: ``checked``) reached the producer's tail
    event: ring the producer."""
    return checked < event <= tail
